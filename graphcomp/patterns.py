"""Patterns and rewrite rules for local graph rewrites.

A pattern reads like the expression it matches. This one matches ``x * clip(x + 3, 0, 6) / 6``
where ``x`` is any value, read at both places::

    x = Var("x")
    Op("div", Op("mul", x, Op("clip", Op("add", x, Const(equals=3.0)), min=0.0, max=6.0)),
       Const(equals=6.0))

The pattern classes:

- ``Op`` matches a node by op name (``"*"`` or ``AnyOp`` for any op), its inputs (in either
  order for add, mul, maximum and minimum) and its attributes. An attribute is given as the
  value it must have or as a predicate on that value, and ``where`` is a predicate on the node.
- ``Var`` matches any value, ``Const`` a constant: by value (``equals``) or by a predicate on
  the constant (``where=lambda c: (c.data > 0).all()``).
- ``Either`` matches the first of several patterns that fits.

A pattern given a ``name`` binds what it matched under that name, and a name used twice must
match the same value or node. Every node of a match except the root must write a single value
that only nodes of the match read, so that a rewrite can remove the whole match.

``pattern_from_torch`` turns a small PyTorch function into a pattern by tracing it.

A rule pairs a pattern with a rewrite function. The function returns the replacement nodes (the
last of which write the root's outputs), an existing value that replaces the root's output, or
None to leave the match alone. ``rewrite`` runs a table of rules until none applies, and a
``RewritePass`` is a pass made of such a table.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from graphcomp.errors import GraphcompError, ShapeError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.pipeline import Pass, PassContext, PassResult
from graphcomp.shapes import infer_node

logger = logging.getLogger(__name__)

COMMUTATIVE_OPS = frozenset({"add", "mul", "maximum", "minimum"})
ANY_OP = "*"


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

    def __contains__(self, name: str) -> bool:
        return name in self.bindings

    def extended(self) -> "Match":
        return Match(self.root, list(self.nodes), dict(self.bindings))

    def replace_root(self, op: str, inputs: Sequence[Value], **attrs: Any) -> list[Node]:
        """Return a one-node replacement: ``op`` on ``inputs``, writing the root's outputs
        under the root's node name."""
        return [Node(self.root.name, op, list(inputs), list(self.root.outputs), dict(attrs))]


class Pattern:
    """Base class: ``iter_matches`` yields every way to extend a match by one value."""

    name: str | None = None

    def iter_matches(self, value: Value, index: GraphIndex, match: Match) -> Iterator[Match]:
        raise NotImplementedError

    def match_value(self, value: Value, index: GraphIndex, match: Match) -> Match | None:
        """Return the first extension of ``match`` by ``value``, or None."""
        return next(self.iter_matches(value, index, match), None)


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
    """Any value, bound to ``name``; ``where`` is a predicate on the value (its shape, dtype)."""

    def __init__(self, name: str | None = None, where: Callable[[Value], bool] | None = None):
        self.name = name
        self.where = where

    def iter_matches(self, value, index, match):
        if self.where is not None and not self.where(value):
            return
        bound = _bind(match, self.name, value)
        if bound is not None:
            yield bound


class Const(Pattern):
    """A constant, optionally one whose every element equals ``equals`` (relative 1e-6) and
    one for which the predicate ``where`` on the Constant (``c.data`` is its array) is true."""

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

    def iter_matches(self, value, index, match):
        if not isinstance(value, Constant):
            return
        if self.equals is not None and not constant_equals(value, self.equals):
            return
        if self.where is not None and not self.where(value):
            return
        bound = _bind(match, self.name, value)
        if bound is not None:
            yield bound


class Either(Pattern):
    """The first of ``alternatives`` that matches (each is tried in order when matching
    backtracks); ``name`` binds the value matched."""

    def __init__(self, *alternatives: Pattern, name: str | None = None):
        if not alternatives:
            raise ValueError("Either needs at least one pattern")
        self.alternatives = alternatives
        self.name = name

    def iter_matches(self, value, index, match):
        bound = _bind(match, self.name, value)
        if bound is None:
            return
        for alternative in self.alternatives:
            yield from alternative.iter_matches(value, index, bound)


class Op(Pattern):
    """A node of op ``op`` (a name, a tuple of names, or ``"*"`` for any op) with matching
    inputs and attributes.

    ``inputs`` left empty matches any inputs. Each keyword names an attribute and gives the
    value it must have (floats compare with relative tolerance 1e-6, lists element by element,
    a missing attribute is None) or a predicate on that value. ``where`` is a predicate on the
    node. The attributes can also be given as the dict ``attrs``, for names such as ``name``.
    """

    def __init__(
        self,
        op: str | tuple[str, ...],
        *inputs: Pattern,
        name: str | None = None,
        where: Callable[[Node], bool] | None = None,
        attrs: dict[str, Any] | None = None,
        **attr_values: Any,
    ):
        self.ops = None if op == ANY_OP else ((op,) if isinstance(op, str) else tuple(op))
        self.inputs = inputs
        self.name = name
        self.where = where
        self.attrs = {**(attrs or {}), **attr_values}

    def match_node(self, node: Node, index: GraphIndex) -> Match | None:
        """Match this pattern with ``node`` as the root; the first match whose inner nodes
        are read only inside the match wins."""
        for match in self._iter_node(node, index, Match(node)):
            if _inner_values_private(match, index):
                return match
        return None

    def iter_matches(self, value, index, match):
        node = index.producer(value)
        if node is None or len(node.outputs) != 1 or index.is_graph_output(value):
            return
        yield from self._iter_node(node, index, match)

    def _iter_node(self, node: Node, index: GraphIndex, match: Match) -> Iterator[Match]:
        if (self.ops is not None and node.op not in self.ops) or not self._node_fits(node):
            return
        bound = _bind(match, self.name, node)
        if bound is None:
            return
        if not any(n is node for n in bound.nodes):
            bound = bound.extended()
            bound.nodes.append(node)
        if not self.inputs:
            yield bound
            return
        if len(node.inputs) != len(self.inputs):
            return
        orders = [list(node.inputs)]
        if node.op in COMMUTATIVE_OPS and len(node.inputs) == 2:
            orders.append(list(reversed(node.inputs)))
        for values in orders:
            yield from _iter_inputs(list(zip(self.inputs, values)), index, bound)

    def _node_fits(self, node: Node) -> bool:
        for key, expected in self.attrs.items():
            actual = node.attrs.get(key)
            if callable(expected):
                if not expected(actual):
                    return False
            elif not _attr_equals(actual, expected):
                return False
        return self.where is None or self.where(node)


class AnyOp(Op):
    """A node of any op: ``AnyOp(Var("x"), name="node")`` matches any one-input node."""

    def __init__(self, *inputs: Pattern, name: str | None = None,
                 where: Callable[[Node], bool] | None = None, **attr_values: Any):
        super().__init__(ANY_OP, *inputs, name=name, where=where, **attr_values)


def _iter_inputs(pairs: list[tuple[Pattern, Value]], index: GraphIndex,
                 match: Match) -> Iterator[Match]:
    if not pairs:
        yield match
        return
    (pattern, value), rest = pairs[0], pairs[1:]
    for extended in pattern.iter_matches(value, index, match):
        yield from _iter_inputs(rest, index, extended)


def _inner_values_private(match: Match, index: GraphIndex) -> bool:
    matched = {id(n) for n in match.nodes}
    for node in match.nodes[1:]:
        value = node.outputs[0]
        if index.is_graph_output(value):
            return False
        if any(id(reader) not in matched for reader in index.consumers(value)):
            return False
    return True


def _attr_equals(actual: Any, expected: Any) -> bool:
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(actual, (list, tuple))
            and len(actual) == len(expected)
            and all(_attr_equals(a, e) for a, e in zip(actual, expected))
        )
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return bool(np.isclose(actual, expected, rtol=1e-6, atol=0.0))
    if isinstance(expected, np.ndarray) or isinstance(actual, np.ndarray):
        return bool(np.array_equal(actual, expected))
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

RewriteFn = Callable[[Graph, Match], "list[Node] | Value | None"]


@dataclass(frozen=True)
class Rule:
    """A named local rewrite: where ``pattern`` matches, ``rewrite`` returns the replacement.

    The replacement is a list of new nodes whose last nodes write the root's output values (so
    names and graph outputs stay), or an existing value that takes the place of the root's
    single output, or None to leave the match alone.
    """

    name: str
    pattern: Op
    rewrite: RewriteFn


def rule(pattern: Op, name: str | None = None) -> Callable[[RewriteFn], Rule]:
    """Decorator that turns a rewrite function into a Rule named after the function
    (underscores become dashes) unless ``name`` is given::

        @rule(Op("neg", Op("neg", Var("x"))))
        def double_negation(graph, match):  # neg(neg(x)) -> x
            return match["x"]
    """
    def decorate(function: RewriteFn) -> Rule:
        return Rule(name or function.__name__.strip("_").replace("_", "-"), pattern, function)

    return decorate


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


def replace_with_value(graph: Graph, match: Match, replacement: Value) -> bool:
    """Make readers of the root's single output read ``replacement``, then remove the matched
    nodes that nothing reads any more.

    Return False and change nothing when the types differ, or when the root writes a graph
    output that ``replacement`` cannot take over."""
    root = match.root
    if len(root.outputs) != 1:
        return False
    output = root.outputs[0]
    if replacement.shape != output.shape or replacement.dtype != output.dtype:
        logger.debug("rewrite at '%s' rejected: %s replaced by %s", root.name,
                     output.type_str(), replacement.type_str())
        return False
    if not bypass_node(graph, GraphIndex(graph), root, replacement):
        return False
    remaining = [n for n in match.nodes[1:] if any(m is n for m in graph.nodes)]
    while remaining:
        index = GraphIndex(graph)
        dead = [n for n in remaining if not any(
            index.consumers(v) or index.is_graph_output(v) for v in n.outputs)]
        if not dead:
            break
        graph.remove_nodes(dead)
        remaining = [n for n in remaining if all(n is not d for d in dead)]
    return True


def rewrite(graph: Graph, rules: Rule | Sequence[Rule], created_by: str = "rewrite",
            max_rewrites: int | None = None) -> Counter[str]:
    """Apply ``rules`` in topological order until none matches; return the count per rule.

    At each node the first rule (in table order) that matches and rewrites wins. New nodes get
    ``created_by``. A rule whose replacement matches its own pattern again would never end, so
    more than ``max_rewrites`` rewrites (default: ten per node of the graph, plus 100) raise
    RuntimeError naming the last rule applied.
    """
    rules = (rules,) if isinstance(rules, Rule) else tuple(rules)
    limit = max_rewrites if max_rewrites is not None else 10 * len(graph.nodes) + 100
    counts: Counter[str] = Counter()
    changed = True
    while changed:
        changed = False
        index = GraphIndex(graph)
        removed: set[int] = set()
        for node in list(graph.nodes):
            if id(node) in removed:
                continue
            applied = _apply_first(graph, index, node, rules, created_by)
            if applied is None:
                continue
            name, match = applied
            removed.update(id(n) for n in match.nodes)
            counts[name] += 1
            changed = True
            index = GraphIndex(graph)
            if sum(counts.values()) > limit:
                raise RuntimeError(
                    f"rules kept matching after {limit} rewrites, the last one '{name}' at "
                    f"node '{match.root.name}'; a rule whose replacement matches its own "
                    "pattern again never ends"
                )
    return counts


def apply_rules(graph: Graph, rules: tuple[Rule, ...], created_by: str) -> Counter[str]:
    """Apply ``rules`` until none matches; the same as ``rewrite``."""
    return rewrite(graph, rules, created_by)


def _apply_first(graph: Graph, index: GraphIndex, node: Node, rules: tuple[Rule, ...],
                 created_by: str) -> tuple[str, Match] | None:
    for current in rules:
        match = current.pattern.match_node(node, index)
        if match is None:
            continue
        replacement = current.rewrite(graph, match)
        if replacement is None:
            continue
        if isinstance(replacement, Value):
            if replace_with_value(graph, match, replacement):
                return current.name, match
            continue
        if not isinstance(replacement, list) or not all(
                isinstance(n, Node) for n in replacement):
            raise TypeError(
                f"rule '{current.name}' returned {type(replacement).__name__}; a rewrite "
                "returns a list of nodes, a value or None"
            )
        if not replace_match(graph, match, replacement):
            continue
        for new_node in replacement:
            new_node.created_by = created_by
        return current.name, match
    return None


class RewritePass(Pass):
    """A pass made of rewrite rules.

    A subclass sets ``name``, ``summary`` and ``rules`` (a tuple of Rule), or overrides
    ``get_rules`` to build them on first use. ``run`` applies them until none matches and
    counts the rewrites per rule."""

    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def get_rules(cls) -> tuple[Rule, ...]:
        """Return the rules. Override this (with a cache) for rules that are costly to build,
        such as traced patterns, so that listing the passes does not build them."""
        return cls.rules

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = rewrite(graph, self.get_rules(), created_by=self.name)
        return PassResult(changed=bool(counts), details=dict(counts))


def make_node(graph: Graph, op: str, inputs: Sequence[Value], name: str,
              **attrs: Any) -> Node:
    """Create a one-output node (not yet in ``graph``) with a new output value whose shape
    and dtype come from shape inference. ``name`` is the base of its unique names."""
    node_name = graph.unique_name(name)
    node = Node(node_name, op, list(inputs), [Value(node_name, ())], dict(attrs))
    (shape, dtype), = infer_node(node)
    node.outputs[0].shape, node.outputs[0].dtype = tuple(shape), dtype
    return node


# --- patterns traced from PyTorch -------------------------------------------------------------


def pattern_from_torch(function: Callable, example_inputs: Sequence[Any],
                       constants: Sequence[str] = ()) -> Op:
    """Trace ``function`` (tensors in, one tensor out) and return the pattern of its graph.

    The function is traced with graphcomp's PyTorch frontend, so the pattern contains the ops
    that frontend emits, which are the ops that the ONNX frontend emits for the same
    computation. In the pattern:

    - each parameter of ``function`` becomes ``Var(parameter name)``, or ``Const(parameter
      name)`` if it is listed in ``constants`` (weights and epsilons that the matched graph
      must hold as constants);
    - each constant inside the function becomes a ``Const`` with that value;
    - each node becomes an ``Op`` with the traced op, inputs and attributes, named after the
      traced node (as ``format_graph`` shows it), so a rewrite can read it from the match.

    The example inputs fix nothing but the attributes: a ``mean(-1)`` traced on a 3-D example
    matches only a reduce_mean over axis 2. Raises GraphcompError when tracing fails, a
    parameter is unused or the function returns an input or a constant.
    """
    import torch

    from graphcomp.frontends.torch_frontend import import_torch

    parameters = list(inspect.signature(function).parameters)
    unknown = [name for name in constants if name not in parameters]
    if unknown:
        raise ValueError(f"constants {unknown} are not parameters of {function.__name__}"
                         f"({', '.join(parameters)})")

    class TracedFunction(torch.nn.Module):
        def forward(self, *args):
            return function(*args)

    tensors = tuple(torch.as_tensor(x) for x in example_inputs)
    graph = import_torch(TracedFunction().eval(), tensors, input_names=parameters,
                         name=function.__name__)
    if len(graph.outputs) != 1:
        raise GraphcompError(f"pattern function {function.__name__} must return one tensor, "
                             f"it returns {len(graph.outputs)}")
    return _pattern_of_graph(graph, set(constants), function.__name__)


def _pattern_of_graph(graph: Graph, constants: set[str], label: str) -> Op:
    producers = graph.producers()
    inputs = {id(v): v for v in graph.inputs}
    memo: dict[int, Pattern] = {}

    def pattern_of(value: Value) -> Pattern:
        if id(value) in memo:
            return memo[id(value)]
        if id(value) in inputs:
            made: Pattern = Const(value.name) if value.name in constants else Var(value.name)
        elif isinstance(value, Constant):
            made = _constant_check(value)
        else:
            node = producers[value]
            made = Op(node.op, *(pattern_of(v) for v in node.inputs), name=node.name,
                      attrs=dict(node.attrs))
        memo[id(value)] = made
        return made

    output = graph.outputs[0]
    if output not in producers:
        raise GraphcompError(f"pattern function {label} returns an input or a constant, "
                             "not the result of an op")
    root = pattern_of(output)
    used = {v.name for n in graph.nodes for v in n.inputs}
    unused = [v.name for v in graph.inputs if v.name not in used]
    if unused:
        raise GraphcompError(f"pattern function {label} does not use its parameters {unused}")
    return root


def _constant_check(value: Constant) -> Const:
    data = value.data
    flat = data.reshape(-1)
    if flat.size and np.issubdtype(data.dtype, np.number) and np.all(flat == flat[0]):
        return Const(equals=float(flat[0]))
    return Const(where=lambda c: c.shape == data.shape and bool(
        np.allclose(c.data, data, rtol=1e-6, atol=0.0)))


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
