"""The verifier: checks that a graph is well formed and names the node at fault."""

from __future__ import annotations

from graphcomp.errors import VerificationError
from graphcomp.ir import Constant, Graph
from graphcomp.ops import registered_ops
from graphcomp.shapes import infer_node


def verify_graph(graph: Graph) -> None:
    """Check op names and arity, topological order, single producers, no dangling values and
    that stored shapes and dtypes equal what shape inference gives. Raises VerificationError."""
    ops = registered_ops()
    defined = {id(v) for v in graph.inputs}
    names: dict[str, str] = {}
    for value in graph.inputs:
        names[value.name] = "graph input"

    for node in graph.nodes:
        where = f"node '{node.name}' (op {node.op})"
        if node.op not in ops:
            raise VerificationError(f"{where}: unknown op; register it in graphcomp.ops")
        op = ops[node.op]
        if not op.min_inputs <= len(node.inputs) <= op.max_inputs:
            raise VerificationError(
                f"{where}: has {len(node.inputs)} inputs, the op takes "
                f"{op.min_inputs} to {op.max_inputs}"
            )
        for value in node.inputs:
            if isinstance(value, Constant):
                continue
            if id(value) not in defined:
                raise VerificationError(
                    f"{where}: input '{value.name}' is not produced before this node (dangling "
                    "value or nodes out of topological order; call graph.sort())"
                )
        for value in node.outputs:
            if id(value) in defined:
                raise VerificationError(f"{where}: output '{value.name}' is produced twice")
            if value.name in names:
                raise VerificationError(
                    f"{where}: output name '{value.name}' is already used by {names[value.name]}"
                )
            names[value.name] = f"node '{node.name}'"
            defined.add(id(value))
        _check_types(node, where)

    for value in graph.outputs:
        if not isinstance(value, Constant) and id(value) not in defined:
            raise VerificationError(
                f"graph output '{value.name}' is not produced by any node or graph input"
            )


def _check_types(node, where: str) -> None:
    inferred = infer_node(node)
    for value, (shape, dtype) in zip(node.outputs, inferred):
        if tuple(shape) != value.shape or dtype != value.dtype:
            raise VerificationError(
                f"{where}: output '{value.name}' is stored as {value.type_str()} but shape "
                f"inference gives {dtype}[{','.join(map(str, shape))}]; run infer_shapes(graph) "
                "after changing weights or attributes"
            )
