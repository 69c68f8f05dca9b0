"""Coupled-channel analysis: which channel positions of a graph must be removed together.

A *position* is one index along the channel axis of one value: channel 3 of a conv output, or
feature 80 of a flattened tensor. Removing a position forces removals elsewhere:

- the layer that writes the value loses a filter (a weight row) and its bias entry, and every
  layer that reads the value loses the matching weight column;
- batch_norm, layer_norm, unary elementwise ops, pooling, resize and transpose pass a position
  through to their output;
- add, mul and the other broadcasting elementwise ops tie together the positions of all inputs
  that have the full channel count, so a residual add ties the channels of both branches;
- concat and split shift positions by each piece's offset. A tensor concatenated with itself
  puts each of its positions at two places of the result;
- a depthwise conv ties input channel c to its output channels, and a grouped conv ties the
  same index of every group;
- a reshape ties the positions of the axes that it merges or splits. Flattening [N, C, 5, 5]
  to [N, 25 C] ties channel c to features 25 c .. 25 c + 24. Splitting [B, S, 384] into
  [B, S, 12, 32] tracks the outer axis, so each block of 32 features becomes one attention
  head, and the batched matmuls of attention tie head h of the query, key and value.

A *unit* is a smallest set of positions that must be removed together (union-find over all
positions). A *group* is the set of units that touch the same values, for example the filters
of one conv and everything they flow into. Pruning removes whole units of a group. Every value
of a group contains positions of every unit, so a value keeps positions as long as its group
keeps a unit.

Example: ``y = bn(conv_a(x)); z = conv_b(concat(y, y))`` with 8 channels in ``y``::

    unit i = {conv_a.out[i], bn.out[i], concat.out[i], concat.out[i + 8]}, i = 0..7
    one group of 8 units. Removing units 1 and 5: conv_a loses filters 1 and 5, bn its
    entries 1 and 5, conv_b its input columns 1, 5, 9 and 13.

A group cannot be pruned (``ChannelGroup.fixed`` says why) when its positions reach a graph
output or a graph input, or an op whose effect on channels the analysis does not model: an op
without a channel rule, or a known op applied along the channel axis in a way that the rules
do not cover (softmax over channels, a strided slice of channels). The analysis logs a warning
naming such nodes and their op. It never guesses.
"""

from __future__ import annotations

import itertools
import logging
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from graphcomp.ir import Constant, Graph, Node, Value

logger = logging.getLogger(__name__)

# Ops whose output channels are new filters, weight rows (or embedding columns), when their
# second input is a constant (see ``is_layer``).
LAYER_OPS = frozenset({"conv2d", "conv_transpose2d", "linear", "matmul", "embedding"})

UNARY_OPS = frozenset({
    "relu", "sigmoid", "tanh", "erf", "sqrt", "rsqrt", "exp", "log", "neg", "abs", "reciprocal",
    "identity", "silu", "hardswish", "logical_not", "gelu", "hardsigmoid", "clip", "cast",
})
BROADCAST_OPS = frozenset({
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "equal", "less", "greater",
    "greater_equal", "logical_and", "not_equal", "less_equal", "logical_or", "logical_xor",
    "where",
})
# Ops that work on dims 2 and 3 of an NCHW tensor and keep dims 0 and 1.
SPATIAL_OPS = frozenset({
    "max_pool2d", "avg_pool2d", "global_avg_pool", "adaptive_avg_pool2d", "resize",
})

# Levels of the reasons that fix a group. INTERFACE reasons (graph inputs and outputs) are
# expected and logged at debug level. UNSUPPORTED and UNKNOWN ones are warnings naming the node.
INTERFACE, UNSUPPORTED, UNKNOWN = "interface", "unsupported", "unknown"


def is_layer(node: Node) -> bool:
    """True for a conv, linear, embedding or matmul node whose weight is a constant."""
    return node.op in LAYER_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], Constant)


@dataclass
class ChannelGroup:
    """Units of coupled channel positions that touch the same values."""

    index: int
    name: str  # the first layer that writes the group's channels, else the first node
    layers: tuple[str, ...]  # layers whose filters (weight rows) are the group's channels
    nodes: tuple[str, ...]  # every node whose output carries the group's channels
    units: int
    unit_width: int  # positions per unit on the group's first value (32 for a 32-dim head)
    fixed: str | None = None  # why the group cannot be pruned; None when it can
    normalized_by: tuple[str, ...] = ()  # layer_norm nodes whose statistics span the channels

    @property
    def prunable(self) -> bool:
        """True when the group may lose units: not fixed, and more than one unit."""
        return self.fixed is None and self.units > 1


@dataclass
class ChannelAnalysis:
    """The channel axis of each tracked value and the unit of each of its positions.

    ``unit_ids[value][i]`` is the global unit id of position ``i`` of ``value`` along
    ``axes[value]``. Group ``g`` owns global ids ``unit_offsets[g] .. unit_offsets[g] +
    groups[g].units - 1``; ``unit_group`` maps a global id to its group.
    """

    graph: Graph
    axes: dict[Value, int]
    unit_ids: dict[Value, np.ndarray]
    groups: list[ChannelGroup]
    unit_offsets: np.ndarray
    unit_group: np.ndarray = field(repr=False)

    @property
    def total_units(self) -> int:
        return int(len(self.unit_group))

    def unit_index(self, value: Value) -> tuple[np.ndarray, np.ndarray]:
        """Return (group, unit within the group) of each position of a tracked ``value``."""
        ids = self.unit_ids[value]
        groups = self.unit_group[ids]
        return groups, ids - self.unit_offsets[groups]

    def group_of(self, value: Value, position: int = 0) -> ChannelGroup:
        """Return the group of one position of a tracked ``value``."""
        return self.groups[int(self.unit_group[self.unit_ids[value][position]])]

    def keep_masks(self, removed: Mapping[int, Iterable[int]]) -> dict[Value, np.ndarray]:
        """Return, for each value that loses positions, a bool mask of the positions it keeps.

        ``removed`` maps a group index to the unit indices to remove from it. Raises ValueError
        for a group that cannot be pruned, a unit out of range, or a group left without units.
        """
        flags = np.zeros(self.total_units, dtype=bool)
        for group_index, units in removed.items():
            group = self.groups[group_index]
            chosen = np.unique(np.asarray(list(units), dtype=np.int64))
            if chosen.size == 0:
                continue
            if group.fixed is not None:
                raise ValueError(f"group '{group.name}' cannot be pruned: {group.fixed}")
            if chosen[0] < 0 or chosen[-1] >= group.units:
                raise ValueError(
                    f"group '{group.name}' has units 0..{group.units - 1}, got {chosen.tolist()}"
                )
            if chosen.size >= group.units:
                raise ValueError(f"removing {chosen.size} units would empty group '{group.name}'")
            flags[self.unit_offsets[group_index] + chosen] = True
        masks = {}
        for value, ids in self.unit_ids.items():
            lost = flags[ids]
            if lost.any():
                masks[value] = ~lost
        return masks


def analyze_channels(graph: Graph) -> ChannelAnalysis:
    """Find the channel groups of ``graph`` (see the module docstring)."""
    analyzer = _Analyzer(graph)
    for node in graph.nodes:
        rule = _RULES.get(node.op)
        if rule is not None:
            rule(analyzer, node)
        elif any(v in analyzer.axes for v in node.inputs):
            analyzer.unsupported(node, f"op '{node.op}' has no channel rule", UNKNOWN)
    for value in graph.outputs:
        if value in analyzer.axes:
            analyzer.fix(value, None, f"reaches graph output '{value.name}'", INTERFACE)
    return analyzer.finish()


# --- the analyzer: tracked values and union-find over their positions ---------------------------


@dataclass
class _Fix:
    slots: np.ndarray
    reason: str
    level: str
    node: str | None


class _Analyzer:
    """Assigns slots (global position numbers) to tracked values and unions coupled slots."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.axes: dict[Value, int] = {}
        self.base: dict[Value, int] = {}
        self.parent: list[int] = []
        self.fixes: list[_Fix] = []
        self.normalizers: list[tuple[int, str]] = []  # (a slot, layer_norm node name)

    # --- slots ---

    def axis(self, value: Value) -> int | None:
        return self.axes.get(value)

    def channels(self, value: Value) -> int:
        return value.shape[self.axes[value]]

    def track(self, value: Value, axis: int) -> None:
        """Give ``value`` new slots along ``axis``; a value is tracked once, by its producer."""
        if value in self.axes:
            raise RuntimeError(f"value '{value.name}' is tracked twice")
        axis %= value.rank
        self.axes[value] = axis
        self.base[value] = len(self.parent)
        start = len(self.parent)
        self.parent.extend(range(start, start + value.shape[axis]))

    def slots(self, value: Value, positions: np.ndarray | None = None) -> np.ndarray:
        base = self.base[value]
        if positions is None:
            return np.arange(base, base + self.channels(value))
        return base + np.asarray(positions, dtype=np.int64)

    def _find(self, slot: int) -> int:
        parent = self.parent
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def couple(self, a: Value, a_positions, b: Value, b_positions) -> None:
        """Tie position ``a_positions[k]`` of ``a`` to ``b_positions[k]`` of ``b`` for every k;
        None means every position, in order."""
        for left, right in zip(self.slots(a, a_positions).tolist(),
                               self.slots(b, b_positions).tolist()):
            root_left, root_right = self._find(left), self._find(right)
            if root_left != root_right:
                # The smaller slot stays the root, so units are numbered in graph order.
                low, high = sorted((root_left, root_right))
                self.parent[high] = low

    def follow(self, node: Node, source: Value, out: Value, out_axis: int) -> None:
        """Track ``out`` along ``out_axis`` with each position tied to the same one of
        ``source``."""
        self.track(out, out_axis)
        self.couple(source, None, out, None)

    def fix(self, value: Value, positions, reason: str, level: str,
            node: Node | None = None) -> None:
        """Mark positions of a tracked ``value`` (all when None) as never removable."""
        self.fixes.append(_Fix(self.slots(value, positions), reason, level,
                               None if node is None else node.name))

    def unsupported(self, node: Node, reason: str, level: str = UNSUPPORTED) -> None:
        """Fix every tracked input of ``node`` and leave its outputs untracked."""
        for value in node.inputs:
            if value in self.axes:
                self.fix(value, None, f"node '{node.name}' (op {node.op}): {reason}", level, node)

    def consume(self, node: Node, value: Value, axis: int) -> None:
        """Fix ``value``'s positions unless the layer reads its channel dim (``axis``) as weight
        columns."""
        tracked = self.axes.get(value)
        if tracked is not None and tracked != axis % value.rank and self.channels(value) > 1:
            self.fix(value, None,
                     f"node '{node.name}' (op {node.op}) reads dim {axis % value.rank}, "
                     f"not the channel dim {tracked}", UNSUPPORTED, node)

    def join(self, node: Node, out: Value, out_axis: int,
             members: list[tuple[Value, int | None]], handled: tuple[Value, ...] = ()) -> None:
        """Tie ``out`` along ``out_axis`` to each member (an input and its dim aligned with
        ``out_axis``, None when it has none). Constants and size-1 dims broadcast and tie
        nothing. A non-constant member of full size that is not tracked on that dim fixes the
        output, because its channels cannot be removed. Members in ``handled`` have their
        tracked dim tied elsewhere (the contracted dim of a matmul)."""
        size = out.shape[out_axis]
        tied: list[Value] = []
        blockers: list[Value] = []
        for value, dim in members:
            tracked = None if value in handled else self.axes.get(value)
            if tracked is not None and tracked != dim and self.channels(value) > 1:
                self.fix(value, None,
                         f"node '{node.name}' (op {node.op}) broadcasts its channel dim "
                         f"{tracked} against dim {out_axis} of the output", UNSUPPORTED, node)
                tracked = None
            if dim is None or value.shape[dim] == 1 or isinstance(value, Constant):
                continue
            if tracked == dim and value.shape[dim] == size:
                tied.append(value)
            else:
                blockers.append(value)
        if not tied:
            return
        self.track(out, out_axis)
        for value in tied:
            self.couple(value, None, out, None)
        for value in blockers:
            self.fix(out, None, f"node '{node.name}' (op {node.op}) combines the channels with "
                     f"'{value.name}', whose channels cannot be removed", INTERFACE, node)

    # --- groups ---

    def finish(self) -> ChannelAnalysis:
        roots = np.fromiter((self._find(s) for s in range(len(self.parent))), dtype=np.int64,
                            count=len(self.parent))
        values = list(self.base)
        value_roots = [roots[self.slots(v)] for v in values]
        signature_of_root: dict[int, list[int]] = {}
        for value_index, its_roots in enumerate(value_roots):
            for root in np.unique(its_roots).tolist():
                signature_of_root.setdefault(root, []).append(value_index)

        group_of_signature: dict[tuple[int, ...], int] = {}
        counts: list[int] = []
        unit_of_root: dict[int, tuple[int, int]] = {}
        for root in sorted(signature_of_root):
            signature = tuple(signature_of_root[root])
            group_index = group_of_signature.setdefault(signature, len(counts))
            if group_index == len(counts):
                counts.append(0)
            unit_of_root[root] = (group_index, counts[group_index])
            counts[group_index] += 1

        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        global_of_root = np.zeros(len(self.parent), dtype=np.int64)
        for root, (group_index, unit) in unit_of_root.items():
            global_of_root[root] = offsets[group_index] + unit
        unit_group = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        unit_ids = {v: global_of_root[r] for v, r in zip(values, value_roots)}

        producers = self.graph.producers()
        groups = [
            self._describe(index, [values[i] for i in signature], counts[index], producers)
            for signature, index in group_of_signature.items()
        ]
        groups.sort(key=lambda g: g.index)
        self._attach_fixes(groups, global_of_root[roots], unit_group)
        self._attach_normalizers(groups, global_of_root[roots], unit_group)
        return ChannelAnalysis(self.graph, dict(self.axes), unit_ids, groups, offsets[:-1],
                               unit_group)

    def _describe(self, index: int, values: list[Value], units: int,
                  producers: dict[Value, Node]) -> ChannelGroup:
        nodes = [producers[v] for v in values if v in producers]
        layers = [n.name for n in nodes if is_layer(n)]
        names = [n.name for n in nodes]
        first = values[0]
        width = self.channels(first) // units
        name = first.name
        if layers:
            name = layers[0]
        elif names:
            name = names[0]
        return ChannelGroup(index, name, tuple(layers), tuple(names), units, width)

    def _attach_fixes(self, groups, unit_of_slot: np.ndarray, unit_group: np.ndarray) -> None:
        interface: set[int] = set()
        # Graph inputs and outputs are the root cause when present, so their reasons come first.
        ordered = sorted(self.fixes, key=lambda f: f.level != INTERFACE)
        for fix in ordered:
            for group_index in np.unique(unit_group[unit_of_slot[fix.slots]]).tolist():
                group = groups[group_index]
                if group.fixed is None:
                    group.fixed = fix.reason
                if fix.level == INTERFACE:
                    interface.add(group_index)
        warned: set[str] = set()
        for fix in self.fixes:
            if fix.level == INTERFACE or fix.node in warned:
                continue
            touched = np.unique(unit_group[unit_of_slot[fix.slots]]).tolist()
            # A group that reaches a graph input or output stays whole anyway, so a known op
            # that blocks it changes nothing worth a warning. Unknown ops are always reported.
            if fix.level == UNSUPPORTED and all(g in interface for g in touched):
                logger.debug("%s", fix.reason)
                continue
            warned.add(fix.node)
            names = ", ".join(groups[g].name for g in touched)
            logger.warning("%s; channels of group(s) %s are not pruned", fix.reason, names)

    def _attach_normalizers(self, groups, unit_of_slot, unit_group) -> None:
        for slot, node_name in self.normalizers:
            group = groups[int(unit_group[unit_of_slot[slot]])]
            if node_name not in group.normalized_by:
                group.normalized_by = (*group.normalized_by, node_name)


# --- channel rules, one per op family --------------------------------------------------------

Rule = Callable[[_Analyzer, Node], None]
_RULES: dict[str, Rule] = {}


def _rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for op in ops:
            _RULES[op] = function
        return function
    return register


def _constant_params(node: Node) -> bool:
    return all(isinstance(v, Constant) for v in node.inputs[1:])


@_rule(*UNARY_OPS)
def _unary(an: _Analyzer, node: Node) -> None:
    # y = f(x) elementwise: position i of y is position i of x.
    x = node.inputs[0]
    if x in an.axes:
        an.follow(node, x, node.outputs[0], an.axes[x])


@_rule(*BROADCAST_OPS)
def _broadcast(an: _Analyzer, node: Node) -> None:
    # y = a + b with NumPy broadcasting: inputs with the full channel count share positions.
    out = node.outputs[0]
    # Broadcasting keeps a dim of more than one entry as it is, so the first tracked input with
    # more than one channel gives the output's channel dim.
    tracked = [v for v in node.inputs if v in an.axes and an.channels(v) > 1]
    if not tracked:
        return
    out_axis = an.axes[tracked[0]] + out.rank - tracked[0].rank
    members = []
    for value in node.inputs:
        dim = out_axis - (out.rank - value.rank)
        members.append((value, dim if dim >= 0 else None))
    an.join(node, out, out_axis, members)


@_rule("conv2d")
def _conv2d(an: _Analyzer, node: Node) -> None:
    # weight [O, C / groups, kH, kW]: filters are new channels; the input is read per group.
    x, weight, out = node.inputs[0], node.inputs[1], node.outputs[0]
    if not _constant_params(node):
        an.unsupported(node, "weights are not constants")
        return
    an.consume(node, x, 1)
    an.track(out, 1)
    groups = int(node.attrs.get("groups", 1))
    _tie_groups(an, node, x, out, groups, in_per_group=weight.shape[1],
                out_per_group=weight.shape[0] // groups)


@_rule("conv_transpose2d")
def _conv_transpose2d(an: _Analyzer, node: Node) -> None:
    # weight [C, O / groups, kH, kW]: like conv2d with the roles of the weight axes swapped.
    x, weight, out = node.inputs[0], node.inputs[1], node.outputs[0]
    if not _constant_params(node):
        an.unsupported(node, "weights are not constants")
        return
    an.consume(node, x, 1)
    an.track(out, 1)
    groups = int(node.attrs.get("groups", 1))
    _tie_groups(an, node, x, out, groups, in_per_group=weight.shape[0] // groups,
                out_per_group=weight.shape[1])


def _tie_groups(an: _Analyzer, node: Node, x: Value, out: Value, groups: int,
                in_per_group: int, out_per_group: int) -> None:
    if groups == 1:
        return
    if in_per_group == 1:
        # Depthwise: input channel c alone makes outputs c * m .. c * m + m - 1, and the
        # number of groups follows the number of input channels.
        if an.axis(x) != 1:
            an.fix(out, None, f"depthwise node '{node.name}' (op {node.op}) reads an input "
                   "whose channels cannot be removed", INTERFACE, node)
            return
        inputs = np.repeat(np.arange(groups), out_per_group)
        an.couple(x, inputs, out, np.arange(groups * out_per_group))
        return
    # Grouped: every group must keep as many channels as the others, so index j of every
    # group goes together, on the input side and on the output side.
    for value, per_group in ((x, in_per_group), (out, out_per_group)):
        if an.axis(value) != 1:
            continue
        for offset in range(1, groups):
            positions = np.arange(per_group)
            an.couple(value, positions, value, positions + offset * per_group)


@_rule("linear")
def _linear(an: _Analyzer, node: Node) -> None:
    # weight [out, in]: rows are new channels on the last dim, columns read the input's last dim.
    x, out = node.inputs[0], node.outputs[0]
    if not _constant_params(node):
        an.unsupported(node, "weights are not constants")
        return
    an.consume(node, x, x.rank - 1)
    an.track(out, out.rank - 1)


@_rule("embedding")
def _embedding(an: _Analyzer, node: Node) -> None:
    # table [V, D]: the D columns are new channels on the last dim of the output.
    ids, table = node.inputs
    if ids in an.axes or not isinstance(table, Constant):
        an.unsupported(node, "ids computed from channels or a table that is not a constant")
        return
    an.track(node.outputs[0], node.outputs[0].rank - 1)


@_rule("matmul")
def _matmul(an: _Analyzer, node: Node) -> None:
    a, b = node.inputs
    out = node.outputs[0]
    if isinstance(b, Constant) and b.rank == 2 and a.rank >= 2:
        # x @ W with W [in, out]: a linear layer without bias.
        an.consume(node, a, a.rank - 1)
        an.track(out, out.rank - 1)
        return
    if isinstance(a, Constant) or isinstance(b, Constant) or a.rank < 2 or b.rank < 2:
        an.unsupported(node, "matmul with a constant operand other than a 2-D right-hand weight "
                       "or with a 1-D operand")
        return
    _batched_matmul(an, node)


def _batched_matmul(an: _Analyzer, node: Node) -> None:
    # [..., M, K] @ [..., K, N]: batch dims broadcast as in add, M and N pass to the output, and
    # the contracted K positions of both operands go together (query @ key^T over head dims).
    a, b = node.inputs
    out = node.outputs[0]
    a_axis, b_axis = an.axis(a), an.axis(b)
    contracted = []
    if a_axis == a.rank - 1:
        contracted.append(a)
    if b_axis == b.rank - 2:
        contracted.append(b)
    if len(contracted) == 2:
        an.couple(a, None, b, None)
    elif contracted:
        an.fix(contracted[0], None, f"node '{node.name}' (op matmul) contracts the channel dim "
               "with an operand whose channels cannot be removed", INTERFACE, node)

    candidates = []
    if a_axis is not None and a not in contracted:
        candidates.append(a_axis + out.rank - a.rank)
    if b_axis is not None and b not in contracted:
        candidates.append(out.rank - 1 if b_axis == b.rank - 1 else b_axis + out.rank - b.rank)
    if not candidates:
        return
    out_axis = candidates[0]
    if out_axis == out.rank - 2:  # rows: only a has them
        members = [(a, a.rank - 2), (b, None)]
    elif out_axis == out.rank - 1:  # columns: only b has them
        members = [(a, None), (b, b.rank - 1)]
    else:
        members = []
        for value in (a, b):
            dim = out_axis - (out.rank - value.rank)
            members.append((value, dim if dim >= 0 else None))
    an.join(node, out, out_axis, members, handled=tuple(contracted))


@_rule("batch_norm")
def _batch_norm(an: _Analyzer, node: Node) -> None:
    # Per-channel scale, shift, mean and variance over dim 1.
    x = node.inputs[0]
    if x not in an.axes:
        return
    if an.axes[x] != 1 or not _constant_params(node):
        an.unsupported(node, "normalizes another dim than the channels, or has computed "
                       "parameters")
        return
    an.follow(node, x, node.outputs[0], 1)


@_rule("layer_norm")
def _layer_norm(an: _Analyzer, node: Node) -> None:
    # Normalizes over dims axis..rank-1. Removing channels of a normalized dim changes the mean
    # and variance of the rest, so the group records the node (pruning is then not the same as
    # zeroing the channels).
    x = node.inputs[0]
    if x not in an.axes:
        return
    if not _constant_params(node):
        an.unsupported(node, "scale or bias is not a constant")
        return
    axis = an.axes[x]
    an.follow(node, x, node.outputs[0], axis)
    if axis >= int(node.attrs.get("axis", -1)) % x.rank:
        an.normalizers.append((int(an.slots(x)[0]), node.name))


@_rule(*SPATIAL_OPS)
def _spatial(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x not in an.axes:
        return
    if an.axes[x] not in (0, 1):
        an.unsupported(node, "works on the dims that carry the channels")
        return
    an.follow(node, x, node.outputs[0], an.axes[x])


@_rule("softmax")
def _softmax(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x not in an.axes:
        return
    if int(node.attrs.get("axis", -1)) % x.rank == an.axes[x]:
        an.unsupported(node, "normalizes over the channel dim")
        return
    an.follow(node, x, node.outputs[0], an.axes[x])


@_rule("transpose")
def _transpose(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x in an.axes:
        perm = [int(p) % x.rank for p in node.attrs["perm"]]
        an.follow(node, x, node.outputs[0], perm.index(an.axes[x]))


@_rule("reshape", "flatten")
def _reshape(an: _Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    if x not in an.axes or an.channels(x) == 1:
        return
    axis = an.axes[x]
    in_axes, out_axes = reshape_block(x.shape, out.shape, axis)
    in_block = [x.shape[k] for k in in_axes]
    out_block = [out.shape[k] for k in out_axes]
    # Track the outermost output dim of the block that has more than one entry: for a split
    # into [heads, head_dim] that is the heads dim, for a flatten the only dim.
    chosen = next(k for k, size in zip(out_axes, out_block) if size > 1)
    flat = np.arange(int(np.prod(in_block, dtype=np.int64)))
    in_positions = np.unravel_index(flat, in_block)[in_axes.index(axis)]
    out_positions = np.unravel_index(flat, out_block)[out_axes.index(chosen)]
    an.track(out, chosen)
    an.couple(x, in_positions, out, out_positions)


def reshape_block(in_shape, out_shape, axis: int) -> tuple[list[int], list[int]]:
    """Return the input dims and output dims of the smallest block of whole dims around input
    dim ``axis`` that a reshape maps onto each other (their sizes have the same product)."""
    in_prefix = list(itertools.accumulate(in_shape, operator.mul, initial=1))
    out_prefix = list(itertools.accumulate(out_shape, operator.mul, initial=1))
    common = sorted(set(in_prefix) & set(out_prefix))
    low = max(p for p in common if p <= in_prefix[axis])
    high = min(p for p in common if p >= in_prefix[axis + 1])

    def inside(prefix: list[int], count: int) -> list[int]:
        return [k for k in range(count) if low <= prefix[k] and prefix[k + 1] <= high]

    return inside(in_prefix, len(in_shape)), inside(out_prefix, len(out_shape))


@_rule("expand")
def _expand(an: _Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    if x in an.axes:
        an.join(node, out, an.axes[x] + out.rank - x.rank, [(x, an.axes[x])])


@_rule("concat")
def _concat(an: _Analyzer, node: Node) -> None:
    out = node.outputs[0]
    axis = int(node.attrs.get("axis", 0)) % out.rank
    tracked = [an.axes[v] for v in node.inputs if v in an.axes]
    if not tracked:
        return
    if axis not in tracked:
        # Joined along another dim: every input needs the same channels.
        an.join(node, out, tracked[0], [(v, tracked[0]) for v in node.inputs])
        return
    # Joined along the channels: input k's positions move by the sizes of inputs before it.
    an.track(out, axis)
    offset = 0
    for value in node.inputs:
        size = value.shape[axis]
        out_positions = np.arange(offset, offset + size)
        if an.axis(value) == axis:
            an.couple(value, None, out, out_positions)
        else:
            if value in an.axes and an.channels(value) > 1:
                an.fix(value, None, f"node '{node.name}' (op concat) joins along dim {axis}, "
                       f"not the channel dim {an.axes[value]}", UNSUPPORTED, node)
            an.fix(out, out_positions, f"node '{node.name}' (op concat) joins '{value.name}', "
                   "whose channels cannot be removed", INTERFACE, node)
        offset += size


@_rule("split")
def _split(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x not in an.axes:
        return
    axis = int(node.attrs.get("axis", 0)) % x.rank
    offset = 0
    for out in node.outputs:
        if axis == an.axes[x]:
            size = out.shape[axis]
            an.track(out, axis)
            an.couple(x, np.arange(offset, offset + size), out, None)
            offset += size
        else:
            an.follow(node, x, out, an.axes[x])


@_rule("slice")
def _slice(an: _Analyzer, node: Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    if x not in an.axes:
        return
    axis = an.axes[x]
    window = slice_window(node, axis)
    if window is None:
        an.follow(node, x, out, axis)
        return
    start, stop, step = window
    if step != 1:
        an.unsupported(node, f"slices the channel dim with step {step}")
        return
    an.track(out, axis)
    an.couple(x, np.arange(start, stop), out, None)


def slice_window(node: Node, axis: int,
                 shape: tuple[int, ...] | None = None) -> tuple[int, int, int] | None:
    """Return (start, stop, step) of a slice node along ``axis`` with Python semantics, for an
    input of ``shape`` (the input's current shape by default), or None when the node does not
    slice that dim."""
    x = node.inputs[0]
    shape = x.shape if shape is None else shape
    attrs = node.attrs
    axes = [int(a) % x.rank for a in attrs.get("axes", range(len(attrs["starts"])))]
    if axis not in axes:
        return None
    k = axes.index(axis)
    steps = attrs.get("steps") or [1] * len(axes)
    return slice(int(attrs["starts"][k]), int(attrs["ends"][k]), int(steps[k])).indices(
        shape[axis])


@_rule("pad")
def _pad(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x not in an.axes:
        return
    axis = an.axes[x]
    pads = [int(p) for p in node.attrs["pads"]]
    if pads[axis] or pads[axis + x.rank]:
        an.unsupported(node, "pads the channel dim")
        return
    an.follow(node, x, node.outputs[0], axis)


@_rule("gather")
def _gather(an: _Analyzer, node: Node) -> None:
    data, indices = node.inputs
    gather_axis = int(node.attrs.get("axis", 0)) % data.rank
    if indices in an.axes or an.axis(data) == gather_axis:
        an.unsupported(node, "gathers along the channel dim or with computed indices")
        return
    if data in an.axes:
        axis = an.axes[data]
        out_axis = axis if axis < gather_axis else axis + indices.rank - 1
        an.follow(node, data, node.outputs[0], out_axis)


@_rule("reduce_mean", "reduce_sum", "reduce_max")
def _reduce(an: _Analyzer, node: Node) -> None:
    x = node.inputs[0]
    if x not in an.axes:
        return
    axis = an.axes[x]
    axes = node.attrs.get("axes")
    reduced = list(range(x.rank)) if axes is None else sorted(int(a) % x.rank for a in axes)
    if axis in reduced:
        an.unsupported(node, "reduces over the channel dim")
        return
    keep = bool(node.attrs.get("keepdims", True))
    out_axis = axis if keep else axis - sum(1 for r in reduced if r < axis)
    an.follow(node, x, node.outputs[0], out_axis)
