"""The quantize pass, the calibration observers and the quantized ops end to end.

References: numpy integer arithmetic for the ops, the TVM build (bit for bit), ONNX Runtime on
the exported model (bit for bit on int8 values), and the float graph for accuracy. Tolerances
are stated at each assert.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from graphcomp import executor
from graphcomp.analysis import graph_stats
from graphcomp.backends.onnx_export import to_onnx
from graphcomp.calibration import (
    MinMaxObserver, MseObserver, PercentileObserver, activation_params,
    quantize_weight, weight_scales,
)
from graphcomp.compiler import split_calibration
from graphcomp.data import Dataset, load_dataset, random_feeds
from graphcomp.errors import GraphcompError, OptionError, PassError, ShapeError
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.models import digits_cnn
from graphcomp.ops.quantized import QUANTIZED_RANGES
from graphcomp.passes.quantize import sensitivity
from graphcomp.pipeline import (
    DEFAULT_PIPELINE, PassContext, PassManager, available_passes, output_error, parse_pipeline,
)
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_shapes

RNG = np.random.default_rng(7)
DIGITS_MODEL = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn" / "model.py"


def ops_of(graph: Graph) -> list[str]:
    return [node.op for node in graph.nodes]


def run_ort(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(to_onnx(graph).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def quantized(graph: Graph, pipeline: str, calibration=None, feeds=None) -> Graph:
    return PassManager(pipeline, calibration=calibration, feeds=feeds).run(graph).graph


def small_cnn(batch: int = 2) -> tuple[Graph, nn.Module]:
    """conv(3->8, relu) -> conv(8->8, hardswish) -> flatten -> fc(512->16, relu) -> fc(16->4)"""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish(),
        nn.Flatten(), nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()
    graph = import_torch(model, (torch.randn(batch, 3, 8, 8),))
    return PassManager(DEFAULT_PIPELINE).run(graph).graph, model


def cnn_batches(count: int, batch: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)}
            for _ in range(count)]


def cnn_feeds() -> dict[str, np.ndarray]:
    """Inputs for checks, drawn apart from every calibration batch."""
    return cnn_batches(1, seed=99)[0]


# --- quantize and dequantize ------------------------------------------------------------------


def one_node_graph(op: str, inputs: list[Value], attrs=None, out_dtype="float32") -> Graph:
    output = Value("y", (), out_dtype)
    graph = Graph(op, [v for v in inputs if not isinstance(v, Constant)], [output],
                  [Node(op, op, inputs, [output], dict(attrs or {}))])
    infer_shapes(graph)
    return graph


def round_trip(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1):
    x = Value("x", data.shape)
    q = Value("q", data.shape, str(zero_point.dtype))
    params = [Constant("scale", scale), Constant("zero_point", zero_point)]
    nodes = [Node("quantize", "quantize", [x, *params], [q], {"axis": axis}),
             Node("dequantize", "dequantize", [q, *params], [Value("y", data.shape)],
                  {"axis": axis})]
    graph = Graph("round_trip", [x], [nodes[1].outputs[0]], nodes)
    infer_shapes(graph)
    return executor.run(graph, {"x": data})["y"]


def test_round_trip_within_half_step_per_tensor():
    data = RNG.uniform(-3.0, 5.0, (4, 6, 5)).astype(np.float32)
    params = activation_params(float(data.min()), float(data.max()))
    result = round_trip(data, np.array(params.scale, np.float32),
                        np.array(params.zero_point, np.int8))
    error = np.abs(result - data).max()
    # Half a step plus float32 rounding of the division and the product.
    assert error <= params.scale * (0.5 + 1e-5)
    assert error > 0  # the data is not on the grid, so the check is not vacuous


def test_round_trip_within_half_step_per_channel():
    data = RNG.standard_normal((3, 4, 5)).astype(np.float32) * np.array([1e-3, 1.0, 50.0],
                                                                        np.float32)[:, None, None]
    scales = weight_scales(data, axis=0)
    result = round_trip(data, scales, np.zeros(3, np.int8), axis=0)
    errors = np.abs(result - data).reshape(3, -1).max(axis=1)
    assert np.all(errors <= scales * (0.5 + 1e-5))


def test_quantize_rounds_half_to_even_and_saturates():
    scale = np.float32(0.25)
    data = np.array([0.125, 0.375, 0.625, -0.125, -0.375, 100.0, -100.0], np.float32)
    graph = one_node_graph("quantize", [Value("x", data.shape), Constant("s", scale),
                                        Constant("z", np.int8(3))])
    result = executor.run(graph, {"x": data})["y"]
    # x / scale = 0.5, 1.5, 2.5, -0.5, -1.5 -> 0, 2, 2, -0, -2 (half to even), then + 3.
    np.testing.assert_array_equal(result, np.array([3, 5, 5, 3, 1, 127, -128], np.int8))


def test_scales_never_zero():
    weight = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[1] = 0.0
    weight[2] *= 1e-30
    scales = weight_scales(weight)
    assert np.all(scales > 0)
    assert np.all(np.isfinite(scales))
    restored = quantize_weight(weight, scales) * scales[:, None, None, None]
    assert np.all(restored[1] == 0.0)
    for low, high in [(0.0, 0.0), (2.5, 2.5), (-1.0, -1.0), (0.0, 1e-42)]:
        params = activation_params(low, high)
        assert params.scale > 0, (low, high)
        assert -128 <= params.zero_point <= 127


# --- qconv2d against integer arithmetic, TVM and ONNX Runtime ---------------------------------


def qconv_case(seed: int, groups: int = 1, activation: str | None = None):
    rng = np.random.default_rng(seed)
    channels = 4
    x = rng.integers(-128, 128, (1, channels, 6, 5)).astype(np.int8)
    weight = rng.integers(-127, 128, (8, channels // groups, 3, 3)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 8).astype(np.float32)
    bias = rng.integers(-4000, 4000, 8).astype(np.int32)
    attrs = {"x_scale": float(np.float32(rng.uniform(0.01, 0.1))),
             "x_zero_point": int(rng.integers(-20, 20)),
             "y_scale": float(np.float32(rng.uniform(0.05, 0.5))),
             "y_zero_point": int(rng.integers(-10, 10)), "pads": [1, 0, 1, 2], "groups": groups}
    if activation:
        attrs["activation"] = activation
    inputs = [Value("x", x.shape, "int8"), Constant("w", weight), Constant("w_scale", w_scale),
              Constant("bias", bias)]
    return one_node_graph("qconv2d", inputs, attrs, "int8"), {"x": x}


def numpy_qconv2d(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The documented arithmetic, in int64 loops and float32 numpy."""
    node = graph.nodes[0]
    weight, w_scale, bias = (v.data for v in node.inputs[1:])
    attrs = node.attrs
    top, left, bottom, right = attrs["pads"]
    centered = x.astype(np.int64) - attrs["x_zero_point"]
    padded = np.pad(centered, [(0, 0), (0, 0), (top, bottom), (left, right)])
    out_c, per_group = weight.shape[:2]
    out_h, out_w = padded.shape[2] - 2, padded.shape[3] - 2
    acc = np.zeros((1, out_c, out_h, out_w), np.int64)
    for o in range(out_c):
        first = (o // (out_c // attrs["groups"])) * per_group
        for i in range(out_h):
            for j in range(out_w):
                window = padded[0, first:first + per_group, i:i + 3, j:j + 3]
                acc[0, o, i, j] = np.sum(window * weight[o].astype(np.int64)) + bias[o]
    multiplier = np.float32(attrs["x_scale"]) * w_scale / np.float32(attrs["y_scale"])
    scaled = acc.astype(np.float32) * multiplier[None, :, None, None]
    low = attrs["y_zero_point"] if attrs.get("activation") == "relu" else -128
    return np.clip(np.round(scaled) + attrs["y_zero_point"], low, 127).astype(np.int8)


@pytest.mark.parametrize("seed,groups,activation", [(0, 1, None), (1, 2, "relu"), (2, 4, None)])
def test_qconv2d_reference_matches_integer_math(seed, groups, activation):
    graph, feeds = qconv_case(seed, groups, activation)
    expected = numpy_qconv2d(graph, feeds["x"])
    actual = executor.run(graph, feeds)["y"]
    assert len(np.unique(expected)) > 20  # a spread of values, not a saturated block
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("seed,groups,activation", [(3, 1, None), (4, 2, "relu"), (5, 4, "relu")])
def test_qconv2d_reference_equals_tvm_bit_for_bit(seed, groups, activation):
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    graph, feeds = qconv_case(seed, groups, activation)
    expected = executor.run(graph, feeds)["y"]
    actual = build(graph, "cpu").run(feeds)["y"]
    assert actual.dtype == np.int8
    np.testing.assert_array_equal(actual, expected)


def test_qconv2d_lowers_to_int8_conv_with_int32_accumulation():
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import lower_to_relax

    graph, _ = qconv_case(6)
    zero_point = graph.nodes[0].attrs["x_zero_point"]
    assert zero_point != 0  # padding with it needs a TIR function of its own
    module = lower_to_relax(graph)
    [conv] = [func for var, func in module.functions.items() if var.name_hint != "main"]
    text = conv.script()
    # int8 input and weight in, int32 out, and the int8 input padded with its zero point.
    assert 'x: T.Buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(5)), "int8")' in text
    assert 'w: T.Buffer((T.int64(8), T.int64(4), T.int64(3), T.int64(3)), "int8")' in text
    assert 'T.Buffer((T.int64(1), T.int64(8), T.int64(6), T.int64(5)), "int32")' in text
    assert f"T.int8({zero_point})" in text
    assert 'T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(7)), "int8")' in text


# --- the static int8 pass ---------------------------------------------------------------------


def docstring_lines() -> tuple[list[str], list[str]]:
    doc = available_passes()["quantize"].__doc__
    before, after = re.search(r"before:\n(.*?)\n\s*after:\n(.*?)(?:\n\s*\n|\s*$)", doc,
                              re.S).groups()
    return ([line.strip() for line in before.splitlines()],
            [line.strip() for line in after.splitlines()])


def node_lines_without_attrs(graph: Graph) -> list[str]:
    lines = format_graph(graph).splitlines()[1:]
    return [re.sub(r" \{.*\}", "", line).strip() for line in lines]


def test_docstring_example_matches_pass():
    # x[1,2] -> fc (identity weight, bias [-5.984375, 5.96875]) -> y
    x = Value("x", (1, 2))
    weight = Constant("w", np.eye(2, dtype=np.float32))
    bias = Constant("b", np.array([-5.984375, 5.96875], np.float32))
    graph = Graph("example", [x], [Value("y", (1, 2))], [])
    graph.nodes = [Node("fc", "linear", [x, weight, bias], graph.outputs)]
    before, after = docstring_lines()
    assert node_lines_without_attrs(graph) == before
    assert before != after

    calibration = [{"x": np.array([[3.984375, 0.0]], np.float32)}]
    result = quantized(graph, "quantize:int8", calibration)

    assert node_lines_without_attrs(result) == after
    fc = result.node("fc").attrs
    assert (fc["x_scale"], fc["x_zero_point"]) == (0.015625, 0)
    assert (fc["y_scale"], fc["y_zero_point"]) == (0.03125, 64)
    output = executor.run(result, calibration[0])["y"]
    np.testing.assert_array_equal(output, np.array([[-2.0, 5.96875]], np.float32))



def test_static_int8_structure():
    graph, _ = small_cnn()
    assert "qconv2d" not in ops_of(graph)
    result = quantized(graph, "quantize:int8", calibration=cnn_batches(3))
    assert ops_of(result) == [
        "quantize", "qconv2d", "qconv2d", "dequantize", "hardswish", "reshape", "quantize",
        "qlinear", "qlinear", "dequantize",
    ]
    assert result.nodes[1].attrs["activation"] == "relu"
    assert "activation" not in result.nodes[2].attrs  # hardswish runs in float after it
    assert result.nodes[1].inputs[0].dtype == "uint8"  # the default activation dtype
    assert result.nodes[1].attrs["y_zero_point"] == 0  # relu output starts at 0.0
    assert result.nodes[1].inputs[1].dtype == "int8"
    assert result.nodes[1].inputs[3].dtype == "int32"


@pytest.mark.parametrize("mode", ["int8", "dynamic", "weight-only"])
def test_quantized_weights_count_as_params(mode):
    graph, _ = small_cnn()
    result = quantized(graph, f"quantize:{mode}", calibration=cnn_batches(3))
    constants = result.constants()
    integer = sum(c.size for c in constants if c.name.endswith(("weight_q", "bias_q")))
    floats = sum(c.size for c in constants if c.data.dtype == np.float32)
    assert integer > 0  # the quantized weights, which the count once left out
    # Each weight and bias becomes an int8 weight, an int32 bias or a float, and the
    # per-channel scales add to them. Zero points do not count.
    assert graph_stats(result).params == integer + floats
    assert graph_stats(result).params >= graph_stats(graph).params


def test_static_int8_matches_float_and_backends():
    graph, _ = small_cnn()
    calibration = cnn_batches(8)
    result = quantized(graph, "quantize:int8", calibration=calibration)
    feeds = cnn_feeds()
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    assert output_error([expected], [actual]) < 0.05  # a few int8 steps of the output range
    np.testing.assert_array_equal(run_ort(result, feeds)[0], actual)


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_static_int8_tvm_equals_reference(activations):
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    graph, _ = small_cnn()
    result = quantized(graph, f"quantize:int8:activations={activations}",
                       calibration=cnn_batches(4))
    assert result.nodes[1].inputs[0].dtype == activations
    feeds = cnn_feeds()
    expected = executor.run(result, feeds)["output"]
    np.testing.assert_array_equal(build(result, "cpu").run(feeds)["output"], expected)


def test_int8_activations():
    graph, _ = small_cnn()
    result = quantized(graph, "quantize:int8:activations=int8", calibration=cnn_batches(8))
    layers = [node for node in result.nodes if node.op in ("qconv2d", "qlinear")]
    assert all(node.inputs[0].dtype == "int8" for node in layers)
    assert layers[0].attrs["y_zero_point"] == -128
    feeds = cnn_feeds()
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    assert output_error([expected], [actual]) < 0.05
    np.testing.assert_array_equal(run_ort(result, feeds)[0], actual)


def test_skip_patterns_keep_layers_float():
    graph, _ = small_cnn()
    layer_names = [node.name for node in graph.nodes if node.op == "linear"]
    last = layer_names[-1]
    result = quantized(graph, f"quantize:int8:skip={last}", calibration=cnn_batches(2))
    assert result.node(last).op == "linear"
    assert result.node(layer_names[0]).op == "qlinear"
    every_linear = quantized(graph, f"quantize:int8:skip={layer_names[0][0]}*;{last}",
                             calibration=cnn_batches(2))
    assert [n.op for n in every_linear.nodes if n.name in layer_names] == ["linear", "linear"]


def test_skip_pattern_without_match_raises():
    graph, _ = small_cnn()
    with pytest.raises(PassError, match="skip pattern 'head\\*' matches no quantizable layer"):
        quantized(graph, "quantize:int8:skip=head*", calibration=cnn_batches(1))


@pytest.mark.parametrize("text,message", [
    ("quantize:fp16", "does not accept the word 'fp16'"),
    ("quantize:int8:calib=kl", "calib must be one of minmax, percentile, mse"),
    ("quantize:int8:percentile=40", "percentile must be in"),
    ("quantize:int8:activations=int4", "activations must be one of"),
])
def test_invalid_options_raise(text, message):
    with pytest.raises(OptionError, match=message):
        PassManager(text)


def test_calibration_splits_batches_into_graph_batches():
    graph, _ = small_cnn(batch=2)
    calibration = cnn_batches(3, batch=8)  # each contains four of the graph's batches
    report = PassManager("quantize:int8", calibration=calibration).run(graph)
    assert report.records[0].details["calibration_runs"] == 12


def test_calibration_batch_of_wrong_shape_raises():
    graph, _ = small_cnn(batch=2)
    bad = [{"input": np.zeros((3, 3, 8, 8), np.float32)}]
    with pytest.raises(PassError, match="N a multiple of 2"):
        PassManager("quantize:int8", calibration=bad).run(graph)


# --- observers --------------------------------------------------------------------------------


def test_observers_on_outlier():
    batches = [RNG.standard_normal(4000).astype(np.float32) for _ in range(3)]
    batches[1][17] = 80.0  # one outlier among 12,000 elements
    minmax, percentile = MinMaxObserver(), PercentileObserver(99.9)
    for observer in (minmax, percentile):
        for batch in batches:
            observer.update(batch)
    assert minmax.range()[1] == 80.0
    low, high = percentile.range()
    assert 2.5 < high < 4.0  # the 99.9th percentile of a standard normal is 3.09
    assert -4.0 < low < -2.5


def test_mse_observer_trims_heavy_tails():
    data = np.random.default_rng(0).standard_t(2, size=20000).astype(np.float32)
    observer = MseObserver()
    observer.update(data)
    low, high = observer.range()
    assert float(data.min()) < low < 0
    assert 0 < high < float(data.max())
    # At 8 bits clipping a tail costs more than coarser steps, so the trim is small (~5%).
    assert observer.error(low, high) < observer.error(float(data.min()), float(data.max()))


def test_percentile_calibration_in_pipeline():
    graph, _ = small_cnn()
    calibration = cnn_batches(4)
    minmax = quantized(graph, "quantize:int8:calib=minmax", calibration=calibration)
    clipped = quantized(graph, "quantize:int8:calib=percentile:percentile=99", calibration)
    assert clipped.nodes[1].attrs["y_scale"] < minmax.nodes[1].attrs["y_scale"]
    mse = quantized(graph, "quantize:int8:calib=mse", calibration)
    assert mse.nodes[1].attrs["y_scale"] <= minmax.nodes[1].attrs["y_scale"]


# --- sensitivity ------------------------------------------------------------------------------


def test_sensitivity_sorted_and_matches_single_layer_runs():
    graph, _ = small_cnn()
    calibration = cnn_batches(4)
    feeds = cnn_feeds()
    report = sensitivity(graph, feeds, calibration)
    layers = [node.name for node in graph.nodes if node.op in ("conv2d", "linear")]
    assert sorted(item.layer for item in report) == sorted(layers)
    errors = [item.error for item in report]
    assert errors == sorted(errors, reverse=True)
    assert all(error > 0 for error in errors)
    # Quantizing only the most sensitive layer (skipping every other) gives its error.
    others = ";".join(name for name in layers if name != report[0].layer)
    single = quantized(graph, f"quantize:int8:skip={others}", calibration)
    expected = executor.run(graph, feeds)["output"]
    error = output_error([expected], [executor.run(single, feeds)["output"]])
    assert error == pytest.approx(report[0].error, rel=1e-6)


def test_sensitivity_option_fills_details():
    graph, _ = small_cnn()
    report = PassManager("quantize:int8:sensitivity=true", feeds=cnn_feeds()).run(graph)
    rows = report.records[0].details["sensitivity"]
    assert len(rows) == 4
    assert rows[0]["error"] >= rows[-1]["error"]


def test_float_layers_keeps_most_sensitive_layer_float():
    graph, _ = small_cnn()
    calibration = cnn_batches(4)
    feeds = cnn_feeds()
    most_sensitive = sensitivity(graph, feeds, calibration)[0].layer
    manager = PassManager("quantize:int8:float_layers=1", calibration=calibration, feeds=feeds)
    report = manager.run(graph)
    assert report.records[0].details["float_layers"] == [most_sensitive]
    assert report.records[0].details["quantized"] == 3
    ops = {node.name: node.op for node in report.graph.nodes}
    assert ops[most_sensitive] in ("conv2d", "linear")
    assert sum(op in ("qconv2d", "qlinear") for op in ops.values()) == 3
    # The same graph as skipping that layer by name.
    skipped = quantized(graph, f"quantize:int8:skip={most_sensitive}", calibration)
    expected = executor.run(skipped, feeds)["output"]
    np.testing.assert_array_equal(executor.run(report.graph, feeds)["output"], expected)


def test_float_layers_rejects_negative_count():
    with pytest.raises(OptionError, match="float_layers must be 0 or more"):
        PassManager("quantize:int8:float_layers=-1")


# --- dynamic and weight-only modes ------------------------------------------------------------


def transformer_block() -> tuple[Graph, torch.Tensor]:
    """ids[2,6] -> embedding(200x32) -> x;  layer_norm(x + linear(gelu(linear(x)))), 32->64->32"""
    torch.manual_seed(5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(200, 32)
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
            self.norm = nn.LayerNorm(32)

        def forward(self, ids):
            x = self.embed(ids)
            return self.norm(x + self.down(nn.functional.gelu(self.up(x))))

    ids = torch.randint(0, 200, (2, 6))
    graph = import_torch(Block().eval(), (ids,))
    return PassManager(DEFAULT_PIPELINE).run(graph).graph, ids


def test_dynamic_quantizes_linear_layers():
    graph, x = transformer_block()
    result = quantized(graph, "quantize:dynamic")
    assert ops_of(result).count("dynamic_qlinear") == 2
    assert "linear" not in ops_of(result)
    assert result.node("embed").inputs[1].dtype == "int8"
    # int8 weights and tables; biases, layer_norm parameters and scales stay float32.
    assert graph_stats(graph).bytes / graph_stats(result).bytes > 3.3
    feeds = {graph.inputs[0].name: x.numpy()}
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    flat_expected, flat_actual = expected.reshape(-1), actual.reshape(-1)
    cosine = flat_expected @ flat_actual / (np.linalg.norm(expected) * np.linalg.norm(actual))
    assert cosine > 0.999
    # ONNX Runtime (DynamicQuantizeLinear, MatMulInteger) computes the same integers.
    np.testing.assert_allclose(run_ort(result, feeds)[0], actual, rtol=1e-5, atol=1e-5)


def test_dynamic_tvm_matches_reference():
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    graph, x = transformer_block()
    result = quantized(graph, "quantize:dynamic")
    feeds = {graph.inputs[0].name: x.numpy()}
    expected = executor.run(result, feeds)["output"]
    # Float outputs: TVM may contract multiply-add into FMA, so allow float32 rounding.
    np.testing.assert_allclose(build(result, "cpu").run(feeds)["output"], expected,
                               rtol=1e-5, atol=1e-5)


def test_weight_only_is_four_times_smaller():
    graph, _ = small_cnn()
    result = quantized(graph, "quantize:weight-only")
    assert ops_of(result).count("dequantize") == 4
    ratio = graph_stats(graph).bytes / graph_stats(result).bytes
    assert 3.5 < ratio <= 4.0
    feeds = cnn_feeds()
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    assert output_error([expected], [actual]) < 0.02
    np.testing.assert_allclose(run_ort(result, feeds)[0], actual, rtol=1e-5, atol=1e-5)


# --- digits CNN -------------------------------------------------------------------------------


def digits_split():
    spec = importlib.util.spec_from_file_location("digits_cnn_model", DIGITS_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_split()


def accuracy(graph: Graph, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        logits = executor.run(graph, {"input": images[start:start + batch]})["output"]
        correct += int(np.sum(logits.argmax(axis=1) == labels[start:start + batch]))
    return 100.0 * correct / len(images)


def test_digits_int8_accuracy_and_size():
    train_images, _, test_images, test_labels = digits_split()
    batch = 40  # 360 test images = 9 batches
    model, _ = digits_cnn()
    graph = import_torch(model, (torch.from_numpy(test_images[:batch]),))
    float_graph = PassManager(DEFAULT_PIPELINE).run(graph).graph
    calibration = [{"input": train_images[:1400]}]  # split into 35 runs of the graph
    int8_graph = quantized(float_graph, "quantize:int8", calibration=calibration)
    assert ops_of(int8_graph).count("qconv2d") == 2
    float_accuracy = accuracy(float_graph, test_images, test_labels, batch)
    int8_accuracy = accuracy(int8_graph, test_images, test_labels, batch)
    assert float_accuracy > 95.0
    assert abs(int8_accuracy - float_accuracy) <= 0.5
    ratio = graph_stats(float_graph).bytes / graph_stats(int8_graph).bytes
    assert 3.7 < ratio <= 4.0


# --- qconv_transpose2d and qmatmul ------------------------------------------------------------


def qconv_transpose_case(seed: int, activation: str | None = None, dtype: str = "uint8"):
    """x uint8 [1,4,5,6] -> qconv_transpose2d(stride 2, uneven pads, output padding) -> [1,3,..]"""
    rng = np.random.default_rng(seed)
    low, high = (0, 256) if dtype == "uint8" else (-128, 128)
    x = rng.integers(low, high, (1, 4, 5, 6)).astype(dtype)
    weight = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w_scale = rng.uniform(0.001, 0.01, 3).astype(np.float32)
    bias = rng.integers(-4000, 4000, 3).astype(np.int32)
    attrs = {"x_scale": float(np.float32(rng.uniform(0.01, 0.1))),
             "x_zero_point": int(rng.integers(low + 20, high - 20)),
             "y_scale": float(np.float32(rng.uniform(0.05, 0.5))),
             "y_zero_point": int(rng.integers(low + 10, high - 10)), "strides": [2, 2],
             "pads": [1, 0, 1, 1], "output_padding": [1, 1]}
    if activation:
        attrs["activation"] = activation
    inputs = [Value("x", x.shape, dtype), Constant("w", weight), Constant("w_scale", w_scale),
              Constant("bias", bias)]
    return one_node_graph("qconv_transpose2d", inputs, attrs, dtype), {"x": x}


def numpy_qconv_transpose2d(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The documented arithmetic: scatter each input element times the kernel, in int64."""
    node = graph.nodes[0]
    weight, w_scale, bias = (v.data for v in node.inputs[1:])
    attrs = node.attrs
    top, left, bottom, right = attrs["pads"]
    centered = x.astype(np.int64) - attrs["x_zero_point"]
    _, channels, height, width = x.shape
    out_c, kernel = weight.shape[1], weight.shape[2]
    full = np.zeros((out_c, (height - 1) * 2 + kernel + 1, (width - 1) * 2 + kernel + 1),
                    np.int64)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                full[:, 2 * i:2 * i + kernel, 2 * j:2 * j + kernel] += (
                    centered[0, c, i, j] * weight[c].astype(np.int64))
    acc = full[:, top:full.shape[1] - bottom, left:full.shape[2] - right] + bias[:, None, None]
    multiplier = np.float32(attrs["x_scale"]) * w_scale / np.float32(attrs["y_scale"])
    scaled = acc.astype(np.float32) * multiplier[:, None, None]
    low, high = QUANTIZED_RANGES[str(x.dtype)]
    if attrs.get("activation") == "relu":
        low = attrs["y_zero_point"]
    return np.clip(np.round(scaled) + attrs["y_zero_point"], low, high).astype(x.dtype)[None]


@pytest.mark.parametrize("seed,activation,dtype", [(0, None, "uint8"), (1, "relu", "int8")])
def test_qconv_transpose2d_reference_matches_integer_math(seed, activation, dtype):
    graph, feeds = qconv_transpose_case(seed, activation, dtype)
    expected = numpy_qconv_transpose2d(graph, feeds["x"])
    actual = executor.run(graph, feeds)["y"]
    assert actual.shape == (1, 3, 10, 13)
    assert len(np.unique(expected)) > 20  # a spread of values, not a saturated block
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("seed,activation,dtype", [(2, None, "uint8"), (3, "relu", "uint8"),
                                                   (4, None, "int8")])
def test_qconv_transpose2d_reference_equals_tvm_bit_for_bit(seed, activation, dtype):
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build, lower_to_relax

    graph, feeds = qconv_transpose_case(seed, activation, dtype)
    text = str(lower_to_relax(graph))
    assert f'R.nn.conv2d_transpose(x, ' in text  # the int8 input itself, not a float copy
    assert 'out_dtype="int32"' in text
    expected = executor.run(graph, feeds)["y"]
    actual = build(graph, "cpu").run(feeds)["y"]
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(actual, expected)


def test_qconv_transpose2d_onnx_within_one_step():
    graph, feeds = qconv_transpose_case(5, "relu")
    expected = executor.run(graph, feeds)["y"].astype(np.int32)
    actual = run_ort(graph, feeds)[0].astype(np.int32)
    # ONNX Runtime sums the dequantized products in float32 (the QDQ form has no integer
    # transposed convolution), so an output next to a rounding boundary may move one step.
    assert np.abs(actual - expected).max() <= 1
    assert np.mean(actual != expected) < 0.02


def qmatmul_case(seed: int, a_dtype: str = "uint8", b_dtype: str = "uint8"):
    """a [2,3,5,7] @ b [3,7,4] (b broadcast over the leading batch dim) -> [2,3,5,4]"""
    rng = np.random.default_rng(seed)

    def draw(dtype, shape):
        low, high = QUANTIZED_RANGES[dtype]
        return rng.integers(low, high + 1, shape).astype(dtype)

    a, b = draw(a_dtype, (2, 3, 5, 7)), draw(b_dtype, (3, 7, 4))
    attrs = {"a_scale": float(np.float32(rng.uniform(0.01, 0.1))),
             "a_zero_point": int(rng.integers(*QUANTIZED_RANGES[a_dtype])),
             "b_scale": float(np.float32(rng.uniform(0.01, 0.1))),
             "b_zero_point": int(rng.integers(*QUANTIZED_RANGES[b_dtype])),
             "y_scale": float(np.float32(rng.uniform(0.5, 2.0))),
             "y_zero_point": int(rng.integers(*QUANTIZED_RANGES[a_dtype]))}
    inputs = [Value("a", a.shape, a_dtype), Value("b", b.shape, b_dtype)]
    return one_node_graph("qmatmul", inputs, attrs, a_dtype), {"a": a, "b": b}


def numpy_qmatmul(graph: Graph, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    attrs = graph.nodes[0].attrs
    a_centered = a.astype(np.int64) - attrs["a_zero_point"]
    acc = a_centered @ (b.astype(np.int64) - attrs["b_zero_point"])
    multiplier = (np.float32(attrs["a_scale"]) * np.float32(attrs["b_scale"])
                  / np.float32(attrs["y_scale"]))
    low, high = QUANTIZED_RANGES[str(a.dtype)]
    scaled = acc.astype(np.float32) * multiplier
    return np.clip(np.round(scaled) + attrs["y_zero_point"], low, high).astype(a.dtype)


@pytest.mark.parametrize("seed,a_dtype,b_dtype", [(0, "uint8", "uint8"), (1, "int8", "int8"),
                                                  (2, "uint8", "int8")])
def test_qmatmul_reference_tvm_and_onnx_agree(seed, a_dtype, b_dtype):
    graph, feeds = qmatmul_case(seed, a_dtype, b_dtype)
    expected = numpy_qmatmul(graph, feeds["a"], feeds["b"])
    assert len(np.unique(expected)) > 20
    np.testing.assert_array_equal(executor.run(graph, feeds)["y"], expected)
    np.testing.assert_array_equal(run_ort(graph, feeds)[0], expected)
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build, lower_to_relax

    assert 'R.matmul(a, b, out_dtype="int32")' in str(lower_to_relax(graph))
    np.testing.assert_array_equal(build(graph, "cpu").run(feeds)["y"], expected)


def test_qmatmul_rejects_rank_one():
    inputs = [Value("a", (7,), "uint8"), Value("b", (7, 4), "uint8")]
    attrs = {"a_scale": 0.1, "b_scale": 0.1, "y_scale": 1.0}
    with pytest.raises(ShapeError, match="qmatmul 'qmatmul': inputs must have rank 2 or more"):
        one_node_graph("qmatmul", inputs, attrs, "uint8")


def decoder_block() -> tuple[Graph, nn.Module]:
    """conv(3->8, relu) -> conv_transpose(8->4, stride 2, relu) -> conv_transpose(4->2)"""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
    ).eval()
    graph = import_torch(model, (torch.randn(2, 3, 8, 8),))
    return PassManager(DEFAULT_PIPELINE).run(graph).graph, model


def test_static_int8_conv_transpose_end_to_end():
    graph, _ = decoder_block()
    assert "conv_transpose2d" in ops_of(graph)
    result = quantized(graph, "quantize:int8", calibration=cnn_batches(6))
    assert ops_of(result) == ["quantize", "qconv2d", "qconv_transpose2d", "qconv_transpose2d",
                              "dequantize"]
    layer = result.nodes[2]
    assert layer.inputs[2].shape == (4,)  # one scale per output channel (weight axis 1)
    feeds = cnn_feeds()
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    assert output_error([expected], [actual]) < 0.03  # a few int8 steps of the output range
    onnx_output = run_ort(result, feeds)[0]
    # One int8 step of the final output, from float sums inside ConvTranspose (see above).
    step = result.nodes[-1].inputs[1].data
    assert np.abs(onnx_output - actual).max() <= step * 1.001
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    np.testing.assert_array_equal(build(result, "cpu").run(feeds)["output"], actual)


def test_weight_only_conv_transpose_scales_axis_one():
    graph, _ = decoder_block()
    result = quantized(graph, "quantize:weight-only")
    dequantize = [node for node in result.nodes if node.op == "dequantize"]
    assert [node.attrs["axis"] for node in dequantize] == [0, 1, 1]
    assert dequantize[1].inputs[1].shape == (4,)  # weight [8, 4, 2, 2]: 4 output channels
    feeds = cnn_feeds()
    expected = executor.run(graph, feeds)["output"]
    actual = executor.run(result, feeds)["output"]
    assert output_error([expected], [actual]) < 0.01  # int8 weights, float activations
    np.testing.assert_allclose(run_ort(result, feeds)[0], actual, rtol=1e-4, atol=1e-5)


def attention_block() -> tuple[Graph, nn.Module]:
    """q, k, v = linear(x); softmax(q @ k^T / 4) @ v -> linear, one head of 16"""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.out = nn.Linear(16, 16)

        def forward(self, x):
            scores = self.q(x) @ self.k(x).transpose(1, 2) / 4.0
            return self.out(torch.softmax(scores, dim=-1) @ self.v(x))

    torch.manual_seed(9)
    model = Attention().eval()
    graph = import_torch(model, (torch.randn(2, 6, 16),))
    return PassManager(DEFAULT_PIPELINE).run(graph).graph, model


def attention_batches(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 6, 16)).astype(np.float32)} for _ in range(count)]


def test_matmul_option_quantizes_attention():
    graph, _ = attention_block()
    name = graph.inputs[0].name
    calibration = [{name: batch["x"]} for batch in attention_batches(6)]
    default = quantized(graph, "quantize:int8", calibration=calibration)
    assert ops_of(default).count("matmul") == 2
    assert "qmatmul" not in ops_of(default)
    result = quantized(graph, "quantize:int8:matmul=true", calibration=calibration)
    assert ops_of(result).count("qmatmul") == 2
    assert "matmul" not in ops_of(result)
    feeds = {name: attention_batches(1, seed=42)[0]["x"]}
    expected = executor.run(graph, feeds)[graph.outputs[0].name]
    actual = executor.run(result, feeds)[graph.outputs[0].name]
    assert output_error([expected], [actual]) < 0.05
    np.testing.assert_array_equal(run_ort(result, feeds)[0], actual)
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    built = build(result, "cpu").run(feeds)[graph.outputs[0].name]
    np.testing.assert_array_equal(built, actual)


def constant_matmul_graph() -> Graph:
    """x [2,5,6] -> matmul(x, @W [6,4]) -> y [2,5,4], and @M [3,5] -> matmul(@M, x) -> z [2,3,6]

    Columns of W differ in scale by 100x, so per-tensor weight scales would lose the small
    ones.
    """
    rng = np.random.default_rng(5)
    x = Value("x", (2, 5, 6))
    matrix = rng.standard_normal((6, 4)).astype(np.float32) * np.float32([0.01, 0.1, 1, 0.5])
    left = Constant("M", rng.standard_normal((3, 5)).astype(np.float32))
    y, z = Value("y", ()), Value("z", ())
    nodes = [Node("proj", "matmul", [x, Constant("W", matrix)], [y]),
             Node("mix", "matmul", [left, x], [z])]
    graph = Graph("constant_matmul", [x], [y, z], nodes)
    infer_shapes(graph)
    return graph


def test_constant_matmul_becomes_qlinear():
    graph = constant_matmul_graph()
    rng = np.random.default_rng(6)
    calibration = [{"x": rng.standard_normal((2, 5, 6)).astype(np.float32)} for _ in range(8)]
    result = quantized(graph, "quantize:int8,dce", calibration=calibration)
    # Only the constant second operand makes a linear layer; M @ x stays float.
    assert ops_of(result) == ["quantize", "qlinear", "dequantize", "matmul"]
    layer = result.nodes[1]
    weight, w_scale = layer.inputs[1], layer.inputs[2]
    assert weight.shape == (4, 6)  # W.T
    assert w_scale.shape == (4,)  # one scale per column of W
    assert w_scale.data[0] < w_scale.data[2] / 20

    # Held-out inputs at half the calibration spread, so that none saturates.
    feeds = {"x": rng.standard_normal((2, 5, 6)).astype(np.float32) * np.float32(0.5)}
    expected = executor.run(graph, feeds)
    actual = executor.run(result, feeds)
    # Within 3 output steps of float (0.94 measured): output rounding adds half a step,
    # input and weight rounding the rest.
    y_scale = float(result.nodes[2].inputs[1].data)
    assert np.abs(actual["y"] - expected["y"]).max() <= 3 * y_scale
    np.testing.assert_array_equal(actual["z"], expected["z"])
    np.testing.assert_array_equal(run_ort(result, feeds)[0], actual["y"])
    pytest.importorskip("tvm")
    from graphcomp.backends.tvm import build

    np.testing.assert_array_equal(build(result, "cpu").run(feeds)["y"], actual["y"])


# --- datasets, the calibration split and progress ---------------------------------------------


def write_npy_folder(folder: Path, count: int = 6, batch: int = 2) -> dict[str, np.ndarray]:
    """A dataset folder for small_cnn(batch): input.npy [count*batch,3,8,8] and labels.npy."""
    rng = np.random.default_rng(11)
    arrays = {"input": rng.standard_normal((count * batch, 3, 8, 8)).astype(np.float32),
              "labels": rng.integers(0, 4, count * batch)}
    folder.mkdir(exist_ok=True)
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return arrays


def test_npy_folder_matches_npz(tmp_path):
    graph, _ = small_cnn()
    arrays = write_npy_folder(tmp_path / "data")
    np.savez(tmp_path / "data.npz", **arrays)
    from_folder = load_dataset(tmp_path / "data", graph)
    from_file = load_dataset(tmp_path / "data.npz", graph)
    assert len(from_folder.batches) == 6
    for folder_batch, file_batch in zip(from_folder.batches, from_file.batches):
        np.testing.assert_array_equal(folder_batch["input"], file_batch["input"])
    np.testing.assert_array_equal(from_folder.labels, arrays["labels"])


def test_npy_folder_errors(tmp_path, caplog):
    graph, _ = small_cnn()
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(ShapeError, match=r"missing file\(s\) \['input.npy'\].*no .npy files"):
        load_dataset(folder, graph)
    (folder / "input.npy").write_bytes(b"not an array")
    with pytest.raises(GraphcompError, match="input.npy: not a readable .npy file"):
        load_dataset(folder, graph)
    np.save(folder / "input.npy", np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(ShapeError, match="multiple of the batch size 2"):
        load_dataset(folder, graph)
    np.save(folder / "input.npy", np.zeros((4, 3, 8, 8), np.float32))
    np.save(folder / "images.npy", np.zeros(2))
    assert len(load_dataset(folder, graph).batches) == 2
    assert "ignoring file(s) ['images.npy']" in caplog.text


def test_calibrating_pipeline_verifies_on_held_out_batches(tmp_path):
    graph, _ = small_cnn()
    write_npy_folder(tmp_path / "data", count=6)
    dataset = load_dataset(tmp_path / "data", graph)
    calibration, verification, summary = split_calibration(
        dataset, parse_pipeline("fold-bn,quantize:int8"))
    assert summary == {"calibration_batches": 3, "held_out": True}
    assert len(calibration.batches) == 3
    assert len(verification.batches) == 3
    assert verification.batches[0]["input"] is dataset.batches[3]["input"]
    np.testing.assert_array_equal(verification.labels, dataset.labels[6:])
    assert len(calibration.labels) == 6


def test_lossless_pipeline_keeps_all_batches():
    graph, _ = small_cnn()
    dataset = Dataset(cnn_batches(4))
    calibration, verification, summary = split_calibration(
        dataset, parse_pipeline("fold-bn,quantize:dynamic"))
    assert summary["held_out"] is False
    assert calibration is dataset
    assert verification is dataset


def test_single_batch_cannot_be_held_out(caplog):
    dataset = Dataset(cnn_batches(1), source="data.npz")
    calibration, verification, summary = split_calibration(dataset,
                                                           parse_pipeline("quantize:int8"))
    assert calibration.batches == verification.batches
    assert summary["held_out"] is False
    assert "calibration and verification use the same data" in summary["note"]


def test_random_calibration_data_warns(caplog):
    graph, _ = small_cnn()
    split_calibration(random_feeds(graph, 0, 4), parse_pipeline("quantize:int8"))
    assert "quantize calibrate(s) on seeded random inputs, which are not representative" in \
        caplog.text
    caplog.clear()
    split_calibration(random_feeds(graph, 0, 4), parse_pipeline("quantize:weight-only"))
    assert "not representative" not in caplog.text


def test_calibration_reports_progress():
    graph, _ = small_cnn(batch=2)
    calls = []
    manager = PassManager("quantize:int8", calibration=cnn_batches(3, batch=4),
                          work_progress=lambda *call: calls.append(call))
    manager.run(graph)
    assert calls == [("calibrating", done, 6) for done in range(7)]


# --- tuned int8 artifact ----------------------------------------------------------------------


@pytest.mark.slow
def test_tuned_int8_digits_compile_verifies(tmp_path):
    """The CLI tunes the int8 kernels with MetaSchedule and the tuned artifact verifies.

    Takes one to three minutes on 2 cores: 14 kernels, 2 trials each, mostly builder start-up.
    """
    pytest.importorskip("tvm")
    from graphcomp.cli import main
    from graphcomp.models import digits_data

    data = tmp_path / "digits"
    data.mkdir()
    test_split = digits_data("test")
    np.save(data / "input.npy", test_split["input"][:64])
    np.save(data / "labels.npy", test_split["labels"][:64])
    out = tmp_path / "out"
    code = main(["compile", "zoo:digits-cnn", "--passes", "fold-bn,quantize:int8", "--tune",
                 "--trials", "2", "--tuning-db", str(tmp_path / "db"), "--data", str(data),
                 "--repeat", "1", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["trials"] > 0
    # With 2 trials a kernel may get only candidates that MetaSchedule fails to build; it
    # then keeps TVM's default schedule. Every kernel with a working schedule is applied.
    assert tuning["tasks"] > 0
    assert tuning["applied_tasks"] == tuning["tasks"] - len(tuning["untuned_tasks"])
    assert tuning["applied_tasks"] >= tuning["tasks"] // 2
    assert report["data"]["held_out"] is True
    assert report["data"]["calibration_batches"] == 32
    assert report["data"]["batches"] == 32  # the held-out half of 64
    # int8 arithmetic with a float dequantize at the end: the tuned build is exact.
    assert report["verify"]["max_abs_error"] == 0.0
    assert report["drift"]["accuracy"] >= report["drift"]["reference_accuracy"] - 1 / 32
