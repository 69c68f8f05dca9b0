"""The text form of a graph (for reading and diffing) and its JSON save/load (for round trips).

Text form, one line per node::

    graph digits_cnn(%input: float32[1,1,8,8]) -> (%logits)
      conv1: %conv1_out = conv2d(%input, @conv1.weight, @conv1.bias) {groups=1, pads=[1,1,1,1]} -> float32[1,16,8,8]

``%`` marks a value produced by a node or a graph input, ``@`` a constant.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from graphcomp.errors import ModelLoadError
from graphcomp.ir import Constant, Graph, Node, Value

FORMAT_NAME = "graphcomp-graph"
FORMAT_VERSION = 1


# --- text form --------------------------------------------------------------------------------


def format_attr(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_attr(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.8g}"  # 8 significant digits: stable text, and 1e-12 stays 1e-12
    return repr(value) if isinstance(value, str) else str(value)


def _ref(value: Value) -> str:
    return f"@{value.name}" if isinstance(value, Constant) else f"%{value.name}"


def format_node(node: Node) -> str:
    outputs = ", ".join(f"%{v.name}" for v in node.outputs)
    inputs = ", ".join(_ref(v) for v in node.inputs)
    attrs = ", ".join(
        f"{key}={format_attr(node.attrs[key])}" for key in sorted(node.attrs)
        if node.attrs[key] is not None
    )
    attr_text = f" {{{attrs}}}" if attrs else ""
    types = ", ".join(v.type_str() for v in node.outputs)
    return f"{node.name}: {outputs} = {node.op}({inputs}){attr_text} -> {types}"


def format_graph(graph: Graph) -> str:
    """Return the text form: a header line, then one line per node, stable across runs."""
    inputs = ", ".join(f"%{v.name}: {v.type_str()}" for v in graph.inputs)
    outputs = ", ".join(_ref(v) for v in graph.outputs)
    lines = [f"graph {graph.name}({inputs}) -> ({outputs})"]
    lines += ["  " + format_node(node) for node in graph.nodes]
    return "\n".join(lines) + "\n"


# --- JSON -------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    constants = graph.constants()
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": graph.name,
        "metadata": _jsonable(graph.metadata),
        "inputs": [_value_dict(v) for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "constants": [_constant_dict(c) for c in constants],
        "nodes": [
            {
                "name": node.name,
                "op": node.op,
                "inputs": [v.name for v in node.inputs],
                "outputs": [_value_dict(v) for v in node.outputs],
                "attrs": {k: _jsonable(v) for k, v in node.attrs.items()},
                "created_by": node.created_by,
            }
            for node in graph.nodes
        ],
    }


def _value_dict(value: Value) -> dict[str, Any]:
    return {"name": value.name, "shape": list(value.shape), "dtype": value.dtype}


def _constant_dict(const: Constant) -> dict[str, Any]:
    data = np.require(const.data, requirements="C")
    return {
        "name": const.name,
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def graph_from_dict(payload: dict[str, Any], source: str = "<dict>") -> Graph:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{source}: not a graphcomp graph (missing format '{FORMAT_NAME}')")
    if payload.get("version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{source}: graph format version {payload.get('version')} is not supported "
            f"(this graphcomp reads version {FORMAT_VERSION})"
        )
    values: dict[str, Value] = {}
    for item in payload["constants"]:
        raw = base64.b64decode(item["data"])
        data = np.frombuffer(raw, dtype=item["dtype"]).reshape(item["shape"]).copy()
        values[item["name"]] = Constant(item["name"], data)
    inputs = []
    for item in payload["inputs"]:
        values[item["name"]] = Value(item["name"], tuple(item["shape"]), item["dtype"])
        inputs.append(values[item["name"]])
    nodes = []
    for item in payload["nodes"]:
        try:
            node_inputs = [values[name] for name in item["inputs"]]
        except KeyError as exc:
            raise ModelLoadError(
                f"{source}: node '{item['name']}' reads undefined value {exc}"
            ) from None
        outputs = [Value(o["name"], tuple(o["shape"]), o["dtype"]) for o in item["outputs"]]
        for value in outputs:
            values[value.name] = value
        nodes.append(
            Node(item["name"], item["op"], node_inputs, outputs, dict(item["attrs"]),
                 item.get("created_by", "import"))
        )
    outputs = [values[name] for name in payload["outputs"]]
    return Graph(payload["name"], inputs, outputs, nodes, payload.get("metadata", {}))


def save_graph(graph: Graph, path: str | os.PathLike) -> None:
    """Write the graph as JSON (weights base64-encoded), through a temporary file and a rename."""
    write_text_atomic(Path(path), json.dumps(graph_to_dict(graph)))


def load_graph(path: str | os.PathLike) -> Graph:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid graph JSON file ({exc})") from None
    try:
        return graph_from_dict(payload, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}: malformed graph JSON ({type(exc).__name__}: {exc}); save it again with "
            "graphcomp.serialize.save_graph"
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see write_bytes_atomic)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """Return the process umask (reading it means setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
