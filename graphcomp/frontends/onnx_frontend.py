"""Import an ONNX model file into graphcomp's IR.

``import_onnx`` works in these steps:

1. Load the file with onnx (external data included) and run onnx.checker on it. Name
   unnamed nodes ``<OpType>_<index>`` (index in the file) and make repeated names unique.
2. Fix every dynamic input dim from ``input_shapes``.
3. Fold to a fixed point: ONNX shape inference, then onnx-graphsurgeon's ``fold_constants``
   and ``cleanup``, repeated until the node count stops changing, so that shape subgraphs
   (Shape -> Gather -> Concat -> Reshape) become constants. Each folded tensor keeps the dtype
   that ONNX type inference gives it.
4. Convert node by node with the table in ``onnx_ops``, skipping op types without a
   converter and collecting attribute values that graphcomp cannot represent, then raise one
   UnsupportedOpError listing both, so that one error names every unsupported op.
5. Run graphcomp's shape inference and verifier, and check that every converted tensor has the
   shape and dtype that ONNX shape inference gives it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import numpy_helper, shape_inference

from graphcomp.errors import (
    ModelLoadError, OptionError, ShapeError, UnsupportedOpError, VerificationError,
)
from graphcomp.frontends.onnx_ops import (
    CONVERTERS, ConversionContext, NodeNotSupported, OnnxNode, numpy_dtype,
)
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.shapes import infer_shapes
from graphcomp.verifier import verify_graph

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")

# Folding reaches its fixed point in a few rounds (PP-OCRv4: det 1, cls 2, rec 4); the cap
# only stops a graph whose node count keeps changing.
MAX_FOLD_ROUNDS = 32


# --- public API ----------------------------------------------------------------------------------


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=D0,D1,...`` options (e.g. ``x=1,3,640,640``) into {name: shape}.

    The name is everything before the last '=', so ONNX names containing '=' work.
    Raises OptionError for a malformed spec, a non-positive dim or a repeated name.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, equals, dims_text = spec.rpartition("=")
        name = name.strip()
        if not equals or not name or not dims_text.strip():
            raise OptionError(
                f"invalid input shape '{spec}': expected NAME=D0,D1,... such as x=1,3,640,640"
            )
        try:
            dims = tuple(int(d) for d in dims_text.split(","))
        except ValueError:
            raise OptionError(
                f"invalid input shape '{spec}': dims must be integers separated by commas, "
                "such as x=1,3,640,640"
            ) from None
        if any(d <= 0 for d in dims):
            raise OptionError(f"invalid input shape '{spec}': every dim must be positive")
        if name in shapes:
            raise OptionError(f"input '{name}' is given a shape twice: {shapes[name]} and {dims}")
        shapes[name] = dims
    return shapes


def import_onnx(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Import the ONNX model at ``path`` as a Graph with static shapes.

    ``input_shapes`` fixes dynamic input dims; an input with dynamic dims needs an entry.
    Raises ModelLoadError (unreadable or invalid file), ShapeError (missing or contradicting
    input shapes), UnsupportedOpError (ops or attribute values graphcomp cannot import) and
    VerificationError (a converted graph that disagrees with ONNX shape inference).
    """
    start = time.perf_counter()
    path = Path(path)
    source = str(path)
    model = load_model(path)
    # Name nodes before folding: errors then name nodes as they are in the file, and ONNX
    # Runtime, which evaluates folded subgraphs, rejects repeated node names.
    for node, name in zip(model.graph.node, unique_node_names(model)):
        node.name = name
    fix_input_shapes(model, dict(input_shapes or {}), source)
    file_node_count = len(model.graph.node)
    model = simplify_model(model, source)
    graph = build_graph(model, source)
    logger.info(
        "imported %s: %d ONNX nodes, %d after folding, %d graphcomp nodes, in %.2f s",
        source, file_node_count, len(model.graph.node), len(graph.nodes),
        time.perf_counter() - start,
    )
    return graph


# --- loading -------------------------------------------------------------------------------------


def load_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; raise ModelLoadError naming the file and the fault."""
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty (0 bytes), not an ONNX model")
    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        other = _other_onnx_message(path)
        if other is not None:
            raise ModelLoadError(
                f"{path}: is a serialized ONNX {other}, not a model (ModelProto); export the "
                "whole model with torch.onnx.export or onnx.save"
            ) from exc
        raise ModelLoadError(
            f"{path}: cannot be parsed as an ONNX model ({exc}); the file is truncated, "
            "corrupt or not an ONNX protobuf file"
        ) from exc
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        missing = _missing_external_data(path)
        if missing:
            listing = "; ".join(
                f"{file_name} (tensors {', '.join(tensors[:3])}"
                f"{' ...' if len(tensors) > 3 else ''})"
                for file_name, tensors in missing.items()
            )
            raise ModelLoadError(
                f"{path}: the model keeps weights in external data files that are missing from "
                f"{path.parent}: {listing}. Copy them next to the model file"
            ) from exc
        # Unreadable file or external data file, or external data that fails onnx's checks.
        raise ModelLoadError(f"{path}: cannot be loaded: {_one_line(exc)}") from exc
    if not model.HasField("graph") or not model.opset_import:
        other = _other_onnx_message(path)
        kind = f"a serialized ONNX {other}" if other else "a protobuf message"
        raise ModelLoadError(
            f"{path}: is {kind} but not an ONNX model (it has no graph or no "
            "opset_import); export the model with torch.onnx.export or another ONNX exporter"
        )
    try:
        if model.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path}: is not a valid ONNX model: {_one_line(exc)}") from exc
    return model


def _other_onnx_message(path: Path) -> str | None:
    """Name the ONNX message type (TensorProto, GraphProto) that a file holding no ModelProto
    parses as exactly, or return None. Used only to word the error for such a file."""
    data = path.read_bytes()
    candidates = (
        ("tensor (TensorProto)", onnx.TensorProto, lambda t: t.dims and t.data_type),
        ("graph (GraphProto)", onnx.GraphProto, lambda g: len(g.node) > 0),
    )
    for label, message_type, looks_valid in candidates:
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError:
            continue
        # Random bytes seldom parse, and almost never re-encode to the same bytes.
        if looks_valid(message) and message.SerializeToString() == data:
            return label
    return None


def _missing_external_data(path: Path) -> dict[str, list[str]]:
    """Map each external data file that the model at ``path`` names but that does not exist
    to the initializers stored in it."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return {}
    missing: dict[str, list[str]] = defaultdict(list)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data
                         if entry.key == "location"), "")
        if not (path.parent / location).is_file():
            missing[location or "(no location)"].append(tensor.name)
    return dict(missing)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".")


# --- input shapes --------------------------------------------------------------------------------


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old models list weights as inputs too)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Return the declared dims, an int for a static dim and a label for a dynamic one, or None
    for an input without a shape (unknown rank)."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(str(dim.dim_value) if dim.HasField("dim_value") else "?")
    return dims


def _format_dims(dims: list[int | str] | None) -> str:
    return "unknown rank" if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"


def fix_input_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    """Write static dims into the model's inputs; raise ShapeError naming every problem."""
    inputs = _real_inputs(model)
    names = [value.name for value in inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise ShapeError(
            f"{source}: input_shapes names {unknown}, which are not inputs of the model; "
            f"its inputs are {names}"
        )
    dynamic: list[tuple[str, list[int | str] | None]] = []
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise ShapeError(f"{source}: input '{value.name}' is not a tensor; graphcomp "
                             "imports only models whose inputs are tensors")
        dims = _declared_dims(value)
        given = input_shapes.get(value.name)
        if given is None:
            if dims is None or not all(isinstance(d, int) for d in dims):
                dynamic.append((value.name, dims))
            continue
        _check_given_shape(value.name, dims, tuple(int(d) for d in given), source)
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in given:
            shape.dim.add().dim_value = int(size)
    if dynamic:
        raise ShapeError(_dynamic_inputs_message(source, dynamic))
    _clear_invalid_dims(model)


def _check_given_shape(
    name: str, dims: list[int | str] | None, given: tuple[int, ...], source: str
) -> None:
    if any(d <= 0 for d in given):
        raise ShapeError(f"{source}: input '{name}': given shape {list(given)} has a dim below 1")
    if dims is None:
        return
    problem = None
    if len(dims) != len(given):
        problem = f"the model's rank is {len(dims)}, the given shape's is {len(given)}"
    else:
        wrong = [i for i, (d, g) in enumerate(zip(dims, given)) if isinstance(d, int) and d != g]
        if wrong:
            problem = f"dim {wrong[0]} is fixed to {dims[wrong[0]]} in the model"
    if problem:
        raise ShapeError(
            f"{source}: input '{name}' is declared as {_format_dims(dims)}, but the given "
            f"shape is {list(given)}: {problem}. Give a shape that keeps the model's fixed dims."
        )


def _dynamic_inputs_message(source: str, dynamic: list[tuple[str, list | None]]) -> str:
    lines = [f"{source}: {len(dynamic)} input(s) have dynamic dims and need a static shape:"]
    for name, dims in dynamic:
        lines.append(f"  {name}: {_format_dims(dims)}")
    name, dims = dynamic[0]
    template = ",".join(
        str(d) if isinstance(d, int) else f"D{i}" for i, d in enumerate(dims or ["D0"])
    )
    lines.append(
        f"Give each one a static shape with --input-shape NAME=D0,D1,... (input_shapes in the "
        f"Python API): here --input-shape {name}={template} with each Dk replaced by a size, "
        "in the form --input-shape x=1,3,640,640."
    )
    return "\n".join(lines)


def _clear_invalid_dims(model: onnx.ModelProto) -> None:
    """Drop stale value_info and turn non-positive declared output dims (some exporters write
    -1) into unknown dims, so shape inference does not report them as conflicts."""
    del model.graph.value_info[:]
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.Clear()


# --- folding -------------------------------------------------------------------------------------


def simplify_model(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Fold constants and shape subgraphs to a fixed point; return the shape-inferred model.

    Each round runs ONNX shape inference, then onnx-graphsurgeon's fold_constants and cleanup,
    then gives every folded tensor back the dtype ONNX type inference gave it.
    """
    model = lower_constant_nodes(model)
    previous_count = len(model.graph.node)
    for round_index in range(MAX_FOLD_ROUNDS):
        model = infer_onnx_shapes(model, source)
        expected_types = tensor_elem_types(model)
        model = fold_once(model)
        restore_folded_dtypes(model, expected_types)
        count = len(model.graph.node)
        logger.debug("fold round %d: %d -> %d nodes", round_index, previous_count, count)
        if count == previous_count:
            break
        previous_count = count
    else:
        logger.warning("%s: folding still changed the node count after %d rounds",
                       source, MAX_FOLD_ROUNDS)
    return infer_onnx_shapes(model, source)


def lower_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace numeric Constant nodes by initializers with the dtype ONNX assigns them.

    onnx-graphsurgeon 0.6.1 lowers ``Constant(value_float=...)`` through ``np.array``, which
    gives float64 where the ONNX spec gives float32. Lowering here keeps the ONNX dtypes.
    Constants holding strings or sparse tensors stay nodes (and are reported unsupported).
    """
    model = _copy_model(model)
    kept = []
    for node in model.graph.node:
        array = _constant_node_value(node)
        if array is None:
            kept.append(node)
        else:
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if model.ir_version < 4:
        # Before IR 4 every initializer must also be a graph input; IR 4 drops that rule.
        model.ir_version = 4
    return model


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    if len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.ref_attr_name:
        return None
    if attribute.name == "value":
        return numpy_helper.to_array(attribute.t)
    if attribute.name == "value_float":
        return np.array(attribute.f, dtype=np.float32)
    if attribute.name == "value_floats":
        return np.array(list(attribute.floats), dtype=np.float32)
    if attribute.name == "value_int":
        return np.array(attribute.i, dtype=np.int64)
    if attribute.name == "value_ints":
        return np.array(list(attribute.ints), dtype=np.int64)
    return None


def _copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def infer_onnx_shapes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Run ONNX shape inference in strict mode; a failure is a ShapeError."""
    # NOTE: in-memory inference and graphsurgeon export fail for models over 2 GB, which
    # would need onnx.shape_inference.infer_shapes_path and external-data export instead.
    try:
        return shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ShapeError(
            f"{source}: ONNX shape inference failed with the fixed input shapes: "
            f"{_one_line(exc)}. Check the input shapes given for the model."
        ) from exc


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Map each tensor that shape inference typed to its ONNX element type."""
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def fold_once(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run one round of onnx-graphsurgeon constant and shape folding and dead-node cleanup."""
    graph = gs.import_onnx(model)
    # graphsurgeon logs through print(); keep the library quiet and rely on the fixed point.
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.CRITICAL):
        graph.fold_constants(partitioning="basic").cleanup().toposort()
        folded = gs.export_onnx(graph)
    folded.ir_version = model.ir_version
    return folded


def restore_folded_dtypes(model: onnx.ModelProto, expected_types: dict[str, int]) -> None:
    """Cast each initializer whose dtype differs from its ONNX-inferred type back to it."""
    for index, init in enumerate(model.graph.initializer):
        expected = expected_types.get(init.name)
        if expected is None or expected == init.data_type:
            continue
        array = numpy_helper.to_array(init)
        fixed = array.astype(numpy_dtype(expected))
        logger.debug("folded tensor %s: %s -> %s (its ONNX-inferred type)",
                     init.name, array.dtype, fixed.dtype)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(fixed, init.name))


# --- conversion ----------------------------------------------------------------------------------


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS:
            return int(opset.version)
    return 1


def unique_node_names(model: onnx.ModelProto) -> list[str]:
    """ONNX node names made unique; an empty name becomes ``<OpType>_<index>``."""
    given = {node.name for node in model.graph.node if node.name}
    used: set[str] = set()
    names = []
    for index, node in enumerate(model.graph.node):
        base = node.name or f"{node.op_type}_{index}"
        name, counter = base, 1
        while name in used or (not node.name and name in given):
            name = f"{base}_{counter}"
            counter += 1
        used.add(name)
        names.append(name)
    return names


def check_supported_ops(model: onnx.ModelProto, names: list[str], source: str) -> None:
    """Raise one UnsupportedOpError listing every op type that has no converter."""
    missing = unsupported_op_types(model, names)
    if missing:
        raise UnsupportedOpError(source, missing)


def unsupported_op_types(
    model: onnx.ModelProto, names: list[str]
) -> list[tuple[str, str, list[str]]]:
    """Return (op type, domain and opset, node names) for each op type without a converter."""
    versions = {opset.domain or "ai.onnx": opset.version for opset in model.opset_import}
    missing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for node, name in zip(model.graph.node, names):
        if not _has_converter(node):
            missing[(node.op_type, node.domain or "ai.onnx")].append(name)
    return [
        (op_type, f"domain {domain}, opset {versions.get(domain, '?')}", node_names)
        for (op_type, domain), node_names in missing.items()
    ]


def _has_converter(node: onnx.NodeProto) -> bool:
    return (node.domain or "ai.onnx") == "ai.onnx" and node.op_type in CONVERTERS


def build_graph(model: onnx.ModelProto, source: str) -> Graph:
    """Convert a folded, shape-inferred ONNX model into a verified Graph."""
    names = unique_node_names(model)
    opset = default_opset(model)
    onnx_types = onnx_tensor_types(model)
    values = _initial_values(model)
    graph_outputs = [value.name for value in model.graph.output]
    used_names = set(names) | set(onnx_types) | set(values)
    for node in model.graph.node:
        used_names.update(node.output)
    ctx = ConversionContext(values, set(graph_outputs), used_names)
    _convert_nodes(ctx, model, names, opset, source)

    inputs = [values[value.name] for value in _real_inputs(model)]
    outputs = [_graph_output(ctx, name) for name in graph_outputs]
    graph = Graph(model.graph.name or Path(source).stem, inputs, outputs, ctx.nodes,
                  {"source": source, "frontend": "onnx", "opset": opset})
    infer_shapes(graph)
    verify_graph(graph)
    check_against_onnx(graph, ctx, onnx_types, source)
    return graph


def onnx_tensor_types(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...] | None, str]]:
    """Map each tensor to the (shape, dtype) ONNX shape inference gives it (shape None if not
    static)."""
    types: dict[str, tuple[tuple[int, ...] | None, str]] = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.elem_type:
            continue
        shape = None
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
            shape = tuple(dims) if all(d >= 0 for d in dims) else None
        types[value.name] = (shape, numpy_dtype(tensor_type.elem_type))
    return types


def _initial_values(model: onnx.ModelProto) -> dict[str, Value]:
    values: dict[str, Value] = {}
    for init in model.graph.initializer:
        values[init.name] = Constant(init.name, np.array(numpy_helper.to_array(init)))
    for value in _real_inputs(model):
        tensor_type = value.type.tensor_type
        shape = tuple(int(d.dim_value) for d in tensor_type.shape.dim)
        values[value.name] = Value(value.name, shape, numpy_dtype(tensor_type.elem_type))
    return values


def _convert_nodes(
    ctx: ConversionContext, model: onnx.ModelProto, names: list[str], opset: int, source: str
) -> None:
    """Convert every node; raise one UnsupportedOpError listing both the op types without a
    converter and the nodes whose attribute values or inputs cannot be converted.

    The outputs of a node that fails are marked broken, and nodes reading them are skipped,
    because their inputs have no graphcomp value to convert against.
    """
    missing_types = unsupported_op_types(model, names)
    problems: dict[tuple[str, str], list[str]] = defaultdict(list)
    broken: set[str] = set()
    for proto, name in zip(model.graph.node, names):
        if not _has_converter(proto) or any(item in broken for item in proto.input):
            broken.update(proto.output)
            continue
        node = OnnxNode.from_proto(proto, name, opset)
        try:
            CONVERTERS[proto.op_type](ctx, node)
        except NodeNotSupported as exc:
            problems[(proto.op_type, str(exc))].append(name)
            broken.update(proto.output)
        except ShapeError as exc:
            inputs = ", ".join(
                f"{value.name} {list(ctx.values[value.name].shape)}"
                for value in _real_inputs(model)
            )
            raise ShapeError(
                f"{source}: {exc}. The model's inputs have the shapes {inputs}; an input shape "
                "the model does not accept (check --input-shape) is the usual cause"
            ) from exc
    if missing_types or problems:
        raise UnsupportedOpError(source, missing_types + [
            (op_type, f"opset {opset}: {reason}", node_names)
            for (op_type, reason), node_names in problems.items()
        ])


def _graph_output(ctx: ConversionContext, name: str) -> Value:
    """Return the graph output value named ``name``, adding an identity node for an alias."""
    value = ctx.values[name]
    if value.name == name:
        return value
    renamed = Value(name, value.shape, value.dtype)
    ctx.nodes.append(Node(ctx.fresh_name(f"{name}/identity"), "identity", [value], [renamed]))
    return renamed


def check_against_onnx(
    graph: Graph, ctx: ConversionContext,
    onnx_types: dict[str, tuple[tuple[int, ...] | None, str]], source: str,
) -> None:
    """Raise VerificationError where a converted tensor's type differs from ONNX's inference."""
    producers = graph.producers()
    for name, value in ctx.values.items():
        expected = onnx_types.get(name)
        if expected is None or value.name != name:
            continue
        shape, dtype = expected
        if (shape is not None and tuple(shape) != value.shape) or dtype != value.dtype:
            node = producers.get(value)
            where = f"node '{node.name}' (op {node.op})" if node else "a constant"
            raise VerificationError(
                f"{source}: tensor '{name}' from {where} is {value.type_str()} in graphcomp, "
                f"but ONNX shape inference gives {dtype}{list(shape) if shape else '[?]'}; "
                "this is a bug in the ONNX frontend's converter for that op"
            )
