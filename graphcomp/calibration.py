"""Calibration for int8 quantization: range observers run over a dataset, and the scales and
zero points that the observed ranges give.

An observer receives every batch of one value and returns its range ``(low, high)``:

- ``minmax``: the smallest and the largest element seen.
- ``percentile``: the ``100 - p`` and ``p`` percentiles (``p`` = 99.99 by default) of a
  seeded uniform sample of the elements, which ignores rare outliers.
- ``mse``: the min/max range shrunk toward zero by the factor whose int8 quantization has the
  smallest mean squared error on the sample.

Activations are quantized per tensor and asymmetrically (``activation_params``); weights per
output channel and symmetrically in [-127, 127] (``weight_scales``). No scale is ever zero:
an all-zero channel or a constant-zero activation gets scale 1, which still represents its
zeros exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from graphcomp import executor
from graphcomp.errors import GraphcompError, OptionError, ShapeError
from graphcomp.ir import Graph, Value
from graphcomp.ops.quantized import QUANTIZED_RANGES

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
# Called with a label, the graph runs done and the graph runs in total.
ProgressFn = Callable[[str, int, int], None]

# Symmetric int8 weights use [-127, 127], so that w and -w quantize to opposite integers.
WEIGHT_MAX = 127
INT32_RANGE = (-(2**31), 2**31 - 1)
# Largest |bias| in int32 steps: half the int32 range, which leaves the other half for the sum
# of products that the bias is added to.
MAX_BIAS_STEPS = 2**30
# Elements each sampling observer keeps per value; enough for a 99.99 percentile.
MAX_SAMPLES = 1 << 16
# Shrink factors of the min/max range that the MSE observer tries, widest first, so that a tie
# keeps the wider range.
MSE_FACTORS = np.linspace(1.0, 0.05, 96)
SMALLEST_SCALE = float(np.finfo(np.float32).tiny)


class CalibrationError(GraphcompError):
    """Calibration data is missing or gave unusable ranges (NaN, infinity)."""


# --- observers --------------------------------------------------------------------------------


class Observer:
    """Tracks the range of one value over calibration batches (min/max by default)."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf
        self.batches = 0

    def update(self, array: np.ndarray) -> None:
        if array.size == 0:
            return
        self.low = min(self.low, float(array.min()))
        self.high = max(self.high, float(array.max()))
        self.batches += 1

    def range(self) -> tuple[float, float]:
        return self.low, self.high


class MinMaxObserver(Observer):
    """The smallest and largest element seen."""


class SamplingObserver(Observer):
    """Keeps, besides min and max, a seeded uniform sample of up to ``MAX_SAMPLES`` elements."""

    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.samples = np.zeros(0, np.float32)
        self._rng = np.random.default_rng(0)

    def update(self, array: np.ndarray) -> None:
        super().update(array)
        flat = array.reshape(-1)
        if flat.size > self.max_samples:
            flat = self._rng.choice(flat, self.max_samples, replace=False)
        merged = np.concatenate([self.samples, flat.astype(np.float32)])
        if merged.size > self.max_samples:
            merged = self._rng.choice(merged, self.max_samples, replace=False)
        self.samples = merged


class PercentileObserver(SamplingObserver):
    """The ``100 - percentile`` and ``percentile`` percentiles of the sample."""

    def __init__(self, percentile: float = 99.99, max_samples: int = MAX_SAMPLES) -> None:
        super().__init__(max_samples)
        if not 50.0 < percentile <= 100.0:
            raise OptionError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if self.samples.size == 0:
            return super().range()
        low, high = np.percentile(self.samples, [100.0 - self.percentile, self.percentile])
        return float(low), float(high)


class MseObserver(SamplingObserver):
    """The range whose quantization (with the activation dtype) gives the sample the smallest
    mean squared error. Each end of the min/max range is shrunk by the best factor of
    ``MSE_FACTORS``: first the high end, then the low end, so a long tail on one side does not
    clip the other side."""

    def __init__(self, dtype: str = "int8", max_samples: int = MAX_SAMPLES) -> None:
        super().__init__(max_samples)
        self.dtype = dtype

    def range(self) -> tuple[float, float]:
        low, high = super().range()
        if self.samples.size == 0 or not (np.isfinite(low) and np.isfinite(high)):
            return low, high
        high = min((high * factor for factor in MSE_FACTORS),
                   key=lambda candidate: self.error(low, candidate))
        low = min((low * factor for factor in MSE_FACTORS),
                  key=lambda candidate: self.error(candidate, high))
        return low, high

    def error(self, low: float, high: float) -> float:
        """Mean squared error of the sample quantized with the range ``[low, high]``."""
        params = activation_params(low, high, self.dtype)
        return float(np.mean((fake_quantize(self.samples, params) - self.samples) ** 2))


OBSERVERS = ("minmax", "percentile", "mse")


def make_observer(method: str, percentile: float = 99.99, dtype: str = "int8") -> Observer:
    """Create the observer named ``method`` (one of ``OBSERVERS``)."""
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    if method == "mse":
        return MseObserver(dtype)
    raise OptionError(f"unknown calibration method '{method}'; use one of {', '.join(OBSERVERS)}")


# --- quantization parameters ------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor parameters of one activation: a float32 scale, zero point and dtype."""

    scale: float
    zero_point: int
    dtype: str


def activation_params(low: float, high: float, dtype: str = "int8") -> QuantParams:
    """Return asymmetric per-tensor parameters covering ``[low, high]`` widened to include 0,
    so that 0.0 (padding, relu) is exactly representable."""
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CalibrationError(f"range [{low}, {high}] is not finite")
    qmin, qmax = QUANTIZED_RANGES[dtype]
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = float(np.float32((high - low) / (qmax - qmin)))
    if scale == 0.0:  # constant-zero activation: any scale represents it; 1 keeps it readable
        scale = 1.0
    scale = max(scale, SMALLEST_SCALE)
    zero_point = int(np.clip(np.round(qmin - low / scale), qmin, qmax))
    return QuantParams(scale, zero_point, dtype)


def fake_quantize(data: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize and dequantize ``data`` in float32 with per-tensor ``params``."""
    qmin, qmax = QUANTIZED_RANGES[params.dtype]
    scale = np.float32(params.scale)
    q = np.clip(np.round(data / scale) + params.zero_point, qmin, qmax)
    return ((q - params.zero_point) * scale).astype(np.float32)


def weight_scales(weight: np.ndarray, axis: int = 0) -> np.ndarray:
    """Return symmetric per-channel scales (float32, one per index of ``axis``): the channel's
    max |w| / 127, or 1 for an all-zero channel."""
    moved = np.moveaxis(np.asarray(weight, np.float32), axis, 0)
    absmax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scales = (absmax / WEIGHT_MAX).astype(np.float32)
    scales[absmax == 0] = 1.0
    return np.maximum(scales, np.float32(SMALLEST_SCALE))


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int = 0) -> np.ndarray:
    """Return ``weight`` as int8 in [-127, 127] with per-channel ``scales`` along ``axis``."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.round(np.asarray(weight, np.float32) / scales.reshape(shape))
    return np.clip(q, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)


def bias_safe_scales(w_scales: np.ndarray, bias: np.ndarray, x_scale: float) -> np.ndarray:
    """Return ``w_scales`` raised where needed so that each bias value fits in
    ``MAX_BIAS_STEPS`` steps of ``x_scale * w_scale``.

    A channel whose weights are tiny but whose bias is not (common after batch-norm folding of
    a nearly dead channel) would otherwise saturate its int32 bias. A larger weight scale
    costs that channel weight precision that hardly matters, because its bias dominates it.
    """
    needed = np.abs(np.asarray(bias, np.float64)) / (float(np.float32(x_scale)) * MAX_BIAS_STEPS)
    return np.maximum(w_scales, needed.astype(np.float32))


def quantize_bias(bias: np.ndarray, x_scale: float, w_scales: np.ndarray,
                  layer: str = "") -> np.ndarray:
    """Return ``bias`` as int32 at scale ``x_scale * w_scales`` (per output channel)."""
    scales = (np.float32(x_scale) * w_scales).astype(np.float64)
    q = np.round(np.asarray(bias, np.float64) / scales)
    clipped = int(np.sum((q < INT32_RANGE[0]) | (q > INT32_RANGE[1])))
    if clipped:
        logger.warning("layer '%s': %d bias values exceed the int32 range at scale "
                       "x_scale * w_scale and were saturated", layer, clipped)
    return np.clip(q, *INT32_RANGE).astype(np.int32)


# --- running the graph ------------------------------------------------------------------------


def graph_batches(graph: Graph, batches: Iterable[Feeds]) -> Iterator[dict[str, np.ndarray]]:
    """Yield feeds of the graph's input shapes, splitting a batch along dim 0 when it contains
    several of the graph's batches (16 rows for a graph of batch 1 give 16 feeds)."""
    for number, batch in enumerate(batches):
        parts = batch_parts(graph, batch, number)
        for part in range(parts):
            yield {
                value.name: _rows(np.asarray(batch[value.name]), value, part, parts)
                for value in graph.inputs
            }


def batch_parts(graph: Graph, batch: Feeds, number: int = 0) -> int:
    """Return how many of the graph's batches ``batch`` contains. Raise ShapeError naming the
    input when an input is missing or has another shape, or when the inputs disagree."""
    counts = {}
    for value in graph.inputs:
        if value.name not in batch:
            raise ShapeError(f"calibration batch {number} has no array for graph input "
                             f"'{value.name}'; it has {sorted(batch)}")
        counts[value.name] = _splits(value, np.shape(batch[value.name]), number)
    if len(set(counts.values())) > 1:
        raise ShapeError(f"calibration batch {number}: inputs hold different numbers of "
                         f"the graph's batches: {counts}")
    return next(iter(counts.values()), 1)


def _splits(value: Value, shape: tuple[int, ...], number: int) -> int:
    if tuple(shape) == value.shape:
        return 1
    batch = value.shape[0] if value.shape else 0
    if len(shape) == value.rank and shape[1:] == value.shape[1:] and batch and \
            shape[0] % batch == 0:
        return shape[0] // batch
    raise ShapeError(
        f"calibration batch {number}: input '{value.name}' has shape {tuple(shape)}; expected "
        f"{value.shape} or N x {list(value.shape[1:])} with N a multiple of {batch}"
    )


def _rows(array: np.ndarray, value: Value, part: int, parts: int) -> np.ndarray:
    if parts == 1 and array.shape == value.shape:
        return array.astype(value.dtype, copy=False)
    size = value.shape[0]
    return np.ascontiguousarray(array[part * size:(part + 1) * size]).astype(value.dtype,
                                                                            copy=False)


def observe_ranges(graph: Graph, values: Sequence[Value], batches: Sequence[Feeds],
                   observers: Mapping[str, Observer], progress: ProgressFn | None = None) -> int:
    """Run ``graph`` on every batch and update ``observers[value.name]`` with each of
    ``values``; return the number of graph runs. Only the observed values stay in memory.
    ``progress`` is called before the first run and after each one."""
    probe = Graph(graph.name, graph.inputs, list(values), graph.nodes)
    total = sum(batch_parts(graph, batch, number) for number, batch in enumerate(batches))
    if progress is not None:
        progress("calibrating", 0, total)
    runs = 0
    with torch.no_grad():
        for feeds in graph_batches(graph, batches):
            executor.check_feeds(graph, feeds)
            tensors = {name: torch.from_numpy(np.require(array, requirements="C"))
                       for name, array in feeds.items()}
            outputs = executor.run_torch(probe, tensors)
            for value in values:
                observers[value.name].update(outputs[value].numpy())
            runs += 1
            if progress is not None:
                progress("calibrating", runs, total)
    return runs
