"""Patterns and rewrite rules for local graph rewrites.

A pattern reads like the expression it matches. This one matches ``x * clip(x + 3, 0, 6) / 6``
where ``x`` is any value, read at both places::

    x = Var("x")
    Op("div", Op("mul", x, Op("clip", Op("add", x, Const(equals=3.0)), min=0.0, max=6.0)),
       Const(equals=6.0))

``Op`` matches a node by op name, its inputs (in either order for add, mul, maximum and
minimum) and its attributes. ``Var`` matches any value and binds it, ``Const`` a constant.
Every node of a match except the root must write a single value that only the next node of the
match reads, so that a rewrite can remove the whole match.

A rule pairs a pattern with a rewrite function that returns the replacement nodes, or None to
leave the match alone. ``apply_rules`` runs a table of rules until none applies.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphcomp.errors import ShapeError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.shapes import infer_node

logger = logging.getLogger(__name__)

COMMUTATIVE_OPS = frozenset({"add", "mul", "maximum", "minimum"})


class GraphIndex:
    """Producers, consumers and graph outputs of a graph, computed once for matching."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._producers = graph.producers()
        self._consumers = graph.consumers()
        self._outputs = {id(v) for v in graph.outputs}

    def producer(self, value: Value) -> Node | None:
        return self._producers.get(value)

    def consumers(self, value: Value) -> list[Node]:
        """Nodes that read ``value``, once per input slot (``mul(x, x)`` counts twice)."""
        return self._consumers.get(value, [])

    def is_graph_output(self, value: Value) -> bool:
        return id(value) in self._outputs

    def is_private(self, value: Value) -> bool:
        """True when one input slot of one node reads ``value`` and it is not a graph output."""
        return len(self.consumers(value)) == 1 and not self.is_graph_output(value)


@dataclass
class Match:
    """A pattern matched at ``root``: the matched nodes (root first) and the named bindings."""

    root: Node
    nodes: list[Node] = field(default_factory=list)
    bindings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def extended(self) -> "Match":
        return Match(self.root, list(self.nodes), dict(self.bindings))


class Pattern:
    """Base class: ``match_value`` extends a match by one value, or returns None."""

    def match_value(self, value: Value, index: GraphIndex, match: Match) -> Match | None:
        raise NotImplementedError


def _bind(match: Match, name: str | None, item: Any) -> Match | None:
    if name is None:
        return match
    bound = match.bindings.get(name)
    if bound is not None:
        return match if bound is item else None
    result = match.extended()
    result.bindings[name] = item
    return result


class Var(Pattern):
    """Any value, bound to ``name``; a name used twice must match the same value."""

    def __init__(self, name: str | None = None, where: Callable[[Value], bool] | None = None):
        self.name = name
        self.where = where

    def match_value(self, value, index, match):
        if self.where is not None and not self.where(value):
            return None
        return _bind(match, self.name, value)


class Const(Pattern):
    """A constant, optionally one whose every element equals ``equals`` (relative 1e-6)."""

    def __init__(
        self,
        name: str | None = None,
        *,
        equals: float | None = None,
        where: Callable[[Constant], bool] | None = None,
    ):
        self.name = name
        self.equals = equals
        self.where = where

    def match_value(self, value, index, match):
        if not isinstance(value, Constant):
            return None
        if self.equals is not None and not constant_equals(value, self.equals):
            return None
        if self.where is not None and not self.where(value):
            return None
        return _bind(match, self.name, value)


class Op(Pattern):
    """A node of op ``op`` (a name or a tuple of names) with matching inputs and attributes.

    ``inputs`` left empty matches any inputs. Each keyword names an attribute and gives the
    value it must have (floats compare with relative tolerance 1e-6, a missing attribute is
    None) or a predicate on that value. ``where`` is a predicate on the node.
    """

    def __init__(
        self,
        op: str | tuple[str, ...],
        *inputs: Pattern,
        name: str | None = None,
        where: Callable[[Node], bool] | None = None,
        **attrs: Any,
    ):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.inputs = inputs
        self.name = name
        self.where = where
        self.attrs = attrs

    def match_node(self, node: Node, index: GraphIndex) -> Match | None:
        """Match this pattern with ``node`` as the root."""
        return self._match(node, index, Match(node))

    def match_value(self, value, index, match):
        node = index.producer(value)
        if node is None or len(node.outputs) != 1 or not index.is_private(value):
            return None
        return self._match(node, index, match)

    def _match(self, node: Node, index: GraphIndex, match: Match) -> Match | None:
        if node.op not in self.ops or not self._node_fits(node):
            return None
        match = _bind(match, self.name, node)
        if match is None:
            return None
        match = match.extended()
        match.nodes.append(node)
        if not self.inputs:
            return match
        if len(node.inputs) != len(self.inputs):
            return None
        orders = [list(node.inputs)]
        if node.op in COMMUTATIVE_OPS and len(node.inputs) == 2:
            orders.append(list(reversed(node.inputs)))
        for values in orders:
            result: Match | None = match
            for pattern, value in zip(self.inputs, values):
                result = pattern.match_value(value, index, result)
                if result is None:
                    break
            if result is not None:
                return result
        return None

    def _node_fits(self, node: Node) -> bool:
        for key, expected in self.attrs.items():
            actual = node.attrs.get(key)
            if callable(expected):
                if not expected(actual):
                    return False
            elif not _attr_equals(actual, expected):
                return False
        return self.where is None or self.where(node)


def _attr_equals(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return bool(np.isclose(actual, expected, rtol=1e-6, atol=0.0))
    return actual == expected


def constant_equals(value: Constant, number: float) -> bool:
    """True when every element of ``value`` equals ``number`` up to relative 1e-6."""
    data = value.data
    if data.size == 0 or not np.issubdtype(data.dtype, np.number):
        return False
    return bool(np.allclose(data, number, rtol=1e-6, atol=0.0))


def channel_vector(value: Constant, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """Return ``value`` as a vector over dim ``axis`` of ``out_shape``, or None.

    This works when adding ``value`` to a tensor of shape ``out_shape`` adds one number per
    index of ``axis`` and leaves the shape unchanged: ``[C]`` for the last axis, ``[1,C,1,1]``
    or ``[C,1,1]`` for channels of NCHW, or a scalar.
    """
    rank = len(out_shape)
    axis = axis % rank
    shape = value.shape
    if len(shape) > rank:
        return None
    aligned = (1,) * (rank - len(shape)) + tuple(shape)
    channels = out_shape[axis]
    for dim, (size, out_size) in enumerate(zip(aligned, out_shape)):
        allowed = (1, channels) if dim == axis else (1,)
        if size not in allowed or (size != 1 and size != out_size):
            return None
    flat = np.asarray(value.data).reshape(-1)
    return np.broadcast_to(flat, (channels,)).copy()


# --- rules --------------------------------------------------------------------------------------

RewriteFn = Callable[[Graph, Match], "list[Node] | None"]


@dataclass(frozen=True)
class Rule:
    """A named local rewrite: where ``pattern`` matches, ``rewrite`` returns the new nodes.

    The new nodes must write the root's output values (so names and graph outputs stay) and
    be fewer than the matched nodes, which guarantees that ``apply_rules`` ends.
    """

    name: str
    pattern: Op
    rewrite: RewriteFn


def replace_match(graph: Graph, match: Match, new_nodes: list[Node]) -> bool:
    """Replace the matched nodes with ``new_nodes`` and return True.

    Return False and change nothing when shape inference gives a root output another shape or
    dtype than it has now, because readers of that output expect its current type.
    """
    root_outputs = {id(v) for v in match.root.outputs}
    for node in new_nodes:
        try:
            inferred = infer_node(node)
        except ShapeError as exc:
            logger.debug("rewrite at '%s' rejected: %s", match.root.name, exc)
            return False
        for value, (shape, dtype) in zip(node.outputs, inferred):
            if id(value) in root_outputs:
                if tuple(shape) != value.shape or dtype != value.dtype:
                    logger.debug("rewrite at '%s' rejected: %s becomes %s%s",
                                 match.root.name, value.type_str(), dtype, shape)
                    return False
            else:
                value.shape = tuple(shape)
                value.dtype = dtype
    matched = {id(n) for n in match.nodes}
    last = max(i for i, n in enumerate(graph.nodes) if id(n) in matched)
    graph.nodes[last + 1:last + 1] = new_nodes
    graph.remove_nodes(match.nodes)
    return True


def apply_rules(graph: Graph, rules: tuple[Rule, ...], created_by: str) -> Counter[str]:
    """Apply ``rules`` in topological order until none matches; return the count per rule.

    At each node the first rule (in table order) that matches and rewrites wins. New nodes get
    ``created_by``.
    """
    counts: Counter[str] = Counter()
    changed = True
    while changed:
        changed = False
        index = GraphIndex(graph)
        removed: set[int] = set()
        for node in list(graph.nodes):
            if id(node) in removed:
                continue
            for rule in rules:
                match = rule.pattern.match_node(node, index)
                if match is None:
                    continue
                new_nodes = rule.rewrite(graph, match)
                if new_nodes is None:
                    continue
                if len(new_nodes) >= len(match.nodes):
                    raise RuntimeError(
                        f"rule '{rule.name}' replaced {len(match.nodes)} nodes with "
                        f"{len(new_nodes)}; a rule must shrink the graph"
                    )
                if not replace_match(graph, match, new_nodes):
                    continue
                for new_node in new_nodes:
                    new_node.created_by = created_by
                removed.update(id(n) for n in match.nodes)
                counts[rule.name] += 1
                changed = True
                index = GraphIndex(graph)
                break
    return counts


def new_constant(graph: Graph, base: str, data: np.ndarray) -> Constant:
    """Create a constant with a name that no value or node of ``graph`` uses yet."""
    return Constant(graph.unique_name(base), np.require(data, requirements="C"))


def bypass_node(graph: Graph, index: GraphIndex, node: Node, replacement: Value) -> bool:
    """Make readers of ``node``'s single output read ``replacement`` and remove ``node``.

    When that output is a graph output, ``replacement`` takes over its name so that the graph's
    interface stays the same. That is impossible when ``replacement`` is a graph input, a
    constant or already a graph output; then nothing changes and the result is False.
    """
    output = node.output
    if index.is_graph_output(output):
        renamable = index.producer(replacement) is not None and not index.is_graph_output(
            replacement
        )
        if not renamable or isinstance(replacement, Constant):
            return False
        replacement.name = output.name
    graph.replace_uses(output, replacement)
    graph.remove_nodes([node])
    return True
