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
from graphcomp.ops.lowering import Lowering, TargetFeatures, lowering, packed_input
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


@dataclass
class WeightPlan:
    """The weights of ``main`` in parameter order (after the graph inputs): graph constants,
    and the packed layouts that ops request on the target (see graphcomp.ops.lowering)."""

    arrays: dict[str, np.ndarray]
    # id(constant) -> name of its parameter, for constants that some node reads unpacked
    plain: dict[int, str]
    # (id(node), input index) -> name of the packed weight's parameter
    packed: dict[tuple[int, int], str]


def plan_weights(graph: Graph, features: TargetFeatures | None = None) -> WeightPlan:
    """Return the weights that ``main`` takes when ``graph`` lowers for a target with
    ``features`` (None: no target-specific layout)."""
    ops = registered_ops()
    packs: dict[tuple[int, int], np.ndarray] = {}
    if features is not None:
        for node in graph.nodes:
            pack = ops[node.op].pack if node.op in ops else None
            if pack is not None:
                for index, array in pack(node, features).items():
                    packs[(id(node), index)] = np.ascontiguousarray(array)

    weights = graph_weights(graph)
    read_plain = {id(v) for v in graph.outputs}
    for node in graph.nodes:
        read_plain.update(id(v) for i, v in enumerate(node.inputs) if (id(node), i) not in packs)
    names = {v.name for v in graph.inputs} | {c.name for c in weights}
    plan = WeightPlan({}, {}, {})
    for constant in weights:
        if id(constant) in read_plain:
            plan.arrays[constant.name] = np.ascontiguousarray(constant.data)
            plan.plain[id(constant)] = constant.name
    by_weight: dict[int, list[str]] = {}  # id(constant) -> names of its packed layouts
    for node in graph.nodes:
        for index, value in enumerate(node.inputs):
            array = packs.get((id(node), index))
            if array is None:
                continue
            same = [n for n in by_weight.get(id(value), []) if _same(plan.arrays[n], array)]
            if same:
                plan.packed[(id(node), index)] = same[0]
                continue
            name = _unused_name(f"{value.name}.packed", names)
            names.add(name)
            plan.arrays[name] = array
            plan.packed[(id(node), index)] = name
            by_weight.setdefault(id(value), []).append(name)
    return plan


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def _unused_name(name: str, used: set[str]) -> str:
    candidate, count = name, 1
    while candidate in used:
        count += 1
        candidate = f"{name}{count}"
    return candidate


def lower_to_relax(graph: Graph, target: "tvm.target.Target | None" = None) -> "tvm.IRModule":
    """Lower ``graph`` to a Relax IRModule with ``main(inputs..., weights...)``.

    With a ``target``, ops may take weights in a layout for its instructions (int8 layers on
    CPUs with AVX-512 VNNI); ``lower_with_weights`` also returns them.
    Raises VerificationError for a malformed graph and BackendError naming the node when an
    op's lowering fails or gives another shape or dtype than the graph records.
    """
    return lower_with_weights(graph, target)[0]


def lower_with_weights(
    graph: Graph, target: "tvm.target.Target | None" = None,
) -> tuple["tvm.IRModule", WeightPlan]:
    """Lower ``graph`` like ``lower_to_relax``; also return the weights ``main`` takes."""
    from tvm import relax

    from .targets import target_features

    verify_graph(graph)
    _check_ops_registered(graph)
    features = target_features(target) if target is not None else None
    plan = plan_weights(graph, features)

    params = [relax.Var(_relax_name(v.name), relax.TensorType(v.shape, v.dtype))
              for v in graph.inputs]
    env: dict[int, Any] = {id(v): var for v, var in zip(graph.inputs, params)}
    by_name: dict[str, Any] = {}
    for name, array in plan.arrays.items():
        by_name[name] = relax.Var(_relax_name(name), relax.TensorType(array.shape, array.dtype))
        params.append(by_name[name])
    env.update({key: by_name[name] for key, name in plan.plain.items()})
    state = Lowering(features or TargetFeatures(),
                     {key: by_name[name] for key, name in plan.packed.items()})

    builder = relax.BlockBuilder()
    with lowering(state), builder.function("main", params,
                                           attrs={"num_input": len(graph.inputs)}):
        with builder.dataflow():
            for node in graph.nodes:
                _lower_node(builder, node, env)
            results = [_lookup(value, env) for value in graph.outputs]
            output = builder.emit_output(relax.Tuple(results))
        builder.emit_func_output(output)
    module = builder.get()
    logger.debug("lowered graph '%s' to Relax:\n%s", graph.name, module)
    return module, plan


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
    args = []
    for index, value in enumerate(node.inputs):
        packed = packed_input(node, index)
        args.append(_lookup(value, env) if packed is None else packed)
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
