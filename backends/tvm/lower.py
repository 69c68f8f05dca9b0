"""Lower a graphcomp graph to a TVM Relax module.

The module has one function, ``main(inputs..., weights...)``, whose body is one dataflow
block with one binding per node output. It returns a tuple of the graph outputs, even for a
single output, so every caller unpacks results the same way. Weights are parameters of
``main`` instead of embedded constants, so the compiled library stays small and the weights
ship beside it. Scalars and small integer constants (indices, shapes) are embedded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphcomp.errors import BackendError, GraphcompError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import registered_ops
from graphcomp.verifier import verify_graph

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# Integer and boolean constants up to this many elements are embedded in the code; larger
# ones (for example int8 weights) become parameters like float weights.
MAX_EMBEDDED_INTEGER_ELEMENTS = 256


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype name of one input, output or weight of ``main``."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, value: Value) -> "TensorSpec":
        return cls(value.name, tuple(value.shape), value.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def is_weight(constant: Constant) -> bool:
    """Return whether a constant becomes a parameter of ``main`` (else it is embedded)."""
    size = int(constant.data.size)
    if np.issubdtype(constant.data.dtype, np.floating):
        return size > 1
    return size > MAX_EMBEDDED_INTEGER_ELEMENTS


def graph_weights(graph: Graph) -> list[Constant]:
    """Return the constants that become weights, in the order of ``main``'s parameters.

    Raises BackendError when two of them, or a weight and a graph input, share a name,
    because weights are stored and fed by name.
    """
    weights = [c for c in graph.constants() if is_weight(c)]
    seen: dict[str, str] = {v.name: "a graph input" for v in graph.inputs}
    for constant in weights:
        if constant.name in seen:
            raise BackendError(
                f"graph '{graph.name}': weight name '{constant.name}' is also used by "
                f"{seen[constant.name]}; give every weight and input a unique name"
            )
        seen[constant.name] = "another weight"
    return weights


def lower_to_relax(graph: Graph) -> "tvm.IRModule":
    """Lower ``graph`` to a Relax IRModule with ``main(inputs..., weights...)``.

    Raises VerificationError for a malformed graph and BackendError naming the node when an
    op's lowering fails or gives another shape or dtype than the graph records.
    """
    from tvm import relax

    verify_graph(graph)
    _check_ops_registered(graph)
    weights = graph_weights(graph)

    env: dict[int, Any] = {}
    params = []
    for value in [*graph.inputs, *weights]:
        var = relax.Var(_relax_name(value.name), relax.TensorType(value.shape, value.dtype))
        env[id(value)] = var
        params.append(var)

    builder = relax.BlockBuilder()
    with builder.function("main", params, attrs={"num_input": len(graph.inputs)}):
        with builder.dataflow():
            for node in graph.nodes:
                _lower_node(builder, node, env)
            results = [_lookup(value, env) for value in graph.outputs]
            output = builder.emit_output(relax.Tuple(results))
        builder.emit_func_output(output)
    module = builder.get()
    logger.debug("lowered graph '%s' to Relax:\n%s", graph.name, module)
    return module


def _check_ops_registered(graph: Graph) -> None:
    ops = registered_ops()
    unknown: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op not in ops:
            unknown.setdefault(node.op, []).append(node.name)
    if unknown:
        listed = "; ".join(f"{op} at {', '.join(names[:5])}" for op, names in unknown.items())
        raise BackendError(
            f"graph '{graph.name}' uses ops with no Relax lowering: {listed}. "
            "Register each op with its lowering in graphcomp.ops."
        )


def _lookup(value: Value, env: dict[int, Any]):
    from tvm import relax

    if id(value) in env:
        return env[id(value)]
    if isinstance(value, Constant):
        # Not a weight (those are parameters): embed it.
        return relax.const(np.ascontiguousarray(value.data), value.dtype)
    raise BackendError(f"value '{value.name}' is used before it is produced")


def _lower_node(builder, node: Node, env: dict[int, Any]) -> None:
    from tvm import relax

    op = registered_ops()[node.op]
    args = [_lookup(value, env) for value in node.inputs]
    try:
        expr = op.relax(node, *args)
        bound = builder.emit(expr, _relax_name(node.outputs[0].name))
    except GraphcompError:
        raise
    except Exception as exc:  # TVM reports invalid IR with many exception types
        raise BackendError(
            f"lowering node '{node.name}' (op {node.op}) to Relax failed: {exc}. "
            f"Inputs: {', '.join(v.type_str() for v in node.inputs)}; attrs: {node.attrs}"
        ) from exc

    if len(node.outputs) == 1:
        _check_type(node, node.outputs[0], bound)
        env[id(node.outputs[0])] = bound
        return
    for index, value in enumerate(node.outputs):
        item = builder.emit(relax.TupleGetItem(bound, index), _relax_name(value.name))
        _check_type(node, value, item)
        env[id(value)] = item


def _check_type(node: Node, value: Value, bound) -> None:
    from tvm import relax

    ty = bound.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise BackendError(
            f"node '{node.name}' (op {node.op}): the Relax lowering of output '{value.name}' "
            f"is {ty}, not a tensor of static shape"
        )
    shape = tuple(int(d) for d in ty.shape.values)
    dtype = str(ty.dtype)
    if shape != value.shape or dtype != value.dtype:
        raise BackendError(
            f"node '{node.name}' (op {node.op}): the Relax lowering gives "
            f"{dtype}[{','.join(map(str, shape))}] for output '{value.name}', but the graph "
            f"records {value.type_str()}; fix the op's lowering or shape inference"
        )


def _relax_name(name: str) -> str:
    cleaned = re.sub(r"\W", "_", name)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"v_{cleaned}"
