"""Structured pruning: remove whole channels, filters, attention heads and FFN neurons."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from graphcomp.analysis import graph_stats
from graphcomp.dependency import (
    ChannelAnalysis, ChannelGroup, analyze_channels, slice_window,
)
from graphcomp.errors import OptionError, VerificationError
from graphcomp.importance import CRITERIA, unit_scores
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.pipeline import Pass, PassContext, PassResult, register_pass
from graphcomp.shapes import infer_node

logger = logging.getLogger(__name__)

Removal = dict[int, np.ndarray]  # group index -> unit indices to remove


@register_pass
class PruneChannels(Pass):
    """conv(x, W[C_out, C_in]) -> conv(x, W[keep, :]), and every layer reading it W[:, keep]

    Removes the least important units of each channel group found by
    ``graphcomp.dependency.analyze_channels``: conv filters, linear neurons (FFN neurons
    included), and attention heads as whole heads. It also removes what each removed channel
    flows into. That is its batch_norm entries, the weight columns of the layers that read it,
    the matching channel of the other branch of a residual add and of each copy that a concat
    makes. Through a flatten into a linear layer, it is the block of features that the channel
    became (25 after a 5x5 pooling). Fewer channels mean fewer parameters and MACs. The result
    equals the original with the removed channels' contributions zeroed (``masked_reference``),
    except through a layer_norm that normalizes over the channels.

    Options: ``ratio`` (fraction of each group's units to remove, in [0, 1)); ``global``
    (rank units across groups by their score divided by their group's mean, and remove
    ``ratio`` of all units); ``criterion`` (l1, l2, bn, taylor; see ``graphcomp.importance``);
    ``protect`` (fnmatch patterns of node names, separated by ';': groups whose channels flow
    through a matching node keep all units); ``override`` (``pattern=ratio`` pairs separated
    by ';', a ratio per matching group); ``round_to`` (keep a multiple of N channels). A group
    keeps at least one unit, or ``round_to`` channels. Graph inputs and outputs keep their
    shapes. The pass is lossy: it needs fine-tuning (``graphcomp.finetune``) to recover.

    ``bn`` needs the batch_norm nodes, so run prune before fold-bn. ``taylor`` needs
    calibration feeds from the pass manager.

    Does not cover yet: pruning the head dim of attention (whole heads only), grouped convs
    other than by the same index in every group, slices of channels with a step, and ops
    without a channel rule (their groups stay whole, with a warning).

    Example (ratio=0.5, l1; conv1's filters 1 and 3 have the smallest weights)::

        before:
          conv1: %a = conv2d(%x, @w1) -> float32[1,4,4,4]
          act: %r = relu(%a) -> float32[1,4,4,4]
          conv2: %y = conv2d(%r, @w2) -> float32[1,2,4,4]
        after:
          conv1: %a = conv2d(%x, @w1) -> float32[1,2,4,4]
          act: %r = relu(%a) -> float32[1,2,4,4]
          conv2: %y = conv2d(%r, @w2) -> float32[1,2,4,4]
    """

    name = "prune"
    summary = "remove the least important channels, filters, attention heads and FFN neurons"
    lossless = False
    requires = ("float",)  # the channel analysis does not cover quantized ops
    options = {
        "ratio": float, "global": bool, "criterion": str, "protect": str, "override": str,
        "round_to": int,
    }
    choices = {"criterion": CRITERIA}
    defaults = {
        "ratio": 0.5, "global": False, "criterion": "l1", "protect": "", "override": "",
        "round_to": 1,
    }

    def __init__(self, **options):
        super().__init__(**options)
        config = self.config
        check_ratio(config["ratio"], "ratio")
        if config["criterion"] not in CRITERIA:
            raise OptionError(
                f"pass 'prune': unknown criterion '{config['criterion']}'; choose one of "
                f"{', '.join(CRITERIA)}"
            )
        if config["round_to"] < 1:
            raise OptionError(f"pass 'prune': round_to must be at least 1, got "
                              f"{config['round_to']}")
        self.protected = parse_patterns(config["protect"])
        self.overrides = parse_overrides(config["override"])

    def uses_calibration(self) -> bool:
        return self.config["criterion"] == "taylor"  # scores come from the compile inputs

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        analysis = analyze_channels(graph)
        plan = self._plan(analysis)
        details = {"criterion": self.config["criterion"], "groups": len(analysis.groups),
                   "prunable": sum(1 for g in analysis.groups if g.prunable)}
        if not plan.removes_anything():
            return PassResult(changed=False, details={**details, "pruned": 0})

        scores = unit_scores(analysis, self.config["criterion"], ctx.feeds)
        removed = self._select(analysis, plan, scores)
        before = graph_stats(graph)
        remove_units(graph, analysis, removed)
        after = graph_stats(graph)
        details.update({
            "pruned": len(removed),
            "params_before": before.params, "params_after": after.params,
            "macs_before": before.macs, "macs_after": after.macs,
            "kept": [
                {"group": g.name, "kept": g.units - len(removed.get(g.index, ())),
                 "total": g.units, "unit_width": g.unit_width}
                for g in analysis.groups if g.index in plan.groups()
            ],
        })
        logger.info("prune: params %d -> %d, MACs %d -> %d, %d of %d groups pruned",
                    before.params, after.params, before.macs, after.macs, len(removed),
                    len(analysis.groups))
        return PassResult(changed=bool(removed), details=details)

    def _plan(self, analysis: ChannelAnalysis) -> "_Plan":
        """Sort the prunable groups: protected ones stay whole, overridden ones get their own
        ratio, the rest get ``ratio`` each or, with ``global``, go to the shared pool."""
        check_patterns_match(analysis, [*self.protected, *(p for p, _ in self.overrides)])
        plan = _Plan({}, [], self.config["ratio"])
        for group in analysis.groups:
            if not group.prunable or _matches(group, self.protected):
                continue
            override = next((r for p, r in self.overrides if _matches(group, [p])), None)
            if override is not None:
                plan.uniform[group.index] = override
            elif self.config["global"]:
                plan.pool.append(group.index)
            else:
                plan.uniform[group.index] = self.config["ratio"]
        return plan

    def _select(self, analysis: ChannelAnalysis, plan: "_Plan", scores) -> Removal:
        """Return the units to remove from each group: the lowest-scoring ones."""
        groups = analysis.groups
        unscored = [groups[k].name for k in plan.groups() if scores[k] is None]
        if unscored:
            logger.warning("prune: criterion '%s' has no score for group(s) %s; they keep all "
                           "channels", self.config["criterion"], ", ".join(unscored))
        kept_counts: dict[int, int] = {}
        pool = [k for k in plan.pool if scores[k] is not None]
        if pool:
            kept_counts.update(_global_kept(groups, pool, scores, plan.pool_ratio))
        for k, ratio in plan.uniform.items():
            if scores[k] is not None:
                units = groups[k].units
                kept_counts[k] = units - int(math.floor(units * ratio + 1e-9))

        removed: Removal = {}
        for k, kept in kept_counts.items():
            group = groups[k]
            kept = round_kept(group.units, kept, _unit_step(group, self.config["round_to"]))
            if kept < group.units:
                order = np.argsort(scores[k], kind="stable")
                removed[k] = np.sort(order[:group.units - kept])
        return removed


@dataclass
class _Plan:
    """Groups that may lose units: each with its own ratio, or pooled for global ranking."""

    uniform: dict[int, float]
    pool: list[int]
    pool_ratio: float

    def groups(self) -> set[int]:
        return set(self.uniform) | set(self.pool)

    def removes_anything(self) -> bool:
        return any(r > 0 for r in self.uniform.values()) or (
            bool(self.pool) and self.pool_ratio > 0)


def _global_kept(groups: list[ChannelGroup], pool: list[int], scores, ratio: float):
    """Rank the units of the pooled groups by score / group mean and return the kept count of
    each group after removing ``ratio`` of all pooled units (each group keeps one)."""
    entries = []
    for k in pool:
        mean = float(np.mean(scores[k]))
        normalized = scores[k] / mean if mean > 0 else np.zeros_like(scores[k])
        entries.extend((float(s), k) for s in normalized)
    total = sum(groups[k].units for k in pool)
    budget = int(math.floor(total * ratio + 1e-9))
    removed = {k: 0 for k in pool}
    for _, k in sorted(entries, key=lambda e: e[0]):
        if budget == 0:
            break
        if removed[k] < groups[k].units - 1:
            removed[k] += 1
            budget -= 1
    return {k: groups[k].units - removed[k] for k in pool}


def _unit_step(group: ChannelGroup, round_to: int) -> int:
    """Units per step so that kept units * unit width is a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, group.unit_width)


def round_kept(units: int, kept: int, step: int) -> int:
    """Round a kept unit count to the nearest multiple of ``step``, at least ``step`` and at
    most ``units``. A group of fewer than ``step`` units keeps all of them."""
    if step <= 1 or kept >= units:
        return max(1, min(kept, units))
    if units < step:
        return units
    rounded = step * max(1, int(math.floor(kept / step + 0.5)))
    return min(rounded, units // step * step)


# --- options -----------------------------------------------------------------------------------


def check_ratio(ratio: float, what: str) -> None:
    if not 0.0 <= ratio < 1.0:
        hint = " (1 would remove every channel; a group keeps at least one)" if ratio >= 1 else ""
        raise OptionError(f"pass 'prune': {what} must be in [0, 1), got {ratio}{hint}")


def parse_patterns(text: str) -> list[str]:
    """Split ``a*;b*`` into fnmatch patterns of node names."""
    return [part.strip() for part in text.split(";") if part.strip()]


def parse_overrides(text: str) -> list[tuple[str, float]]:
    """Split ``conv1=0.2;conv2=0.7`` into (pattern, ratio) pairs, checking each ratio."""
    overrides = []
    for part in parse_patterns(text):
        pattern, sep, ratio_text = part.rpartition("=")
        if not sep or not pattern.strip():
            raise OptionError(
                f"pass 'prune': override '{part}' must be PATTERN=RATIO, for example "
                "'override=conv1=0.2;conv2=0.7'"
            )
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise OptionError(
                f"pass 'prune': override '{part}' has ratio '{ratio_text}', not a number"
            ) from None
        if ratio >= 1.0:
            raise OptionError(
                f"pass 'prune': override '{part}' would remove all channels of the groups it "
                "matches; a ratio must be below 1 (use protect= to keep a layer whole)"
            )
        check_ratio(ratio, f"override '{part}'")
        overrides.append((pattern.strip(), ratio))
    return overrides


def _matches(group: ChannelGroup, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in group.nodes)


def check_patterns_match(analysis: ChannelAnalysis, patterns: list[str]) -> None:
    """Raise OptionError for a pattern that matches no node that carries channels."""
    names = [name for group in analysis.groups for name in group.nodes]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            layers = [n for g in analysis.groups for n in g.layers]
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise OptionError(
                f"pass 'prune': pattern '{pattern}' matches no node of graph "
                f"'{analysis.graph.name}' that carries channels; layers are named like: "
                f"{shown or 'none'}"
            )


# --- the rewrite: slice weights and fix attributes ----------------------------------------------


def remove_units(graph: Graph, analysis: ChannelAnalysis,
                 removed: Mapping[int, Iterable[int]]) -> dict[Value, np.ndarray]:
    """Remove units of channel groups from ``graph`` in place and return the keep mask of each
    value that lost positions. ``analysis`` must come from this graph, unchanged since.

    Steps: 1. turn the units into a keep mask per value; 2. shrink each such value's shape
    along its channel dim; 3. per node, slice the constant inputs that hold per-channel data
    and update shape-like attributes; 4. check every node's shapes with shape inference.
    """
    masks = analysis.keep_masks(removed)
    if not masks:
        return masks
    for value, keep in masks.items():
        shape = list(value.shape)
        shape[analysis.axes[value]] = int(keep.sum())
        value.shape = tuple(shape)
    slicer = _ConstantSlicer()
    for node in graph.nodes:
        rewrite = _REWRITES.get(node.op)
        touched = any(v in masks for v in (*node.inputs, *node.outputs))
        if rewrite is not None and touched:
            rewrite(_Site(node, masks, analysis.axes, slicer))
    _rename_duplicate_constants(graph)
    for node in graph.nodes:
        inferred = infer_node(node)
        for value, (shape, dtype) in zip(node.outputs, inferred):
            if tuple(shape) != value.shape:
                raise VerificationError(
                    f"prune left node '{node.name}' (op {node.op}) inconsistent: output "
                    f"'{value.name}' is {value.shape} but its inputs give {tuple(shape)}; "
                    "this is a bug in the channel rules, report it with the model"
                )
    return masks


@dataclass
class _Site:
    """One node being rewritten, with the keep masks and channel dims of the analysis."""

    node: Node
    masks: dict[Value, np.ndarray]
    axes: dict[Value, int]
    slicer: "_ConstantSlicer"

    def keep(self, value: Value) -> np.ndarray | None:
        return self.masks.get(value)

    def take(self, index: int, cuts: list[tuple[int, np.ndarray | None]]) -> None:
        """Replace constant input ``index`` with its entries kept along each (dim, mask)."""
        cuts = [(dim, keep) for dim, keep in cuts if keep is not None]
        if cuts and index < len(self.node.inputs):
            self.node.inputs[index] = self.slicer.take(self.node.inputs[index], cuts)


class _ConstantSlicer:
    """Slices constants, once per distinct cut, keeping the original name."""

    def __init__(self):
        self.cache: dict[tuple, Constant] = {}

    def take(self, const: Constant, cuts: list[tuple[int, np.ndarray]]) -> Constant:
        key = (id(const), *((dim, keep.tobytes()) for dim, keep in cuts))
        if key not in self.cache:
            data = const.data
            for dim, keep in cuts:
                data = np.compress(keep, data, axis=dim)
            self.cache[key] = Constant(const.name, np.ascontiguousarray(data))
        return self.cache[key]


def _rename_duplicate_constants(graph: Graph) -> None:
    # A constant read by two nodes that cut it differently, or by one that does not cut it,
    # now has two versions with one name. Exporters need unique names, so one gets a suffix.
    seen: dict[str, Constant] = {}
    for const in graph.constants():
        if const.name in seen and seen[const.name] is not const:
            const.name = graph.unique_name(f"{const.name}.pruned")
        seen.setdefault(const.name, const)


def _within_group(keep: np.ndarray | None, groups: int) -> np.ndarray | None:
    """Return the mask of indices kept inside each group; the channel rules make every group
    keep the same indices."""
    if keep is None:
        return None
    rows = keep.reshape(groups, -1)
    if not (rows == rows[0]).all():
        raise VerificationError("grouped channels lost different indices in different groups")
    return rows[0]


Rewrite = Callable[[_Site], None]
_REWRITES: dict[str, Rewrite] = {}


def _rewrite(*ops: str) -> Callable[[Rewrite], Rewrite]:
    def register(function: Rewrite) -> Rewrite:
        for op in ops:
            _REWRITES[op] = function
        return function
    return register


@_rewrite("conv2d")
def _conv2d(site: _Site) -> None:
    # weight [O, C / groups, kH, kW], bias [O]
    node = site.node
    x, out = node.inputs[0], node.outputs[0]
    groups = int(node.attrs.get("groups", 1))
    in_per_group = node.inputs[1].shape[1]
    in_keep = site.keep(x)
    if groups == 1:
        column_keep = in_keep
    elif in_per_group == 1:  # depthwise: one group per kept input channel
        column_keep = None
        if in_keep is not None:
            node.attrs["groups"] = int(in_keep.sum())
    else:
        column_keep = _within_group(in_keep, groups)
    site.take(1, [(0, site.keep(out)), (1, column_keep)])
    site.take(2, [(0, site.keep(out))])


@_rewrite("conv_transpose2d")
def _conv_transpose2d(site: _Site) -> None:
    # weight [C, O / groups, kH, kW], bias [O]
    node = site.node
    x, out = node.inputs[0], node.outputs[0]
    groups = int(node.attrs.get("groups", 1))
    in_per_group = node.inputs[1].shape[0] // groups
    in_keep, out_keep = site.keep(x), site.keep(out)
    if groups == 1:
        column_keep = out_keep
    elif in_per_group == 1:  # one group per input channel, each with its own outputs
        column_keep = None
        if in_keep is not None:
            node.attrs["groups"] = int(in_keep.sum())
    else:
        column_keep = _within_group(out_keep, groups)
    site.take(1, [(0, in_keep), (1, column_keep)])
    site.take(2, [(0, out_keep)])


@_rewrite("linear")
def _linear(site: _Site) -> None:
    # weight [out, in], bias [out]
    x, out = site.node.inputs[0], site.node.outputs[0]
    site.take(1, [(0, site.keep(out)), (1, site.keep(x))])
    site.take(2, [(0, site.keep(out))])


@_rewrite("matmul")
def _matmul(site: _Site) -> None:
    # x @ W with a constant W [in, out]; matmuls of two activations have no weights.
    x, weight = site.node.inputs
    if isinstance(weight, Constant):
        site.take(1, [(0, site.keep(x)), (1, site.keep(site.node.outputs[0]))])


@_rewrite("embedding")
def _embedding(site: _Site) -> None:
    # table [V, D]
    site.take(1, [(1, site.keep(site.node.outputs[0]))])


@_rewrite("batch_norm")
def _batch_norm(site: _Site) -> None:
    keep = site.keep(site.node.inputs[0])
    for index in range(1, 5):
        site.take(index, [(0, keep)])


@_rewrite("layer_norm")
def _layer_norm(site: _Site) -> None:
    # scale and bias have the shape of dims axis..rank-1 of x.
    x = site.node.inputs[0]
    start = int(site.node.attrs.get("axis", -1)) % x.rank
    axis = site.axes[x]
    if axis >= start:
        for index in (1, 2):
            site.take(index, [(axis - start, site.keep(x))])


@_rewrite("add", "sub", "mul", "div", "pow", "maximum", "minimum", "equal", "less", "greater",
          "greater_equal", "logical_and", "not_equal", "less_equal", "logical_or",
          "logical_xor", "where", "concat")
def _broadcast(site: _Site) -> None:
    # Constants with one entry per channel lose the removed channels; broadcast ones stay.
    node = site.node
    out = node.outputs[0]
    keep = site.keep(out)
    if keep is None:
        return
    axis = site.axes[out]
    if node.op == "concat" and int(node.attrs.get("axis", 0)) % out.rank == axis:
        return  # joined along the channels: the inputs carry their own masks
    for index, value in enumerate(node.inputs):
        dim = axis - (out.rank - value.rank)
        if isinstance(value, Constant) and dim >= 0 and value.shape[dim] == len(keep) > 1:
            site.take(index, [(dim, keep)])


@_rewrite("reshape", "expand")
def _reshape(site: _Site) -> None:
    site.node.attrs["shape"] = list(site.node.outputs[0].shape)


@_rewrite("split")
def _split(site: _Site) -> None:
    node = site.node
    axis = int(node.attrs.get("axis", 0)) % node.inputs[0].rank
    node.attrs["sizes"] = [out.shape[axis] for out in node.outputs]


@_rewrite("slice")
def _slice(site: _Site) -> None:
    node = site.node
    x = node.inputs[0]
    keep = site.keep(x)
    if keep is None:
        return
    axis = site.axes[x]
    original = list(x.shape)
    original[axis] = len(keep)
    window = slice_window(node, axis, tuple(original))
    if window is None:
        return
    start, stop, _ = window
    new_start = int(keep[:start].sum())
    axes = [int(a) % x.rank for a in node.attrs.get("axes", range(len(node.attrs["starts"])))]
    position = axes.index(axis)
    starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
    starts[position] = new_start
    ends[position] = new_start + int(keep[start:stop].sum())
    node.attrs["starts"], node.attrs["ends"] = starts, ends


# --- the masked reference -----------------------------------------------------------------------


def masked_reference(graph: Graph, analysis: ChannelAnalysis,
                     removed: Mapping[int, Iterable[int]]) -> Graph:
    """Return a copy of ``graph`` that sets the removed channels of every value that pruning
    would shrink to zero, so they contribute nothing downstream. Call it before
    ``remove_units``, which changes the shapes of ``graph``'s values.

    Pruning with the same ``removed`` gives the same outputs, up to rounding, unless a group
    has ``normalized_by`` nodes: a layer_norm over the channels normalizes over fewer channels
    after pruning, but over zeros after masking. Tests use it as the reference for pruning.
    """
    masks = analysis.keep_masks(removed)
    replaced: dict[Value, Value] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        inputs = [replaced.get(v, v) for v in node.inputs]
        nodes.append(Node(node.name, node.op, inputs, list(node.outputs), dict(node.attrs),
                          node.created_by))
        for value in node.outputs:
            if value in masks:
                masked, mask_node = _mask_node(graph, value, analysis.axes[value], masks[value])
                nodes.append(mask_node)
                replaced[value] = masked
    result = Graph(graph.name, list(graph.inputs), list(graph.outputs), nodes,
                   dict(graph.metadata))
    return result.copy()


def _mask_node(graph: Graph, value: Value, axis: int, keep: np.ndarray) -> tuple[Value, Node]:
    # where(keep, x, 0) rather than x * keep: a removed channel may hold -inf (masked attention
    # scores), and -inf * 0 is NaN.
    shape = [1] * value.rank
    shape[axis] = len(keep)
    mask = Constant(graph.unique_name(f"{value.name}.mask"), keep.reshape(shape))
    zero = Constant(graph.unique_name(f"{value.name}.zero"), np.zeros((), dtype=value.dtype))
    masked = Value(graph.unique_name(f"{value.name}.masked"), value.shape, value.dtype)
    node = Node(graph.unique_name(f"{value.name}.masking"), "where", [mask, value, zero],
                [masked], created_by="masked-reference")
    return masked, node
