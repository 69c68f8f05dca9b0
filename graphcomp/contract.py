"""Graph properties that passes declare and the pass manager checks.

A pass states its contract as class attributes (see ``graphcomp.pipeline.Pass``):

- ``requires``: properties (or names of passes) that must hold (or run) before it,
- ``establishes``: properties that hold after it, whatever the graph before,
- ``invalidates``: properties it may break. It preserves every other property.

Preserving is the default because every property here is cheap to check: after each pass the
manager checks the established properties and every preserved property that held before the
pass, so a wrong declaration fails at once, naming the pass.

The vocabulary:

========================  ===================================================================
``interface``             graph inputs and outputs keep their names, shapes and dtypes
``float``                 no op of ``graphcomp.ops.quantized`` (quantize, qconv2d, ...)
``no-dead-code``          every node has an output that a node reads or the graph returns
========================  ===================================================================

``interface`` relates the graph after a pass to the graph before it. The other two are
predicates on one graph, which is also how the manager checks a pipeline's requirements
against its input graph before it runs any pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from graphcomp.ir import Constant, Graph
from graphcomp.ops import registered_ops


def quantized_ops() -> frozenset[str]:
    """Return the ops that ``graphcomp.ops.quantized`` defines (quantize, qconv2d, ...)."""
    return frozenset(name for name, op in registered_ops().items()
                     if op.infer.__module__ == "graphcomp.ops.quantized")


def _interface(graph: Graph) -> tuple:
    return tuple(
        (role, value.name, value.shape, value.dtype)
        for role, values in (("input", graph.inputs), ("output", graph.outputs))
        for value in values
    )


def _first_quantized_node(graph: Graph) -> str | None:
    quantized = quantized_ops()
    for node in graph.nodes:
        if node.op in quantized:
            return f"node '{node.name}' is a {node.op}"
    return None


def _first_dead_node(graph: Graph) -> str | None:
    read = {id(value) for node in graph.nodes for value in node.inputs}
    read.update(id(value) for value in graph.outputs)
    for node in graph.nodes:
        if not any(id(value) in read for value in node.outputs):
            return f"nothing reads the outputs of node '{node.name}' ({node.op})"
    return None


@dataclass(frozen=True)
class GraphProperty:
    """A named property of graphs. ``violation`` returns why a graph lacks it, or None; a
    relational property has ``snapshot`` instead, whose results must stay equal."""

    name: str
    description: str
    violation: Callable[[Graph], str | None] | None = None
    snapshot: Callable[[Graph], Any] | None = None


PROPERTIES: dict[str, GraphProperty] = {
    prop.name: prop for prop in (
        GraphProperty("interface", "graph inputs and outputs keep their names, shapes and dtypes",
                      snapshot=_interface),
        GraphProperty("float", "no quantized op (quantize, dequantize, qconv2d, qlinear...)",
                      violation=_first_quantized_node),
        GraphProperty("no-dead-code",
                      "every node has an output that a node reads or the graph returns",
                      violation=_first_dead_node),
    )
}


def state_of(graph: Graph) -> dict[str, Any]:
    """Return, per property, the violation text (None when it holds) or the snapshot."""
    state: dict[str, Any] = {}
    for prop in PROPERTIES.values():
        if prop.snapshot is not None:
            state[prop.name] = prop.snapshot(graph)
        else:
            state[prop.name] = prop.violation(graph)
    return state


def broken_properties(before: dict[str, Any], after: dict[str, Any],
                      establishes: tuple[str, ...], invalidates: tuple[str, ...]) -> list[str]:
    """Return a sentence per property that a pass broke against its declaration, comparing
    ``state_of`` before and after it."""
    problems = []
    for name, prop in PROPERTIES.items():
        if prop.snapshot is not None:
            if name not in invalidates and before[name] != after[name]:
                problems.append(
                    f"it changed property '{name}' ({prop.description}) without declaring "
                    f"that it invalidates it: {_describe_change(before[name], after[name])}"
                )
        elif name in establishes and after[name] is not None:
            problems.append(f"it declares that it establishes '{name}', but {after[name]}")
        elif name not in invalidates and before[name] is None and after[name] is not None:
            problems.append(
                f"property '{name}' ({prop.description}) held before it and not after, and "
                f"it does not declare that it invalidates it: {after[name]}"
            )
    return problems


def _describe_change(before: tuple, after: tuple) -> str:
    def show(entry) -> str:
        role, name, shape, dtype = entry
        return f"{role} '{name}' {dtype}[{','.join(map(str, shape))}]"

    removed = [show(e) for e in before if e not in after]
    added = [show(e) for e in after if e not in before]
    return f"{'; '.join(removed) or 'nothing'} became {'; '.join(added) or 'nothing'}"


class Fingerprint:
    """A cheap structural fingerprint of a graph: its nodes, their ops, attributes and the
    identity, names and types of the values they read and write. Two fingerprints of the
    same graph compare equal unless a pass changed its structure or replaced a constant.

    It keeps the fingerprinted values alive, so that Python cannot reuse their ``id`` for new
    objects while the fingerprint exists.
    """

    def __init__(self, graph: Graph):
        keep: list[Any] = []

        def value_key(value) -> tuple:
            keep.append(value)
            data = value.data if isinstance(value, Constant) else None
            keep.append(data)
            return (id(value), value.name, value.shape, value.dtype, id(data))

        nodes = []
        for node in graph.nodes:
            keep.append(node)
            nodes.append((
                id(node), node.name, node.op, repr(sorted(node.attrs.items())),
                tuple(value_key(v) for v in node.inputs),
                tuple(value_key(v) for v in node.outputs),
            ))
        self.key = (
            tuple(value_key(v) for v in graph.inputs),
            tuple(value_key(v) for v in graph.outputs),
            tuple(nodes),
        )
        self._keep = keep

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)
