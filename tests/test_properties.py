"""Property tests: random small graphs built directly in the IR go through the passes, and each
result is compared with the reference executor on the graph before the pass.

A graph is an input [N, C, H, W] followed by a random chain of steps. The steps are convs
(any kernel, stride, padding, dilation and groups, depthwise included), transposed convs,
batch norms, activations, and the decomposed activations that exporters write (hardswish,
hardsigmoid, silu). They also include per-channel bias adds and scales, residual adds,
concats (a value with itself included) and pooling. Some graphs end in a linear head or have
a second graph output.

Properties (tolerances relative to the output scale, as ``pipeline.output_error`` computes):

- the default pipeline keeps the outputs within 1e-5 and folds every batch norm that reads a
  plain layer's only output;
- pruning at ratio 0 leaves the graph text, the outputs and the parameter count unchanged;
- pruning random units, and the prune pass at a random ratio, equal the masked reference
  (the original graph with the removed channels zeroed) within 1e-5;
- low-rank chains at full rank equal the original within 1e-5;
- JSON save and load give the same graph text and bit-identical outputs.

Examples per property: ``EXAMPLES`` (the environment variable GRAPHCOMP_PROPERTY_EXAMPLES
overrides it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphcomp import executor
from graphcomp.analysis import graph_stats
from graphcomp.ir import Constant, Graph, Value
from graphcomp.passes import prune as prune_module
from graphcomp.passes.prune import masked_reference
from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager, output_error
from graphcomp.serialize import format_graph, load_graph, save_graph
from graphcomp.verifier import verify_graph

from graph_helpers import Builder, decompose_without_mac_check, prune_with_reference, run_prune

TOLERANCE = 1e-5
EXAMPLES = int(os.environ.get("GRAPHCOMP_PROPERTY_EXAMPLES", "100"))

# Derandomized and without an example database, so every run checks the same graphs;
# GRAPHCOMP_PROPERTY_RANDOM=1 draws new ones each run, for hunting bugs locally.
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("GRAPHCOMP_PROPERTY_RANDOM") != "1",
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One PyTorch thread: the graphs are tiny, and more threads only add overhead here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- random graphs ------------------------------------------------------------------------------

ACTIVATION_OPS = ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh", "silu", "gelu")
PATTERNS = ("hardswish-div", "hardswish-mul", "hardsigmoid-div", "silu")
STEPS = ("conv", "conv", "conv", "conv_transpose", "batch_norm", "batch_norm", "activation",
         "pattern", "bias_add", "scale_mul", "residual", "concat", "pool")


class RandomGraph:
    """A graph drawn by ``small_graphs`` and seeded feeds for it. Its repr is the graph text,
    which hypothesis prints for a failing example."""

    def __init__(self, graph: Graph, feeds: dict[str, np.ndarray]):
        self.graph = graph
        self.feeds = feeds

    def __repr__(self) -> str:
        return "\n" + format_graph(self.graph)


class _Drawing:
    """The graph being drawn: its builder, the latest 4-D value and every earlier one."""

    def __init__(self, draw, builder: Builder, x: Value):
        self.draw = draw
        self.builder = builder
        self.current = x
        self.values = [x]
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def emit(self, op: str, inputs, base: str, **attrs) -> Value:
        name = self.name(base)
        return self.builder.add(op, inputs, name, name, **attrs)

    def advance(self, value: Value) -> None:
        self.current = value
        self.values.append(value)


def _conv_geometry(draw, size: int, kernel: int) -> tuple[int, int, int, int]:
    """Draw (stride, dilation, pad_before, pad_after) giving at least one output element."""
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2)) if kernel > 1 else 1
    pad_before = draw(st.integers(0, kernel - 1))
    pad_after = draw(st.integers(0, kernel - 1))
    if size + pad_before + pad_after < dilation * (kernel - 1) + 1:
        dilation, pad_before, pad_after = 1, kernel - 1, kernel - 1
    return stride, dilation, pad_before, pad_after


def _groups(draw, in_channels: int) -> tuple[int, int]:
    """Draw (groups, out_channels): plain, depthwise (with a channel multiplier) or grouped."""
    kind = draw(st.sampled_from(("plain", "plain", "depthwise", "grouped")))
    if kind == "depthwise":
        return in_channels, in_channels * draw(st.integers(1, 2))
    if kind == "grouped":
        divisors = [d for d in range(2, in_channels + 1) if in_channels % d == 0]
        if divisors:
            groups = draw(st.sampled_from(divisors))
            return groups, groups * draw(st.integers(1, 3))
    return 1, draw(st.integers(1, 8))


def _conv(g: _Drawing, x: Value | None = None, same_shape: bool = False,
          stem: bool = False) -> Value:
    """Append a conv2d reading ``x`` (the current value by default). ``same_shape`` keeps
    the channels and the spatial size, for a residual branch. A ``stem`` conv is ungrouped
    with 2 to 8 filters, so that the graph has channels to prune."""
    draw = g.draw
    x = g.current if x is None else x
    _, channels, height, width = x.shape
    if same_shape:
        kernel = draw(st.sampled_from((1, 3)))
        kernel_h = kernel_w = kernel
        strides, dilations, pads = [1, 1], [1, 1], [kernel // 2] * 4
        groups = draw(st.sampled_from((1, channels)))
        out_channels = channels
    else:
        kernel_h, kernel_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        stride_h, dilation_h, top, bottom = _conv_geometry(draw, height, kernel_h)
        stride_w, dilation_w, left, right = _conv_geometry(draw, width, kernel_w)
        strides, dilations = [stride_h, stride_w], [dilation_h, dilation_w]
        pads = [top, left, bottom, right]
        groups, out_channels = (1, draw(st.integers(2, 8))) if stem else _groups(draw, channels)
    inputs = [x, g.builder.random(g.name("w"), (out_channels, channels // groups,
                                                kernel_h, kernel_w))]
    if draw(st.booleans()):
        inputs.append(g.builder.random(g.name("b"), (out_channels,)))
    return g.emit("conv2d", inputs, "conv", strides=strides, pads=pads, dilations=dilations,
                  groups=groups)


def _conv_transpose(g: _Drawing) -> Value:
    draw = g.draw
    channels = g.current.shape[1]
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, stride - 1))
    # The output size is (size - 1) * stride - 2 * pad + kernel + output_padding: keep it >= 1.
    smallest = min(g.current.shape[2:])
    room = ((smallest - 1) * stride + kernel + output_padding - 1) // 2
    pad = draw(st.integers(0, min(kernel - 1, room)))
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    groups = draw(st.sampled_from(divisors))
    out_per_group = draw(st.integers(1, 3))
    inputs = [g.current, g.builder.random(g.name("w"), (channels, out_per_group, kernel, kernel))]
    if draw(st.booleans()):
        inputs.append(g.builder.random(g.name("b"), (out_per_group * groups,)))
    return g.emit("conv_transpose2d", inputs, "deconv", strides=[stride, stride],
                  pads=[pad] * 4, output_padding=[output_padding] * 2, groups=groups)


def _batch_norm(g: _Drawing, x: Value | None = None) -> Value:
    x = g.current if x is None else x
    channels = x.shape[1]
    b = g.builder
    params = [b.random(g.name("scale"), (channels,), 0.5, 2.0),
              b.random(g.name("shift"), (channels,)),
              b.random(g.name("mean"), (channels,)),
              b.random(g.name("var"), (channels,), 0.5, 2.0)]
    return g.emit("batch_norm", [x, *params], "bn", eps=1e-5)


def _activation(g: _Drawing) -> Value:
    op = g.draw(st.sampled_from(ACTIVATION_OPS))
    if op == "relu6":
        return g.emit("clip", [g.current], "relu6_", min=0.0, max=6.0)
    return g.emit(op, [g.current], op)


def _pattern(g: _Drawing) -> Value:
    """Append an activation as exporters write it, which ``fuse`` turns back into one op."""
    kind = g.draw(st.sampled_from(PATTERNS))
    b, x = g.builder, g.current
    if kind == "silu":
        return g.emit("mul", [x, g.emit("sigmoid", [x], "sig")], "silu_mul")
    shifted = g.emit("add", [x, b.const(g.name("three"), np.float32(3.0))], "plus3")
    relu6 = g.emit("clip", [shifted], "clip", min=0.0, max=6.0)
    if kind.startswith("hardswish"):
        relu6 = g.emit("mul", [x, relu6], "times_x")
    if kind.endswith("div"):
        return g.emit("div", [relu6, b.const(g.name("six"), np.float32(6.0))], "div6_")
    return g.emit("mul", [relu6, b.const(g.name("sixth"), np.float32(1.0 / 6.0))], "mul6_")


def _channel_constant(g: _Drawing, op: str) -> Value:
    channels = g.current.shape[1]
    low = 0.5 if op == "mul" else -1.0
    const = g.builder.random(g.name(f"{op}_c"), (1, channels, 1, 1), low, 2.0)
    return g.emit(op, [g.current, const], f"channel_{op}")


def _residual(g: _Drawing) -> Value:
    """Add the current value to an earlier value of its shape, or to a conv branch of it."""
    x = g.current
    earlier = [v for v in g.values[:-1] if v.shape == x.shape]
    if earlier and g.draw(st.booleans()):
        other = g.draw(st.sampled_from(earlier))
    else:
        other = _conv(g, x, same_shape=True)
        if g.draw(st.booleans()):
            other = _batch_norm(g, other)
    operands = [x, other] if g.draw(st.booleans()) else [other, x]
    return g.emit("add", operands, "residual")


def _concat(g: _Drawing) -> Value:
    """Concatenate channels with an earlier value of the same spatial size, the value itself
    (a self-concat) or a conv of it."""
    x = g.current
    earlier = [v for v in g.values[:-1]
               if v.shape[0] == x.shape[0] and v.shape[2:] == x.shape[2:]]
    choice = g.draw(st.sampled_from(("earlier", "self", "conv")))
    if choice == "earlier" and earlier:
        other = g.draw(st.sampled_from(earlier))
    elif choice == "self":
        other = x
    else:
        other = _conv(g, x, same_shape=True)
    operands = [x, other] if g.draw(st.booleans()) else [other, x]
    return g.emit("concat", operands, "cat", axis=1)


def _pool(g: _Drawing) -> Value:
    op = g.draw(st.sampled_from(("max_pool2d", "avg_pool2d")))
    height, width = g.current.shape[2:]
    if height >= 2 and width >= 2 and g.draw(st.booleans()):
        return g.emit(op, [g.current], "pool", kernel=[2, 2], strides=[2, 2])
    return g.emit(op, [g.current], "pool", kernel=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])


def _head(g: _Drawing) -> Value:
    """Append global pooling (or nothing), flatten and a linear layer, maybe a batch norm."""
    x = g.current
    if g.draw(st.booleans()):
        x = g.emit("global_avg_pool", [x], "gap")
    flat = g.emit("flatten", [x], "flatten", axis=1)
    out_features = g.draw(st.integers(1, 6))
    inputs = [flat, g.builder.random(g.name("fc_w"), (out_features, flat.shape[1]))]
    if g.draw(st.booleans()):
        inputs.append(g.builder.random(g.name("fc_b"), (out_features,)))
    y = g.emit("linear", inputs, "fc")
    if g.draw(st.booleans()):
        y = _batch_norm(g, y)
    return y


STEP_BUILDERS = {
    "conv": lambda g: _conv(g),
    "conv_transpose": _conv_transpose,
    "batch_norm": lambda g: _batch_norm(g),
    "activation": _activation,
    "pattern": _pattern,
    "bias_add": lambda g: _channel_constant(g, "add"),
    "scale_mul": lambda g: _channel_constant(g, "mul"),
    "residual": _residual,
    "concat": _concat,
    "pool": _pool,
}


@st.composite
def small_graphs(draw, max_steps: int = 8) -> RandomGraph:
    """Draw a random graph and seeded input feeds for it."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(3, 8)),
             draw(st.integers(3, 8)))
    seed = draw(st.integers(0, 2**16))
    builder = Builder(seed)
    g = _Drawing(draw, builder, builder.input("x", shape))
    # A stem conv first, as in most CNNs: the graph input's channels cannot be pruned, and
    # neither can those of a value that a residual add or a concat ties to it.
    g.advance(_conv(g, stem=True))
    for _ in range(draw(st.integers(1, max_steps - 1))):
        step = draw(st.sampled_from(STEPS))
        g.advance(STEP_BUILDERS[step](g))
        # Keep tensors small: a chain of concats and transposed convs could grow them fast.
        if g.current.size > 4096:
            break
    # A graph output keeps all its channels, so most graphs end in a linear head, whose
    # input channels pruning may remove, and few have a second output.
    ends_in_head = draw(st.sampled_from((True, True, True, False)))
    outputs = [_head(g) if ends_in_head else g.current]
    side = [v for v in g.values[1:-1] if v not in outputs]
    if side and draw(st.sampled_from((True, False, False, False))):
        outputs.append(draw(st.sampled_from(side)))
    graph = builder.graph(*outputs)
    rng = np.random.default_rng(seed + 1)
    feeds = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in graph.inputs}
    return RandomGraph(graph, feeds)


# --- checks -------------------------------------------------------------------------------------


def outputs(graph: Graph, feeds) -> list[np.ndarray]:
    by_name = executor.run(graph, feeds)
    return [by_name[value.name] for value in graph.outputs]


def assert_outputs_close(before: Graph, after: Graph, feeds) -> None:
    """Assert that ``after`` computes the outputs of ``before`` to TOLERANCE, relative to each
    output's scale (as ``output_error`` computes it), with scales below 1 counted as 1. An
    output near zero, such as a batch norm subtracting almost all of its input, otherwise
    turns float32 rounding of the layers before it into a large relative error."""
    for old, new in zip(outputs(before, feeds), outputs(after, feeds), strict=True):
        scale = float(np.max(np.abs(old), initial=0.0))
        error = output_error([old], [new]) * (scale if scale > 0 else 1.0) / max(scale, 1.0)
        assert error <= TOLERANCE, f"outputs differ by {error:.3g} relative to their scale"


def unfolded_batch_norms(graph: Graph) -> list[str]:
    """Return the batch norms that read the only output of a plain conv or linear layer, which
    ``fold-bn`` should have folded."""
    producers = graph.producers()
    readers = graph.consumers()
    missed = []
    for node in graph.nodes:
        if node.op != "batch_norm":
            continue
        layer = producers.get(node.inputs[0])
        if (layer is not None and layer.op in ("conv2d", "conv_transpose2d", "linear")
                and layer.attrs.get("activation") is None
                and len(readers[node.inputs[0]]) == 1
                and node.inputs[0] not in graph.outputs):
            missed.append(node.name)
    return missed


def exact_groups(analysis):
    """Prunable groups where pruning equals masking (no layer_norm over their channels)."""
    return [g for g in analysis.groups if g.prunable and not g.normalized_by]


# --- properties ---------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(case=small_graphs())
def test_default_pipeline_keeps_outputs(case):
    result = PassManager(DEFAULT_PIPELINE, verify=False).run(case.graph).graph

    assert_outputs_close(case.graph, result, case.feeds)
    assert unfolded_batch_norms(result) == []
    assert [v.shape for v in result.outputs] == [v.shape for v in case.graph.outputs]


@PROPERTY_SETTINGS
@given(case=small_graphs())
def test_prune_ratio_zero_changes_nothing(case):
    pruned, details = run_prune(case.graph, ratio=0.0)

    assert details["pruned"] == 0
    assert format_graph(pruned) == format_graph(case.graph)
    assert graph_stats(pruned).params == graph_stats(case.graph).params
    for actual, expected in zip(outputs(pruned, case.feeds), outputs(case.graph, case.feeds)):
        np.testing.assert_array_equal(actual, expected)


@PROPERTY_SETTINGS
@given(case=small_graphs(), data=st.data())
def test_pruning_random_units_equals_masking(case, data):
    def choose(analysis):
        removed = {}
        for group in exact_groups(analysis):
            count = data.draw(st.integers(0, group.units - 1), label=f"{group.name} count")
            order = data.draw(st.permutations(range(group.units)), label=f"{group.name} units")
            removed[group.index] = sorted(order[:count])
        return removed

    pruned, reference = prune_with_reference(case.graph, choose)

    assert_outputs_close(reference, pruned, case.feeds)
    assert [v.shape for v in pruned.outputs] == [v.shape for v in case.graph.outputs]
    assert graph_stats(pruned).params <= graph_stats(case.graph).params


@PROPERTY_SETTINGS
@given(case=small_graphs(), ratio=st.floats(0.05, 0.95),
       criterion=st.sampled_from(("l1", "l2")))
def test_prune_pass_at_random_ratio_equals_masking(case, ratio, criterion):
    references: list[Graph] = []
    remove_units = prune_module.remove_units

    def remove_and_record(graph, analysis, removed):
        if any(len(units) for units in removed.values()):
            references.append(masked_reference(graph, analysis, removed))
        return remove_units(graph, analysis, removed)

    with mock.patch.object(prune_module, "remove_units", remove_and_record):
        pruned, details = run_prune(case.graph, ratio=ratio, criterion=criterion)

    if not references:  # No group had a unit to remove at this ratio.
        assert format_graph(pruned) == format_graph(case.graph)
        assert details["pruned"] == 0
        return
    assert_outputs_close(references[0], pruned, case.feeds)
    assert details["params_after"] == graph_stats(pruned).params
    assert details["params_after"] < details["params_before"]


def in_float64(graph: Graph) -> Graph:
    """Return a copy of ``graph`` whose float32 values and constants are float64."""
    result = graph.copy()
    for value in result.values():
        if value.dtype == "float32":
            value.dtype = "float64"
            if isinstance(value, Constant):
                value.data = value.data.astype(np.float64)
    return result


@PROPERTY_SETTINGS
@given(case=small_graphs(), method=st.sampled_from(("svd", "tucker2", "cp")))
def test_lowrank_full_rank_keeps_outputs(case, method):
    # In float64, weights and factors included: in float32, rounding the factors alone
    # changed outputs by up to 1.05e-5 on 2 of 3,000 random graphs, where a linear layer's
    # output is much smaller than the terms it sums.
    graph = in_float64(case.graph)
    decomposed = decompose_without_mac_check(graph, method, "ratio", 1.0, skip_grouped=True)
    feeds = {name: array.astype(np.float64) for name, array in case.feeds.items()}

    assert_outputs_close(graph, decomposed, feeds)
    assert [v.shape for v in decomposed.outputs] == [v.shape for v in case.graph.outputs]


@PROPERTY_SETTINGS
@given(case=small_graphs())
def test_json_round_trip_is_identical(case):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.json"
        save_graph(case.graph, path)
        loaded = load_graph(path)

    verify_graph(loaded)
    assert format_graph(loaded) == format_graph(case.graph)
    for actual, expected in zip(outputs(loaded, case.feeds), outputs(case.graph, case.feeds)):
        np.testing.assert_array_equal(actual, expected)


# --- regressions: failures the properties found, shrunk to small graphs -------------------------


def batch_norm_after(b: Builder, x: Value, *between: tuple[str, float]) -> Value:
    """Append per-channel ``(op, low)`` steps (op is add or mul, constants drawn from
    [low, 2]) and a batch norm after ``x``."""
    channels = x.shape[1]
    for number, (op, low) in enumerate(between):
        const = b.random(f"{op}{number}.c", (1, channels, 1, 1), low, 2.0)
        x = b.add(op, [x, const], f"{op}{number}")
    params = [b.random("bn.scale", (channels,), 0.5, 2.0), b.random("bn.shift", (channels,)),
              b.random("bn.mean", (channels,)), b.random("bn.var", (channels,), 0.5, 2.0)]
    return b.add("batch_norm", [x, *params], "bn", eps=1e-5)


@pytest.mark.parametrize("between", [
    [("mul", 0.5)],
    [("mul", 0.5), ("add", -1.0)],
    [("add", -1.0), ("mul", 0.5)],
    [("add", -1.0), ("add", -1.0)],
    [("add", -1.0), ("mul", 0.5), ("mul", 0.5), ("add", -1.0)],
], ids=["mul", "mul-add", "add-mul", "add-add", "add-mul-mul-add"])
def test_batch_norm_folds_across_channel_ops(between):
    # x[1,2,3,3] -> conv 1x1 (bias) -> [per-channel muls and adds] -> batch_norm -> y
    # Found by test_default_pipeline_keeps_outputs: fold-bn folded across one add only, and
    # the batch norm after a scaled conv, or after two adds, stayed in the graph.
    b = Builder(seed=3)
    x = b.input("x", (1, 2, 3, 3))
    conv = b.add("conv2d", [x, b.random("w", (2, 2, 1, 1)), b.random("b", (2,))], "conv")
    graph = b.graph(batch_norm_after(b, conv, *between))
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)}

    result = PassManager("fold-bn", verify=False).run(graph).graph

    assert [node.op for node in result.nodes] == ["conv2d"]
    assert_outputs_close(graph, result, feeds)


def test_batch_norm_kept_when_chain_shared():
    # x -> conv 1x1 -> mul -> batch_norm -> y;  the mul's output is a graph output too
    b = Builder(seed=3)
    x = b.input("x", (1, 2, 3, 3))
    conv = b.add("conv2d", [x, b.random("w", (2, 2, 1, 1))], "conv")
    scaled = b.add("mul", [conv, b.random("m", (1, 2, 1, 1), 0.5, 2.0)], "mul")
    graph = b.graph(batch_norm_after(b, scaled), scaled)

    result = PassManager("fold-bn", verify=False).run(graph).graph

    assert [node.op for node in result.nodes] == ["conv2d", "mul", "batch_norm"]


def test_prune_pass_removing_nothing_reports_no_change():
    # x[1,1,3,3] -> conv 1x1 (1 filter) -> conv 1x1 -> y: a one-unit group keeps its unit,
    # so a ratio above 0 can remove nothing, and the pass must then report no change.
    b = Builder(seed=0)
    x = b.input("x", (1, 1, 3, 3))
    hidden = b.add("conv2d", [x, b.random("w1", (1, 1, 1, 1))], "conv1")
    graph = b.graph(b.add("conv2d", [hidden, b.random("w2", (1, 1, 1, 1))], "conv2"))

    pruned, details = run_prune(graph, ratio=0.25)

    assert details["pruned"] == 0
    assert format_graph(pruned) == format_graph(graph)
