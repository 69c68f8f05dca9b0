"""Dead-code elimination."""

from __future__ import annotations

from graphcomp.ir import Graph
from graphcomp.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadCode(Pass):
    """node whose outputs are never read -> (removed)

    Removes every node none of whose outputs is read by another node or returned as a graph
    output, repeatedly, so whole dead chains go. Dead nodes cost time in the reference executor
    and in backends, and they keep weights alive in artifacts. Other passes may leave dead
    nodes behind, so this pass runs last. Graph inputs stay even when unused, because they are
    part of the graph's interface. Ops have no side effects in graphcomp, so no node is kept
    for one.

    Example (``%t`` is never read)::

        before:
          a: %y = relu(%x) -> float32[2,3]
          b: %t = sigmoid(%x) -> float32[2,3]
          c: %u = tanh(%t) -> float32[2,3]
        after:
          a: %y = relu(%x) -> float32[2,3]
    """

    name = "dce"
    summary = "remove nodes whose outputs are never read"
    establishes = ("no-dead-code",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = {id(value) for value in graph.outputs}
        kept = []
        # In reverse order, every reader of a value comes before the value's producer.
        for node in reversed(graph.nodes):
            if any(id(value) in live for value in node.outputs):
                kept.append(node)
                live.update(id(value) for value in node.inputs)
        removed = len(graph.nodes) - len(kept)
        graph.nodes = list(reversed(kept))
        return PassResult(changed=removed > 0, details={"removed": removed})
