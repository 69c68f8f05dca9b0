"""Low-rank decomposition of linear, matmul and conv2d layers: SVD, Tucker-2 and CP."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphcomp import decompose
from graphcomp.analysis import graph_stats, node_macs, node_params
from graphcomp.errors import BackendError, OptionError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.layer_timing import LayerTimer
from graphcomp.patterns import Match, new_constant, replace_match
from graphcomp.pipeline import Pass, PassContext, PassNodeError, PassResult, register_pass
from graphcomp.shapes import infer_node

logger = logging.getLogger(__name__)

METHODS = ("auto", "svd", "tucker2", "cp")
MEASURE_MODES = ("auto", "true", "false")
DEFAULT_RATIO = 0.5
# A chain must run this many times faster than its layer to replace it, by default. Repeated
# timings of one build vary, so without a margin, noise alone would keep some chains that
# are no faster.
DEFAULT_MIN_SPEEDUP = 1.05
Factors = decompose.SVDFactors | decompose.Tucker2Factors | decompose.CPFactors


@dataclass
class _Layer:
    """A layer with a constant float weight. ``weight`` is float64: [out, in] for linear and
    matmul (a matmul's [in, out] weight transposed), [C_out, C_in, kH, kW] for conv2d."""

    node: Node
    weight: np.ndarray

    @property
    def is_conv(self) -> bool:
        return self.node.op == "conv2d"

    @property
    def is_matrix(self) -> bool:
        """True for linear, matmul and 1x1 convs, whose weight is a matrix."""
        return not self.is_conv or self.weight.shape[2:] == (1, 1)

    @property
    def matrix(self) -> np.ndarray:
        """The weight as [out, in * kH * kW]."""
        return decompose.unfold(self.weight, 0) if self.is_conv else self.weight


@dataclass(frozen=True)
class _Timing:
    """How one run decides by speed: a LayerTimer (None decides by MACs alone), the named
    target it times on, and a note for the report."""

    timer: Any
    target: str | None
    note: str


@dataclass(frozen=True)
class _Target:
    """How to size one layer's ranks: ``criterion`` is rank, ratio, energy or vbmf."""

    criterion: str
    value: float | int | None


@register_pass
class DecomposeLowRank(Pass):
    """linear(x, W, b) -> linear(linear(x, V_r), U_r, b), conv2d(x, K, b) -> 1x1 -> core -> 1x1

    Replaces each layer by a chain of smaller ones whose product is a low-rank approximation of
    its weight. That saves MACs and parameters at some cost in accuracy; ``graphcomp.finetune``
    recovers most of it. The reconstruction error of each weight (relative Frobenius norm)
    and the params and MACs before and after go into the result details.

    Decompositions (``method``; ``auto`` is SVD for matrices and Tucker-2 for convs):

    - linear, matmul with a constant 2-D weight, and 1x1 conv2d: truncated SVD into two
      layers, ``x -> (rank, no bias) -> (out, the original bias)``. A matmul becomes two linear
      layers. CP and Tucker-2 of a matrix are its SVD, so every method uses SVD here. A 1x1
      conv has no spatial factor, so its strides and pads go on the first factor.
    - kxk conv2d, ``tucker2``: 1x1 conv C_in -> R_in, core conv R_in -> R_out kxk, 1x1 conv
      R_out -> C_out with the bias. HOSVD start, HOOI refinement.
    - kxk conv2d, ``cp``: 1x1 conv C_in -> R, depthwise kx1 conv, depthwise 1xk conv, 1x1
      conv R -> C_out with the bias, fitted by ALS. A kernel with one spatial dim of 1 gets
      one depthwise conv instead of two.
    - kxk conv2d, ``svd``: the SVD of the [C_out, C_in*kH*kW] unfolding, a kxk conv
      C_in -> R then a 1x1 conv R -> C_out.

    Strides, pads and dilations go only on the spatial factors (core, depthwise), never on the
    1x1 factors of a kxk conv, and the fused activation stays on the last factor.

    Ranks (one criterion): ``rank=N`` (fixed, for Tucker-2 on both channel modes), ``ratio``
    (default 0.5, fraction of the full rank: min(out, in) for SVD, C_out and C_in for
    Tucker-2, ``decompose.cp_exact_rank`` for CP), ``energy`` (keep that fraction of the
    squared singular values; per mode unfolding for Tucker-2; for CP the smallest rank with
    relative error <= sqrt(1 - energy)), or the bare word ``vbmf`` (empirical VBMF on the
    matrix, or on the mode-0 and mode-1 unfoldings for Tucker-2 and CP; for CP the larger
    of the two, a lower bound of the CP rank). VBMF keeps only the singular values above what
    noise of its estimated variance would give, so a layer whose spectrum is as flat as a
    random matrix's gets rank 1, with a warning. ``override=conv1=0.3;fc=0.5`` gives matching
    layers (fnmatch on node names) their own value of the criterion, which is a ratio with
    vbmf. ``exclude=head*;fc2`` leaves matching layers alone, and so does ``min_macs=N`` for
    layers of fewer than N MACs. A layer is decomposed only when the chain has fewer MACs
    than the layer. A rank above a layer's limit raises OptionError.

    Measured speed (``measure=auto|true|false``, ``min_speedup``, default 1.05): with a
    target (``graphcomp compile`` always has one, ``cpu`` by default), each layer whose chain
    saves MACs is built alone with the TVM backend for that target, and so is its chain. Both
    are timed on random inputs of the layer's real shapes (``graphcomp.layer_timing``), and the
    chain replaces the layer only when it runs at least ``min_speedup`` times faster.
    ``measure=true`` times on ``cpu`` when no target is given, ``measure=false`` decides by
    MACs alone. A target whose code cannot run here (cuda without a GPU, arm, which would run
    only under emulation) falls back to MACs with a logged note. Builds use TVM's default
    schedules unless the tuning database has records for every kernel of both.

    Run it after ``fold-bn`` and ``fuse``: a batch norm folded into the weight is decomposed
    with it, and a bias add fused into the layer stays on the last factor.

    Leaves alone: grouped and depthwise convs, conv_transpose2d, layers with non-constant or
    non-float weights, and layers that this pass created. It is lossy except at full rank.

    Example (``lowrank:rank=2``)::

        before:
          fc: %y = linear(%x, @fc.weight, @fc.bias) -> float32[2,6]
        after:
          fc.svd_in: %fc.svd_in_output = linear(%x, @fc.svd_in.weight) -> float32[2,2]
          fc: %y = linear(%fc.svd_in_output, @fc.svd_out.weight, @fc.bias) -> float32[2,6]
    """

    name = "lowrank"
    summary = "replace linear, matmul and conv2d layers by low-rank chains (SVD, Tucker-2, CP)"
    lossless = False
    requires = ("float",)  # it decomposes float linear, matmul and conv2d layers only
    options = {"method": str, "rank": int, "ratio": float, "energy": float, "vbmf": bool,
               "exclude": str, "override": str, "min_macs": int, "measure": str,
               "min_speedup": float}
    choices = {"method": METHODS, "measure": MEASURE_MODES}
    defaults = {"method": "auto", "vbmf": False, "exclude": "", "override": "", "min_macs": 0,
                "measure": "auto", "min_speedup": DEFAULT_MIN_SPEEDUP}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.config["method"] not in METHODS:
            raise OptionError(f"pass 'lowrank': unknown method '{self.config['method']}'; "
                              f"choose one of {', '.join(METHODS)}")
        chosen = [key for key in ("rank", "ratio", "energy") if key in self.config]
        if self.config["vbmf"]:
            chosen.append("vbmf")
        if len(chosen) > 1:
            raise OptionError(f"pass 'lowrank': give one of rank, ratio, energy and vbmf, not "
                              f"{' and '.join(chosen)}")
        if not chosen:
            self.config["ratio"] = DEFAULT_RATIO
            chosen = ["ratio"]
        criterion = chosen[0]
        self.target = _Target(criterion, self.config.get(criterion))
        if criterion != "vbmf":
            check_value(self.target, "")
        if self.config["min_macs"] < 0:
            raise OptionError(f"pass 'lowrank': min_macs must be at least 0, got "
                              f"{self.config['min_macs']}")
        self.excluded = split_patterns(self.config["exclude"])
        self.overrides = parse_overrides(self.config["override"], criterion)
        self.config["measure"] = self.config["measure"].lower()
        if self.config["measure"] not in MEASURE_MODES:
            raise OptionError(f"pass 'lowrank': measure must be one of "
                              f"{', '.join(MEASURE_MODES)}, got '{self.config['measure']}'")
        if not 0.0 < self.config["min_speedup"] < float("inf"):
            raise OptionError(f"pass 'lowrank': min_speedup must be a positive number, got "
                              f"{self.config['min_speedup']}")
        # Timers by (target name, tuning database folder). They cache builds and timings, so
        # a pass object that runs on several graphs builds each distinct layer once. Tests put
        # a fake timer here.
        self.timers: dict[tuple, Any] = {}

    @classmethod
    def parse_word(cls, word: str) -> dict[str, Any]:
        """A method name (``lowrank:cp``) sets ``method``; ``vbmf`` sets the bool option."""
        if word in METHODS:
            return {"method": word}
        return super().parse_word(word)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = find_layers(graph)
        names = [layer.node.name for layer in layers]
        check_patterns_match(graph, names, [*self.excluded, *(p for p, _ in self.overrides)])
        # Check every fixed rank first, so that an invalid one leaves the graph unchanged.
        for layer in layers:
            if self._reason_to_skip(layer) is None:
                check_rank_limit(layer, self._method_for(layer), self._target_for(layer.node.name))

        before = graph_stats(graph)
        candidates = [layer for layer in layers if self._reason_to_skip(layer) is None]
        timing = _Timing(None, None, "no layer to decompose")
        if candidates:
            timing = self._timing_for(ctx.target, ctx.tuning_db)
        decomposed: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        # Timing builds every candidate layer and chain with TVM, which takes seconds each.
        report_progress = ctx.progress if timing.timer is not None else None
        if report_progress is not None:
            report_progress(f"timing layers on {timing.target}", 0, len(candidates))
        for layer in layers:
            reason = self._reason_to_skip(layer)
            if reason is None:
                kept, record = self._decompose(graph, layer, timing)
                if timing.timer is not None:
                    done = candidates.index(layer) + 1
                    logger.info("lowrank: layer %d of %d, %s: %s", done, len(candidates),
                                layer.node.name, record["reason"])
                    if report_progress is not None:
                        report_progress(f"timing layers on {timing.target}", done,
                                        len(candidates))
            else:
                kept, record = False, {"layer": layer.node.name, "reason": reason}
            if kept:
                decomposed.append(record)
            else:
                skipped.append(record)
                logger.debug("lowrank: %s left alone: %s", layer.node.name, record["reason"])

        after = graph_stats(graph)
        logger.info("lowrank: %d of %d layers decomposed, params %d -> %d, MACs %d -> %d",
                    len(decomposed), len(layers), before.params, after.params, before.macs,
                    after.macs)
        slower = [record for record in skipped if "speedup" in record]
        details = {
            "method": self.config["method"], "criterion": self.target.criterion,
            "decomposed": len(decomposed), "params_before": before.params,
            "params_after": after.params, "macs_before": before.macs, "macs_after": after.macs,
            "fewer_macs": len(decomposed) + len(slower), "not_faster": len(slower),
            "timed_on": timing.target if timing.timer is not None else None,
            "timing_note": timing.note, "layers": decomposed, "skipped": skipped,
        }
        return PassResult(changed=bool(decomposed), details=details)

    def _timing_for(self, target: str | None, tuning_db=None) -> "_Timing":
        """Return the timer that decides with measured speed, or a note why there is none."""
        mode = self.config["measure"]
        if mode == "false":
            return _Timing(None, target, "measure=false: decided by MACs")
        if target is None:
            if mode == "auto":
                return _Timing(None, None, "no target given: decided by MACs")
            target = "cpu"
        timer = self.timers.get((target, tuning_db))
        if timer is None:
            timer = self.timers[(target, tuning_db)] = LayerTimer(target, tuning_db=tuning_db)
        reason = timer.unavailable_reason()
        if reason is None:
            return _Timing(timer, target, f"timed on {target}")
        note = f"target '{target}' cannot be timed here ({reason}): decided by MACs"
        # An explicit request that cannot be met warrants a warning; auto only notes it.
        logger.log(logging.WARNING if mode == "true" else logging.INFO, "lowrank: %s", note)
        return _Timing(None, target, note)

    def _reason_to_skip(self, layer: _Layer) -> str | None:
        node = layer.node
        if any(fnmatch.fnmatchcase(node.name, p) for p in self.excluded):
            return "excluded"
        if node.created_by == self.name:
            return "created by lowrank"
        if layer.is_conv and int(node.attrs.get("groups", 1)) != 1:
            return "grouped conv"
        macs = node_macs(node)
        if macs < self.config["min_macs"]:
            return f"{macs} MACs, below min_macs"
        return None

    def _method_for(self, layer: _Layer) -> str:
        if layer.is_matrix:
            return "svd"
        method = self.config["method"]
        return "tucker2" if method == "auto" else method

    def _target_for(self, name: str) -> _Target:
        for pattern, target in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return self.target

    def _decompose(self, graph: Graph, layer: _Layer, timing: "_Timing") -> tuple[bool, dict]:
        """Replace ``layer`` by its chain when that saves MACs and, with a timer, measures
        faster. Return whether it did, and the layer's record: figures and the reason."""
        name = layer.node.name
        method = self._method_for(layer)
        target = self._target_for(name)
        macs_before = node_macs(layer.node)

        if method == "cp":
            max_rank = _max_paying_cp_rank(graph, layer, macs_before)
            factors, reason = fit_cp(layer, target, max_rank)
            if factors is None:
                return False, {"layer": name, "reason": reason}
        else:
            factors = factorize(layer, method, target)
        dtype = layer.node.inputs[1].dtype
        nodes = emit_chain(graph, layer, factors.cast(dtype), self.name)
        macs_after = sum(node_macs(n) for n in nodes)
        ranks = _ranks(factors)
        if macs_after >= macs_before:
            return False, {"layer": name, "reason": f"no MAC saving at ranks {ranks}: "
                           f"{macs_before} -> {macs_after}"}

        error = decompose.relative_error(layer.matrix, _dense(factors.cast(dtype), layer))
        record = {
            "layer": name, "op": layer.node.op, "method": method, "ranks": ranks,
            "error": error, "params_before": node_params(layer.node),
            "params_after": sum(node_params(n) for n in nodes),
            "macs_before": macs_before, "macs_after": macs_after,
        }
        faster, record["reason"] = self._judge_speed(layer.node, nodes, timing, record)
        if not faster:
            return False, record
        if not replace_match(graph, Match(layer.node, [layer.node]), nodes):
            raise PassNodeError(name, f"the {method} chain of layer '{name}' changes its "
                                "output shape")
        logger.debug("lowrank: %s", record)
        return True, record

    def _judge_speed(self, layer: Node, chain: list[Node], timing: "_Timing",
                     record: dict) -> tuple[bool, str]:
        """Time ``layer`` and ``chain`` when there is a timer; add the times to ``record``.
        Return whether the chain is to replace the layer, and why."""
        if timing.timer is None:
            return True, f"fewer MACs ({timing.note})"
        try:
            before, after = timing.timer.compare([layer], chain)
        except BackendError as exc:
            logger.warning("lowrank: could not time layer '%s' on %s, deciding by MACs: %s",
                           layer.name, timing.target, exc)
            return True, f"fewer MACs (timing failed: {exc})"
        speedup = before.ms / after.ms if after.ms > 0 else float("inf")
        record.update(ms_before=before.ms, ms_after=after.ms, speedup=speedup,
                      tuned=before.tuned)
        measured = (f"speedup {speedup:.2f}x on {timing.target} "
                    f"({before.ms:.4g} -> {after.ms:.4g} ms)")
        minimum = self.config["min_speedup"]
        if speedup < minimum:
            return False, f"fewer MACs, but {measured} is below min_speedup {minimum:g}"
        return True, f"fewer MACs and {measured}"


# --- layers and options -----------------------------------------------------------------------


def find_layers(graph: Graph) -> list[_Layer]:
    """Return the linear, matmul and conv2d nodes whose weight is a constant float array."""
    layers = []
    for node in graph.nodes:
        if node.op not in ("linear", "matmul", "conv2d") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        rank = 4 if node.op == "conv2d" else 2
        if not (isinstance(weight, Constant) and weight.rank == rank
                and np.issubdtype(weight.data.dtype, np.floating)):
            continue
        if node.op == "matmul" and isinstance(node.inputs[0], Constant):
            continue
        data = weight.data.astype(np.float64)
        layers.append(_Layer(node, data.T if node.op == "matmul" else data))
    return layers


def check_value(target: _Target, where: str) -> None:
    """Raise OptionError unless the target's value is valid for its criterion."""
    value = target.value
    if target.criterion == "rank" and value < 1:
        raise OptionError(f"pass 'lowrank': {where}rank must be at least 1, got {value}")
    if target.criterion in ("ratio", "energy") and not 0.0 < value <= 1.0:
        raise OptionError(f"pass 'lowrank': {where}{target.criterion} must be in (0, 1], "
                          f"got {value}")


def split_patterns(text: str) -> list[str]:
    """Split ``a*;b*`` into fnmatch patterns of node names."""
    return [part.strip() for part in text.split(";") if part.strip()]


def parse_overrides(text: str, criterion: str) -> list[tuple[str, _Target]]:
    """Split ``conv1=0.3;fc=0.5`` into (pattern, target) pairs. The value is of the pass's
    criterion (an int for rank), and a ratio when the criterion is vbmf."""
    kind = "ratio" if criterion == "vbmf" else criterion
    overrides = []
    for part in split_patterns(text):
        pattern, separator, value_text = part.rpartition("=")
        if not separator or not pattern.strip():
            raise OptionError(f"pass 'lowrank': override '{part}' must be PATTERN=VALUE, for "
                              "example 'override=conv1=0.3;fc*=0.5'")
        try:
            value = int(value_text) if kind == "rank" else float(value_text)
        except ValueError:
            expected = "an integer rank" if kind == "rank" else f"a number ({kind})"
            raise OptionError(f"pass 'lowrank': override '{part}' has value '{value_text}', "
                              f"expected {expected}") from None
        target = _Target(kind, value)
        check_value(target, f"override '{part}': ")
        overrides.append((pattern.strip(), target))
    return overrides


def check_patterns_match(graph: Graph, names: list[str], patterns: list[str]) -> None:
    """Raise OptionError for a pattern that matches no layer, which is most likely a typo."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise OptionError(f"pass 'lowrank': pattern '{pattern}' matches no linear, matmul "
                              f"or conv2d layer of graph '{graph.name}'; layers are named "
                              f"like: {shown or 'none'}")


# --- rank selection and factorization ---------------------------------------------------------


def rank_limit(layer: _Layer, method: str) -> tuple[int, str]:
    """Return the largest rank that ``rank=N`` may give ``layer`` under ``method``, and why."""
    if method == "svd":
        rows, columns = layer.matrix.shape
        return min(rows, columns), f"min(out={rows}, in={columns}) for SVD"
    out_channels, in_channels = layer.weight.shape[:2]
    if method == "tucker2":
        return (min(out_channels, in_channels),
                f"min(C_out={out_channels}, C_in={in_channels}) for Tucker-2, whose rank=N "
                "applies to both channel modes")
    return (decompose.cp_exact_rank(layer.weight.shape),
            f"the product of the kernel dims {list(layer.weight.shape)} without the largest, "
            "where CP is already exact")


def check_rank_limit(layer: _Layer, method: str, target: _Target) -> None:
    """Raise OptionError when ``target`` is a fixed rank above ``layer``'s limit."""
    if target.criterion != "rank":
        return
    limit, why = rank_limit(layer, method)
    if target.value > limit:
        name = layer.node.name
        raise OptionError(
            f"pass 'lowrank': rank {target.value} is above the limit {limit} of layer '{name}' "
            f"({layer.node.op}, weight {list(layer.weight.shape)}): {why}; lower the rank, "
            f"set this layer's own with override={name}=N, or leave it out with exclude={name}"
        )


def factorize(layer: _Layer, method: str, target: _Target) -> Factors:
    """Return the SVD or Tucker-2 factors of ``layer``'s weight sized by ``target`` (CP goes
    through ``fit_cp``). Raises OptionError for a rank above the layer's limit."""
    check_rank_limit(layer, method, target)
    if method == "svd":
        matrix = layer.matrix
        rank = _single_rank(target, min(matrix.shape),
                            lambda: decompose.singular_values(matrix),
                            lambda: vbmf_ranks(layer, [matrix]))
        return decompose.truncated_svd(matrix, rank)
    return decompose.tucker2(layer.weight, _tucker_ranks(layer, target))


def fit_cp(layer: _Layer, target: _Target, max_rank: int) -> tuple[Factors | None, str]:
    """Return the CP factors of ``layer``'s kernel sized by ``target``, or None and the reason
    when the rank would be above ``max_rank``, the largest with fewer MACs than the layer.
    Raises OptionError for a rank above the layer's limit."""
    check_rank_limit(layer, "cp", target)
    kernel = layer.weight
    if target.criterion == "energy":
        factors = decompose.cp_rank_for_energy(kernel, target.value, max_rank)
        if factors is None:
            return None, (f"no CP rank up to {max_rank}, the largest with fewer MACs, reaches "
                          f"energy {target.value}")
        return factors, ""
    unfoldings = [decompose.unfold(kernel, 0), decompose.unfold(kernel, 1)]
    rank = _single_rank(target, decompose.cp_exact_rank(kernel.shape), None,
                        lambda: vbmf_ranks(layer, unfoldings, largest=True))
    if rank > max_rank:
        return None, f"no MAC saving at CP rank {rank}: at most rank {max_rank} has fewer MACs"
    return decompose.cp_als(kernel, rank), ""


def _single_rank(target: _Target, full: int, values, vbmf) -> int:
    """Return one rank from ``target`` for a layer of full rank ``full``. ``values`` returns
    the singular values for energy, ``vbmf`` the EVBMF ranks, of which the largest is used."""
    if target.criterion == "rank":
        return target.value
    if target.criterion == "ratio":
        return _ratio_rank(target.value, full)
    if target.criterion == "energy":
        return decompose.rank_for_energy(values(), target.value)
    return max(vbmf())


def _tucker_ranks(layer: _Layer, target: _Target) -> tuple[int, int]:
    kernel = layer.weight
    out_channels, in_channels = kernel.shape[:2]
    if target.criterion == "rank":
        return target.value, target.value
    if target.criterion == "ratio":
        return _ratio_rank(target.value, out_channels), _ratio_rank(target.value, in_channels)
    unfoldings = [decompose.unfold(kernel, 0), decompose.unfold(kernel, 1)]
    if target.criterion == "energy":
        return tuple(decompose.rank_for_energy(decompose.singular_values(m), target.value)
                     for m in unfoldings)
    return tuple(vbmf_ranks(layer, unfoldings))


def vbmf_ranks(layer: _Layer, matrices: list[np.ndarray], largest: bool = False) -> list[int]:
    """Return the EVBMF rank of each of ``layer``'s ``matrices``, at least 1, for the ranks
    that will be used: all of them, or with ``largest`` only the largest.

    Warns when a used rank is 1. EVBMF keeps only singular values above the largest that
    i.i.d. noise of the estimated variance would give, so rank 1 means a spectrum as flat as
    a random matrix's (small trained layers often have one): such a layer needs energy or
    ratio instead.
    """
    found = [decompose.evbmf(matrix).rank for matrix in matrices]
    used = [max(found)] if largest else found
    if min(used) <= 1:
        name = layer.node.name
        logger.warning(
            "lowrank: VBMF finds %s component(s) above the noise level in layer '%s' (%s, "
            "weight %s), so it gets rank 1: its singular values are as flat as a random "
            "matrix's. Size it with energy=F or ratio=F instead, or with vbmf give it a ratio "
            "with override=%s=R", "/".join(map(str, found)), name, layer.node.op,
            list(layer.weight.shape), name)
    return [max(1, rank) for rank in found]


def _ratio_rank(ratio: float, full: int) -> int:
    return int(min(max(1, int(ratio * full + 0.5)), full))


def _max_paying_cp_rank(graph: Graph, layer: _Layer, macs_before: int) -> int:
    """Return the largest CP rank whose chain has fewer MACs than ``layer``. Every factor's MAC
    count is linear in the rank, so the chain at rank 1 gives the cost per rank."""
    dims = layer.weight.shape
    unit = decompose.CPFactors([np.zeros((dim, 1)) for dim in dims])
    macs_per_rank = sum(node_macs(n) for n in emit_chain(graph, layer, unit, "lowrank"))
    return (macs_before - 1) // max(macs_per_rank, 1)


def _ranks(factors: Factors) -> list[int]:
    if isinstance(factors, decompose.Tucker2Factors):
        return list(factors.ranks)
    return [factors.rank]


def _dense(factors: Factors, layer: _Layer) -> np.ndarray:
    """Multiply out ``factors`` into a weight of the shape of ``layer.matrix``."""
    dense = factors.reconstruct()
    return dense.reshape(layer.matrix.shape)


# --- emitting the chain -----------------------------------------------------------------------


class _Chain:
    """Builds the nodes that replace one layer, in order. Each new node reads the previous
    one's output; the last writes the layer's outputs and keeps its name."""

    def __init__(self, graph: Graph, layer: Node, created_by: str):
        self.graph = graph
        self.layer = layer
        self.created_by = created_by
        self.dtype = layer.inputs[1].dtype
        self.current: Value = layer.inputs[0]
        self.nodes: list[Node] = []

    def add(self, role: str, op: str, weight: np.ndarray, attrs: dict, last: bool = False):
        name = self.layer.name
        weight_value = new_constant(self.graph, f"{name}.{role}.weight",
                                    np.ascontiguousarray(weight, dtype=self.dtype))
        inputs = [self.current, weight_value]
        if last:
            inputs += self.layer.inputs[2:]  # the bias, if any
            node = Node(name, op, inputs, list(self.layer.outputs), attrs, self.created_by)
        else:
            node_name = self.graph.unique_name(f"{name}.{role}")
            output = Value(self.graph.unique_name(f"{node_name}_output"), ())
            node = Node(node_name, op, inputs, [output], attrs, self.created_by)
            (shape, dtype), = infer_node(node)
            output.shape, output.dtype = tuple(shape), dtype
        self.nodes.append(node)
        self.current = node.outputs[0]


def _conv_attrs(strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), groups=1) -> dict:
    return {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
            "groups": groups}


def _last_attrs(layer: Node, conv: bool) -> dict:
    attrs = _conv_attrs() if conv else {}
    activation = layer.attrs.get("activation")
    if activation is not None:
        attrs["activation"] = activation
    return attrs


def _spatial_attrs(layer: Node) -> tuple[list[int], list[int], list[int]]:
    attrs = layer.attrs
    return (list(attrs.get("strides") or (1, 1)), list(attrs.get("pads") or (0, 0, 0, 0)),
            list(attrs.get("dilations") or (1, 1)))


def emit_chain(graph: Graph, layer: _Layer, factors: Factors, created_by: str) -> list[Node]:
    """Return the nodes computing ``layer`` from ``factors``, not yet in ``graph``."""
    chain = _Chain(graph, layer.node, created_by)
    if isinstance(factors, decompose.SVDFactors):
        _emit_svd(chain, layer, factors)
    elif isinstance(factors, decompose.Tucker2Factors):
        _emit_tucker2(chain, layer, factors)
    else:
        _emit_cp(chain, layer, factors)
    return chain.nodes


def _emit_svd(chain: _Chain, layer: _Layer, factors: decompose.SVDFactors) -> None:
    node = layer.node
    if not layer.is_conv:
        chain.add("svd_in", "linear", factors.right, {})
        chain.add("svd_out", "linear", factors.left, _last_attrs(node, conv=False), last=True)
        return
    # A kxk conv keeps its kernel size in the first factor. A 1x1 conv has no spatial factor,
    # so its strides and pads go on the first (bias-free) factor, where they cost the least.
    strides, pads, dilations = _spatial_attrs(node)
    in_shape = (factors.rank, *layer.weight.shape[1:])
    chain.add("svd_in", "conv2d", factors.right.reshape(in_shape),
              _conv_attrs(strides, pads, dilations))
    chain.add("svd_out", "conv2d", factors.left[:, :, None, None],
              _last_attrs(node, conv=True), last=True)


def _emit_tucker2(chain: _Chain, layer: _Layer, factors: decompose.Tucker2Factors) -> None:
    strides, pads, dilations = _spatial_attrs(layer.node)
    chain.add("tucker_in", "conv2d", factors.in_factor.T[:, :, None, None], _conv_attrs())
    chain.add("tucker_core", "conv2d", factors.core, _conv_attrs(strides, pads, dilations))
    chain.add("tucker_out", "conv2d", factors.out_factor[:, :, None, None],
              _last_attrs(layer.node, conv=True), last=True)


def _emit_cp(chain: _Chain, layer: _Layer, factors: decompose.CPFactors) -> None:
    """Emit 1x1 in, depthwise kx1 (vertical strides, pads, dilations), depthwise 1xk
    (horizontal ones), 1x1 out. With kH or kW equal to 1, one depthwise kH x kW conv takes
    all of them."""
    out_factor, in_factor, vertical, horizontal = factors.factors
    rank = factors.rank
    (stride_h, stride_w), (top, left, bottom, right), (dilation_h, dilation_w) = (
        _spatial_attrs(layer.node))
    chain.add("cp_in", "conv2d", in_factor.T[:, :, None, None], _conv_attrs())
    if vertical.shape[0] > 1 and horizontal.shape[0] > 1:
        chain.add("cp_vertical", "conv2d", vertical.T[:, None, :, None],
                  _conv_attrs((stride_h, 1), (top, 0, bottom, 0), (dilation_h, 1), rank))
        chain.add("cp_horizontal", "conv2d", horizontal.T[:, None, None, :],
                  _conv_attrs((1, stride_w), (0, left, 0, right), (1, dilation_w), rank))
    else:
        kernel = np.einsum("hr,wr->rhw", vertical, horizontal)[:, None]
        chain.add("cp_depthwise", "conv2d", kernel,
                  _conv_attrs(*_spatial_attrs(layer.node), groups=rank))
    chain.add("cp_out", "conv2d", out_factor[:, :, None, None],
              _last_attrs(layer.node, conv=True), last=True)
