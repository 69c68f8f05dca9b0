"""Shape inference over a whole graph, using each op's ``infer`` from the registry."""

from __future__ import annotations

from graphcomp.errors import ShapeError
from graphcomp.ir import Graph, Node
from graphcomp.ops import get_op


def infer_node(node: Node) -> list[tuple[tuple[int, ...], str]]:
    """Run the op's shape inference; wrap its failure in a ShapeError naming the node."""
    op = get_op(node.op)
    try:
        return op.infer(node)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        inputs = ", ".join(v.type_str() for v in node.inputs)
        raise ShapeError(
            f"shape inference failed at node '{node.name}' (op {node.op}, inputs {inputs}): {exc}"
        ) from exc


def infer_shapes(graph: Graph) -> None:
    """Recompute every node output's shape and dtype in topological order."""
    for node in graph.nodes:
        results = infer_node(node)
        if len(results) != len(node.outputs):
            raise ShapeError(
                f"node '{node.name}' (op {node.op}) has {len(node.outputs)} outputs but shape "
                f"inference gives {len(results)}"
            )
        for value, (shape, dtype) in zip(node.outputs, results):
            value.shape = tuple(int(d) for d in shape)
            value.dtype = dtype
