"""The lowrank pass and graphcomp.decompose: SVD, Tucker-2 and CP chains, rank selection.

Tolerances: a full-rank chain reproduces its layer to 1e-5 (absolute and relative) in the
reference executor. A CP chain of a strided conv equals the dense conv with the kernel rebuilt
from its factors to 1e-4. ONNX Runtime and TVM agree with the reference executor to 1e-5.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphcomp import decompose, executor
from graphcomp.analysis import node_macs
from graphcomp.errors import OptionError, PassError
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.layer_timing import LayerTimer, Timing, signature, standalone_graph
from graphcomp.passes.lowrank import DecomposeLowRank, _Target, emit_chain, factorize
from graphcomp.passes.lowrank import find_layers
from graphcomp.pipeline import PassContext, PassManager, available_passes, parse_pipeline
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_node
from graphcomp.verifier import verify_graph

from graph_helpers import decompose_without_mac_check, run_lowrank

TOLERANCE = 1e-5
CP_CHAIN_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """One PyTorch thread and one OpenBLAS thread. On a shared 2-core machine, two threads
    made small models 4 to 50 times slower, and numpy's SVDs about 30 times slower.
    threadpoolctl comes with scikit-learn (the ``models`` extra); without it BLAS keeps its
    default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
    else:
        with threadpool_limits(limits=1):
            yield
    torch.set_num_threads(threads)


# --- helpers ------------------------------------------------------------------------------------


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def one_layer(op: str, x_shape, weight: np.ndarray, bias: np.ndarray | None = None,
              **attrs) -> Graph:
    """A graph of one layer named 'layer': x -> op(x, @layer.weight[, @layer.bias]) -> y."""
    x = Value("x", x_shape)
    inputs = [x, Constant("layer.weight", weight)]
    if bias is not None:
        inputs.append(Constant("layer.bias", bias))
    y = Value("y", ())
    node = Node("layer", op, inputs, [y], attrs)
    (shape, dtype), = infer_node(node)
    y.shape, y.dtype = tuple(shape), dtype
    graph = Graph("one_layer", [x], [y], [node])
    verify_graph(graph)
    return graph


def conv_attrs(strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), **extra) -> dict:
    return {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
            "groups": 1, **extra}


def feeds_for(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: normal(rng, *v.shape) for v in graph.inputs}


def outputs(graph: Graph, feeds) -> np.ndarray:
    return executor.run(graph, feeds)[graph.outputs[0].name]


def assert_same_outputs(before: Graph, after: Graph, tolerance: float = TOLERANCE) -> None:
    feeds = feeds_for(before)
    np.testing.assert_allclose(outputs(after, feeds), outputs(before, feeds),
                               rtol=tolerance, atol=tolerance)


def ops(graph: Graph) -> list[str]:
    return [node.op for node in graph.nodes]


def node_lines(graph: Graph) -> list[str]:
    return [line.strip() for line in format_graph(graph).splitlines()[1:]]


# --- docstring example --------------------------------------------------------------------------


def example_graph() -> Graph:
    # x[2,8] -> linear (8->6, bias) -> y
    rng = np.random.default_rng(0)
    graph = one_layer("linear", (2, 8), normal(rng, 6, 8), normal(rng, 6))
    graph.nodes[0].name = "fc"
    graph.nodes[0].inputs[1].name = "fc.weight"
    graph.nodes[0].inputs[2].name = "fc.bias"
    return graph


def test_docstring_example_matches_pass():
    doc = available_passes()["lowrank"].__doc__
    before, after = re.search(r"before:\n(.*?)\n\s*after:\n(.*?)(?:\n\s*\n|\s*$)", doc,
                              re.S).groups()
    before_lines = [line.strip() for line in before.splitlines()]
    after_lines = [line.strip() for line in after.splitlines()]
    graph = example_graph()
    assert node_lines(graph) == before_lines
    assert before_lines != after_lines

    result_graph, result = run_lowrank(graph, rank=2)

    assert node_lines(result_graph) == after_lines
    assert result.changed
    svd = decompose.truncated_svd(graph.nodes[0].inputs[1].data, 2)
    feeds = feeds_for(graph)
    expected = feeds["x"] @ svd.reconstruct().T + graph.nodes[0].inputs[2].data
    np.testing.assert_allclose(outputs(result_graph, feeds), expected, rtol=TOLERANCE,
                               atol=TOLERANCE)


# --- full rank is exact -------------------------------------------------------------------------


def test_svd_full_rank_linear_is_exact():
    rng = np.random.default_rng(1)
    graph = one_layer("linear", (3, 5, 12), normal(rng, 7, 12), normal(rng, 7),
                      activation="relu")
    result = decompose_without_mac_check(graph, "svd", "ratio", 1.0)
    assert ops(result) == ["linear", "linear"]
    assert result.nodes[0].inputs[1].shape == (7, 12)
    assert result.nodes[1].inputs[1].shape == (7, 7)
    assert_same_outputs(graph, result)


def test_svd_full_rank_matmul_is_exact():
    rng = np.random.default_rng(2)
    graph = one_layer("matmul", (4, 10), normal(rng, 10, 6))
    result = decompose_without_mac_check(graph, "svd", "rank", 6)
    assert ops(result) == ["linear", "linear"]
    assert len(result.nodes[1].inputs) == 2  # a matmul has no bias to keep
    assert_same_outputs(graph, result)


def test_svd_full_rank_strided_1x1_conv_is_exact():
    rng = np.random.default_rng(3)
    attrs = conv_attrs(strides=(2, 2), pads=(1, 0, 1, 2), activation="hardswish")
    graph = one_layer("conv2d", (1, 6, 9, 9), normal(rng, 10, 6, 1, 1), normal(rng, 10),
                      **attrs)
    result = decompose_without_mac_check(graph, "svd", "ratio", 1.0)
    first, last = result.nodes
    assert first.attrs["strides"] == [2, 2]
    assert last.attrs["strides"] == [1, 1]
    assert last.attrs["pads"] == [0, 0, 0, 0]
    assert last.attrs["activation"] == "hardswish"
    assert "activation" not in first.attrs
    assert_same_outputs(graph, result)


@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_full_rank_kxk_conv_is_exact(method):
    rng = np.random.default_rng(4)
    attrs = conv_attrs(strides=(2, 1), pads=(1, 2, 0, 2), dilations=(1, 2), activation="relu")
    graph = one_layer("conv2d", (1, 5, 11, 12), normal(rng, 7, 5, 3, 3), normal(rng, 7),
                      **attrs)
    result = decompose_without_mac_check(graph, method, "ratio", 1.0)
    assert result.nodes[-1].attrs["activation"] == "relu"
    assert_same_outputs(graph, result)


def test_cp_at_exact_rank_is_exact():
    # A [4, 3, 3, 2] kernel has CP rank at most 3 * 3 * 2 = 18 (one term per (C_in, kH, kW)).
    rng = np.random.default_rng(5)
    attrs = conv_attrs(strides=(2, 2), pads=(1, 1, 1, 0), dilations=(2, 1), activation="relu")
    graph = one_layer("conv2d", (1, 3, 10, 9), normal(rng, 4, 3, 3, 2), normal(rng, 4),
                      **attrs)
    assert decompose.cp_exact_rank((4, 3, 3, 2)) == 18
    result = decompose_without_mac_check(graph, "cp", "rank", 18)
    assert ops(result) == ["conv2d"] * 4
    assert_same_outputs(graph, result)


def test_cp_als_recovers_a_known_rank():
    rng = np.random.default_rng(6)
    factors = [rng.standard_normal((dim, 5)) for dim in (12, 8, 3, 3)]
    kernel = decompose.CPFactors(factors).reconstruct()
    fit = decompose.cp_als(kernel, 5)
    assert decompose.relative_error(kernel, fit.reconstruct()) < TOLERANCE
    assert fit.iterations < decompose.CP_MAX_ITERATIONS


def test_tucker2_recovers_a_known_multilinear_rank():
    rng = np.random.default_rng(7)
    core = rng.standard_normal((4, 3, 3, 3))
    out_factor = np.linalg.qr(rng.standard_normal((16, 4)))[0]
    in_factor = np.linalg.qr(rng.standard_normal((10, 3)))[0]
    kernel = decompose.Tucker2Factors(core, out_factor, in_factor).reconstruct()
    fit = decompose.tucker2(kernel, (4, 3))
    assert decompose.relative_error(kernel, fit.reconstruct()) < 1e-12
    lower = decompose.tucker2(kernel, (3, 3))
    assert decompose.relative_error(kernel, lower.reconstruct()) > 1e-3


# --- shapes, MACs and details -------------------------------------------------------------------


def test_tucker2_factor_shapes_and_macs():
    # x[1,8,10,10] -> conv 3x3 (8->16, stride 2, pad 1) -> y[1,16,5,5], ranks (8, 4)
    rng = np.random.default_rng(8)
    graph = one_layer("conv2d", (1, 8, 10, 10), normal(rng, 16, 8, 3, 3), normal(rng, 16),
                      **conv_attrs(strides=(2, 2), pads=(1, 1, 1, 1)))
    result_graph, result = run_lowrank(graph, method="tucker2", ratio=0.5)
    assert [n.inputs[1].shape for n in result_graph.nodes] == [
        (4, 8, 1, 1), (8, 4, 3, 3), (16, 8, 1, 1)]
    assert [n.outputs[0].shape for n in result_graph.nodes] == [
        (1, 4, 10, 10), (1, 8, 5, 5), (1, 16, 5, 5)]
    record = result.details["layers"][0]
    assert record["ranks"] == [8, 4]
    assert record["macs_before"] == 25 * 16 * 8 * 9
    assert record["macs_after"] == 100 * 8 * 4 + 25 * 4 * 9 * 8 + 25 * 8 * 16
    assert record["params_after"] == 4 * 8 + 8 * 4 * 9 + 16 * 8 + 16
    assert record["macs_after"] == sum(node_macs(n) for n in result_graph.nodes)
    assert result.details["macs_after"] == record["macs_after"]


def test_cp_factor_shapes_and_macs():
    # x[1,6,9,9] -> conv 3x3 (6->12, pad 1) -> y[1,12,9,9], CP rank 5
    rng = np.random.default_rng(9)
    graph = one_layer("conv2d", (1, 6, 9, 9), normal(rng, 12, 6, 3, 3),
                      **conv_attrs(pads=(1, 1, 1, 1)))
    result_graph, result = run_lowrank(graph, method="cp", rank=5)
    assert [n.inputs[1].shape for n in result_graph.nodes] == [
        (5, 6, 1, 1), (5, 1, 3, 1), (5, 1, 1, 3), (12, 5, 1, 1)]
    assert [n.attrs["groups"] for n in result_graph.nodes] == [1, 5, 5, 1]
    record = result.details["layers"][0]
    assert record["macs_after"] == 81 * (6 * 5 + 5 * 3 + 5 * 3 + 5 * 12)
    assert record["params_after"] == 5 * (6 + 3 + 3 + 12)
    assert 0.0 < record["error"] < 1.0


def test_cp_1xk_kernel_one_depthwise():
    rng = np.random.default_rng(10)
    graph = one_layer("conv2d", (1, 20, 1, 12), normal(rng, 24, 20, 1, 3),
                      **conv_attrs(strides=(1, 2), pads=(0, 1, 0, 1)))
    result_graph, _ = run_lowrank(graph, method="cp", rank=4)
    depthwise = result_graph.nodes[1]
    assert len(result_graph.nodes) == 3
    assert depthwise.inputs[1].shape == (4, 1, 1, 3)
    assert depthwise.attrs["strides"] == [1, 2]
    assert result_graph.outputs[0].shape == (1, 24, 1, 6)
    exact = decompose_without_mac_check(graph, "cp", "rank", decompose.cp_exact_rank(
        (24, 20, 1, 3)))
    assert_same_outputs(graph, exact)


def test_reconstruction_error_matches_svd_tail():
    rng = np.random.default_rng(11)
    weight = normal(rng, 30, 40)
    graph = one_layer("linear", (2, 40), weight)
    _, result = run_lowrank(graph, rank=10)
    values = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    expected = np.sqrt(np.sum(values[10:] ** 2) / np.sum(values ** 2))
    assert result.details["layers"][0]["error"] == pytest.approx(expected, rel=1e-5)


def test_energy_selects_smallest_rank_keeping_it():
    rng = np.random.default_rng(12)
    weight = (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 50))
              + 0.01 * rng.standard_normal((40, 50))).astype(np.float32)
    graph = one_layer("linear", (2, 50), weight)
    _, result = run_lowrank(graph, energy=0.99)
    assert result.details["layers"][0]["ranks"] == [3]
    assert result.details["layers"][0]["error"] <= np.sqrt(0.01)


def test_layer_without_mac_saving_is_left_alone():
    rng = np.random.default_rng(13)
    graph = one_layer("linear", (2, 16), normal(rng, 16, 16))
    result_graph, result = run_lowrank(graph, ratio=0.5)  # 8 * (16 + 16) == 16 * 16
    assert ops(result_graph) == ["linear"]
    assert not result.changed
    assert "no MAC saving" in result.details["skipped"][0]["reason"]


# --- which layers -------------------------------------------------------------------------------


def three_layer_model():
    """x[1,4,8,8] -> conv 3x3 (4->16) -> relu -> depthwise 3x3 -> flatten -> fc1 -> relu -> fc2"""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 16, 3, padding=1)
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.fc1 = nn.Linear(16 * 8 * 8, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            y = self.depthwise(torch.relu(self.conv(x))).flatten(1)
            return self.fc2(torch.relu(self.fc1(y)))

    torch.manual_seed(0)
    model = Net().eval()
    return model, (torch.randn(1, 4, 8, 8),)


def test_skipped_layers_stay_unchanged():
    model, example = three_layer_model()
    graph = import_torch(model, example)
    result_graph, result = run_lowrank(graph, ratio=0.25, exclude="fc2")
    skipped = {s["layer"]: s["reason"] for s in result.details["skipped"]}
    assert skipped == {"depthwise": "grouped conv", "fc2": "excluded"}
    assert [r["layer"] for r in result.details["layers"]] == ["conv", "fc1"]

    again, second = run_lowrank(result_graph, ratio=0.25, exclude="fc2")
    assert not second.changed
    assert format_graph(again) == format_graph(result_graph)


def test_override_sets_a_layer_its_own_ratio():
    model, example = three_layer_model()
    graph = import_torch(model, example)
    _, result = run_lowrank(graph, ratio=0.5, override="fc*=0.25;conv=0.75")
    ranks = {r["layer"]: r["ranks"] for r in result.details["layers"]}
    assert ranks["fc1"] == [8]  # 0.25 * min(32, 1024)
    assert ranks["conv"] == [12, 3]  # 0.75 * (16, 4)


def test_pipeline_text_words_and_options():
    cp, = parse_pipeline("lowrank:cp:rank=4:exclude=head*;fc2")
    assert cp.config["method"] == "cp"
    assert cp.target.criterion == "rank"
    assert cp.excluded == ["head*", "fc2"]
    vbmf, = parse_pipeline("lowrank:vbmf:override=conv1=0.3;fc=0.5")
    assert vbmf.target.criterion == "vbmf"
    assert [(p, t.value) for p, t in vbmf.overrides] == [("conv1", 0.3), ("fc", 0.5)]
    default, = parse_pipeline("lowrank")
    assert default.config["ratio"] == 0.5


@pytest.mark.parametrize("text, message", [
    ("lowrank:rank=4:energy=0.9", "one of rank, ratio, energy and vbmf, not rank and energy"),
    ("lowrank:ratio=0.5:vbmf", "not ratio and vbmf"),
    ("lowrank:method=tensor", "unknown method 'tensor'"),
    ("lowrank:ratio=1.5", r"ratio must be in \(0, 1\]"),
    ("lowrank:energy=0", r"energy must be in \(0, 1\]"),
    ("lowrank:rank=0", "rank must be at least 1"),
    ("lowrank:override=conv1", "must be PATTERN=VALUE"),
    ("lowrank:rank=4:override=conv1=0.5", "expected an integer rank"),
    ("lowrank:override=conv1=1.5", r"override 'conv1=1.5': ratio must be in \(0, 1\]"),
    ("lowrank:tucker3", "does not accept the word 'tucker3'"),
    ("lowrank:measure=sometimes", "measure must be one of auto, true, false, got 'sometimes'"),
    ("lowrank:min_speedup=0", "min_speedup must be a positive number, got 0.0"),
])
def test_invalid_options_raise(text, message):
    with pytest.raises(OptionError, match=message):
        parse_pipeline(text)


def test_pattern_matching_no_layer_raises():
    model, example = three_layer_model()
    graph = import_torch(model, example)
    with pytest.raises(OptionError, match="pattern 'head\\*' matches no linear"):
        run_lowrank(graph, exclude="head*")


@pytest.mark.parametrize("op, shape, options, message", [
    ("linear", (6, 9), {"rank": 7}, r"rank 7 is above the limit 6 of layer 'layer'.*"
                                    r"min\(out=6, in=9\) for SVD"),
    ("conv2d", (8, 3, 3, 3), {"rank": 4}, r"limit 3 of layer 'layer'.*min\(C_out=8, C_in=3\)"),
    ("conv2d", (8, 3, 3, 3), {"rank": 28, "method": "cp"}, r"limit 27 of layer 'layer'"),
    ("linear", (6, 9), {"rank": 2, "override": "layer=9"}, r"rank 9 is above the limit 6"),
])
def test_rank_above_layer_limit_raises(op, shape, options, message):
    rng = np.random.default_rng(14)
    x_shape = (1, shape[1], 6, 6) if op == "conv2d" else (2, shape[1])
    attrs = conv_attrs(pads=(1, 1, 1, 1)) if op == "conv2d" else {}
    graph = one_layer(op, x_shape, normal(rng, *shape), **attrs)
    with pytest.raises(OptionError, match=message):
        run_lowrank(graph, **options)


def test_rank_limit_error_leaves_graph_unchanged():
    model, example = three_layer_model()
    graph = import_torch(model, example)
    text = format_graph(graph)
    # fc1 (1024 -> 32) could take rank 20, but fc2 (32 -> 10) cannot.
    with pytest.raises(OptionError, match="rank 20 is above the limit 10 of layer 'fc2'"):
        DecomposeLowRank(rank=20, exclude="conv").run(graph, PassContext())
    assert format_graph(graph) == text


def test_manager_wraps_rank_limit_error():
    rng = np.random.default_rng(15)
    graph = one_layer("linear", (2, 9), normal(rng, 6, 9))
    with pytest.raises(PassError, match="pass 'lowrank' failed.*rank 7 is above the limit 6"):
        PassManager("lowrank:rank=7").run(graph)


# --- measured speed -----------------------------------------------------------------------------


class FakeTimer:
    """Stands in for LayerTimer: ``times`` maps a layer name to (layer ms, chain ms)."""

    def __init__(self, times: dict[str, tuple[float, float]], unavailable: str | None = None):
        self.times = times
        self.unavailable = unavailable
        self.compared: list[tuple[list[str], list[str]]] = []

    def unavailable_reason(self) -> str | None:
        return self.unavailable

    def compare(self, first, second):
        self.compared.append(([n.op for n in first], [n.op for n in second]))
        layer_ms, chain_ms = self.times[first[0].name]
        return Timing(layer_ms, False), Timing(chain_ms, False)


def two_linear_graph() -> Graph:
    # x[4,64] -> fc1 (64->64) -> relu -> fc2 (64->64) -> y
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    graph = import_torch(model, (torch.randn(4, 64),))
    first, second = find_layers(graph)
    first.node.name, second.node.name = "fc1", "fc2"
    return graph


def run_with_timer(graph: Graph, timer, target: str | None = "cpu", **options):
    """Run the pass on a copy of ``graph`` with ``timer`` as its timer for ``cpu``."""
    result_graph = graph.copy()
    lowrank = DecomposeLowRank(**options)
    lowrank.timers[("cpu", None)] = timer
    result = lowrank.run(result_graph, PassContext(target=target))
    verify_graph(result_graph)
    return result_graph, result


def test_measured_speed_decides_which_chains_stay():
    graph = two_linear_graph()
    timer = FakeTimer({"fc1": (2.0, 1.0), "fc2": (1.0, 0.99)})
    result_graph, result = run_with_timer(graph, timer, ratio=0.25)
    assert timer.compared == [(["linear"], ["linear", "linear"])] * 2

    kept, = result.details["layers"]
    assert kept["layer"] == "fc1"
    assert (kept["ms_before"], kept["ms_after"], kept["speedup"]) == (2.0, 1.0, 2.0)
    assert kept["reason"] == "fewer MACs and speedup 2.00x on cpu (2 -> 1 ms)"
    slower, = result.details["skipped"]
    assert slower["layer"] == "fc2"
    assert slower["macs_after"] < slower["macs_before"]
    assert slower["reason"] == ("fewer MACs, but speedup 1.01x on cpu (1 -> 0.99 ms) is below "
                                "min_speedup 1.05")
    assert (result.details["fewer_macs"], result.details["not_faster"]) == (2, 1)
    assert result.details["timed_on"] == "cpu"

    # fc1 became a chain, fc2 is the original layer with its own weight.
    assert [n.name for n in result_graph.nodes if n.op == "linear"] == [
        "fc1.svd_in", "fc1", "fc2"]
    fc2_weight = next(n for n in result_graph.nodes if n.name == "fc2").inputs[1]
    assert np.array_equal(fc2_weight.data, find_layers(graph)[1].node.inputs[1].data)
    expected = decompose_without_mac_check(graph, "svd", "ratio", 0.25)
    only_fc1, _ = run_lowrank(graph, ratio=0.25, exclude="fc2")
    assert format_graph(only_fc1) != format_graph(graph)
    feeds = feeds_for(graph)
    np.testing.assert_allclose(outputs(result_graph, feeds), outputs(only_fc1, feeds),
                               rtol=TOLERANCE, atol=TOLERANCE)
    assert not np.allclose(outputs(result_graph, feeds), outputs(expected, feeds))


def test_timing_reports_progress():
    graph = two_linear_graph()
    lowrank = DecomposeLowRank(ratio=0.25)
    lowrank.timers[("cpu", None)] = FakeTimer({"fc1": (2.0, 1.0), "fc2": (2.0, 1.0)})
    calls = []
    ctx = PassContext(target="cpu", progress=lambda *args: calls.append(args))
    lowrank.run(graph.copy(), ctx)
    label = "timing layers on cpu"
    assert calls == [(label, 0, 2), (label, 1, 2), (label, 2, 2)]


def test_min_speedup_sets_the_margin():
    graph = two_linear_graph()
    timer = FakeTimer({"fc1": (2.0, 1.0), "fc2": (1.0, 0.99)})
    _, strict = run_with_timer(graph, timer, ratio=0.25, min_speedup=2.5)
    assert strict.details["decomposed"] == 0
    _, loose = run_with_timer(graph, timer, ratio=0.25, min_speedup=1.0)
    assert [r["layer"] for r in loose.details["layers"]] == ["fc1", "fc2"]


@pytest.mark.parametrize("options, target, note", [
    ({"measure": "false"}, "cpu", "measure=false: decided by MACs"),
    ({}, None, "no target given: decided by MACs"),
])
def test_measure_off_decides_by_macs(options, target, note):
    graph = two_linear_graph()
    timer = FakeTimer({})
    _, result = run_with_timer(graph, timer, target, ratio=0.25, **options)
    assert timer.compared == []
    assert result.details["decomposed"] == 2
    assert result.details["timed_on"] is None
    assert result.details["timing_note"] == note
    assert all("ms_before" not in record for record in result.details["layers"])


def test_measure_true_without_target_times_on_cpu():
    timer = FakeTimer({"fc1": (1.0, 2.0), "fc2": (1.0, 2.0)})
    _, result = run_with_timer(two_linear_graph(), timer, None, ratio=0.25, measure="true")
    assert len(timer.compared) == 2
    assert result.details["decomposed"] == 0
    assert result.details["timed_on"] == "cpu"


def test_untimeable_target_falls_back_to_macs(caplog):
    timer = FakeTimer({}, unavailable="it was built for a CUDA GPU, and this host has none")
    with caplog.at_level("WARNING", logger="graphcomp.passes.lowrank"):
        _, result = run_with_timer(two_linear_graph(), timer, ratio=0.25, measure="true")
    assert timer.compared == []
    assert result.details["decomposed"] == 2
    assert result.details["timed_on"] is None
    assert "target 'cpu' cannot be timed here (it was built for a CUDA GPU" in (
        result.details["timing_note"])
    assert "cannot be timed here" in caplog.text


def test_standalone_graph_computes_the_chain():
    graph = two_linear_graph()
    layer = find_layers(graph)[0]
    factors = factorize(layer, "svd", _Target("rank", 8))
    chain = emit_chain(graph, layer, factors.cast("float32"), "lowrank")
    alone = standalone_graph(chain)
    verify_graph(alone)
    assert [v.shape for v in alone.inputs] == [(4, 64)]
    assert [n.op for n in alone.nodes] == ["linear", "linear"]
    assert alone.nodes[0].inputs[0] is not layer.node.inputs[0]  # a copy, not shared

    x = normal(np.random.default_rng(3), 4, 64)
    expected = x @ factors.cast("float32").reconstruct().T + layer.node.inputs[2].data
    got = executor.run(alone, {alone.inputs[0].name: x})[alone.outputs[0].name]
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE)
    assert signature(chain) != signature([layer.node])


@pytest.mark.slow
def test_timer_builds_identical_layers_once(tmp_path):
    tvm_backend = pytest.importorskip("graphcomp.backends.tvm")
    graph = two_linear_graph()
    timer = LayerTimer("cpu", repeat=3, tuning_db=tmp_path)  # an empty tuning database
    _, result = run_with_timer(graph, timer, ratio=0.25)
    # fc1 and fc2 have the same shapes and ranks: one layer build and one chain build.
    assert timer.builds == 2
    records = result.details["layers"] + result.details["skipped"]
    assert sorted(r["layer"] for r in records) == ["fc1", "fc2"]
    for record in records:
        assert record["ms_before"] > 0
        assert record["ms_after"] > 0
        assert record["speedup"] == pytest.approx(record["ms_before"] / record["ms_after"])
        kept = record in result.details["layers"]
        assert kept == (record["speedup"] >= 1.05)
        assert record["tuned"] is False
    assert records[0]["ms_before"] == records[1]["ms_before"]  # the cached timing

    # Another rank for fc2: the cached build of the layer, whose input has another name, is
    # timed against a new chain.
    result_graph, other_ranks = run_with_timer(graph, timer, ratio=0.25, override="fc2=0.375")
    assert timer.builds == 3
    records = other_ranks.details["layers"] + other_ranks.details["skipped"]
    assert {r["layer"]: r["ranks"] for r in records} == {"fc1": [16], "fc2": [24]}

    feeds = feeds_for(result_graph)
    built = tvm_backend.build(result_graph, "cpu")
    np.testing.assert_allclose(built.run(feeds)[result_graph.outputs[0].name],
                               outputs(result_graph, feeds), rtol=TOLERANCE, atol=TOLERANCE)


# --- VBMF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, columns, rank, noise", [
    (64, 100, 5, 0.1), (100, 64, 10, 0.5), (200, 150, 20, 1.0), (40, 300, 3, 0.05),
])
def test_vbmf_finds_true_rank(rows, columns, rank, noise):
    rng = np.random.default_rng(rows + rank)
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, columns))
    matrix = signal + noise * rng.standard_normal((rows, columns))
    result = decompose.evbmf(matrix)
    assert result.rank == rank
    assert result.noise_variance == pytest.approx(noise ** 2, rel=0.1)
    assert np.all(result.estimates < np.linalg.svd(matrix, compute_uv=False)[:rank])


def test_vbmf_finds_no_signal_in_pure_noise():
    matrix = np.random.default_rng(16).standard_normal((80, 120))
    assert decompose.evbmf(matrix).rank == 0


def test_vbmf_tau_threshold_matches_known_value():
    # Phi(tau) = 0 at tau = 2.5129 when alpha = 1 (log(1 + tau) = tau / 2).
    assert decompose.vbmf_tau_threshold(1.0) == pytest.approx(2.5129, abs=1e-4)


def test_vbmf_picks_tucker_ranks():
    rng = np.random.default_rng(17)
    core = rng.standard_normal((6, 4, 3, 3))
    out_factor = np.linalg.qr(rng.standard_normal((48, 6)))[0]
    in_factor = np.linalg.qr(rng.standard_normal((32, 4)))[0]
    kernel = decompose.Tucker2Factors(core, out_factor, in_factor).reconstruct()
    kernel = kernel + 0.001 * rng.standard_normal(kernel.shape)
    graph = one_layer("conv2d", (1, 32, 6, 6), kernel.astype(np.float32),
                      **conv_attrs(pads=(1, 1, 1, 1)))
    _, result = run_lowrank(graph, vbmf=True)
    assert result.details["layers"][0]["ranks"] == [6, 4]
    assert result.details["layers"][0]["error"] < 0.01


def evb_free_energy(noise_variance: float, values: np.ndarray, rows: int, columns: int) -> float:
    """The EVBMF free energy in sigma^2 (Nakajima et al., JMLR 14, 2013, with L = ``rows``
    <= M = ``columns``), written out per component as a reference for ``decompose.evbmf``."""
    alpha = rows / columns
    tau_bar = 2.5129 * np.sqrt(alpha)  # the paper's approximation of the threshold root
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    total = 0.0
    for value in values:
        x = value ** 2 / (columns * noise_variance)
        total += x - np.log(x)
        if x > x_bar:
            tau = 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))
            total += -tau + np.log(tau + 1) + alpha * np.log(tau / alpha + 1)
    return total


def test_vbmf_noise_variance_is_global_minimum():
    rng = np.random.default_rng(18)
    signal = rng.standard_normal((48, 6)) @ rng.standard_normal((6, 120))
    matrix = signal + 0.7 * rng.standard_normal((48, 120))
    values = np.linalg.svd(matrix, compute_uv=False)
    result = decompose.evbmf(matrix)

    grid = np.exp(np.linspace(np.log(1e-3), np.log(np.mean(matrix ** 2)), 4000))
    energies = [evb_free_energy(v, values, 48, 120) for v in grid]
    best = grid[int(np.argmin(energies))]
    assert result.noise_variance == pytest.approx(best, rel=0.01)
    assert evb_free_energy(result.noise_variance, values, 48, 120) <= min(energies) + 1e-6
    assert result.rank == 6


def test_vbmf_warns_when_spectrum_is_flat(caplog):
    # A random kernel: no singular value of either unfolding is above the noise level.
    rng = np.random.default_rng(19)
    graph = one_layer("conv2d", (1, 8, 6, 6), normal(rng, 16, 8, 3, 3),
                      **conv_attrs(pads=(1, 1, 1, 1)))
    with caplog.at_level("WARNING", logger="graphcomp.passes.lowrank"):
        _, result = run_lowrank(graph, vbmf=True)
    assert result.details["layers"][0]["ranks"] == [1, 1]
    assert "VBMF finds 0/0 component(s) above the noise level in layer 'layer'" in caplog.text
    assert "override=layer=R" in caplog.text


@pytest.mark.slow
def test_vbmf_on_digits_cnn_finds_noise_like_spectra(caplog):
    from graphcomp.models_io import load_model
    from graphcomp.pipeline import DEFAULT_PIPELINE

    graph = PassManager(DEFAULT_PIPELINE, verify=False).run(
        load_model("zoo:digits-cnn").graph).graph
    with caplog.at_level("WARNING", logger="graphcomp.passes.lowrank"):
        _, result = run_lowrank(graph, vbmf=True, measure="false")
    warned = set(re.findall(r"noise level in layer '(\w+)'", caplog.text))
    assert warned == {"conv1", "conv2", "fc2"}
    assert {r["layer"]: r["ranks"] for r in result.details["layers"]}["fc1"] == [10]

    # conv2's largest singular value is no larger than the edge of the spectrum of a random
    # matrix of its shape and entry variance (Marchenko-Pastur): there is nothing to keep.
    conv2 = next(layer for layer in find_layers(graph) if layer.node.name == "conv2")
    matrix = decompose.unfold(conv2.weight, 0)
    rows, columns = matrix.shape
    edge = np.sqrt(columns * np.mean(matrix ** 2)) * (1 + np.sqrt(rows / columns))
    assert np.linalg.svd(matrix, compute_uv=False)[0] < 1.1 * edge
    assert decompose.evbmf(matrix).rank == 0


# --- exporters and backends ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tucker2", "cp", "svd"])
def test_chain_runs_in_onnxruntime_and_tvm(method):
    import onnxruntime as ort

    from graphcomp.backends.onnx_export import to_onnx

    tvm_backend = pytest.importorskip("graphcomp.backends.tvm")
    model, example = three_layer_model()
    graph = import_torch(model, example)
    result_graph, result = run_lowrank(graph, method=method, ratio=0.5)
    assert {r["layer"] for r in result.details["layers"]} == {"conv", "fc1", "fc2"}
    feeds = {graph.inputs[0].name: example[0].numpy()}
    expected = outputs(result_graph, feeds)
    output_name = result_graph.outputs[0].name

    session = ort.InferenceSession(to_onnx(result_graph).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    from_onnx, = session.run([output_name], feeds)
    np.testing.assert_allclose(from_onnx, expected, rtol=TOLERANCE, atol=TOLERANCE)

    built = tvm_backend.build(result_graph, "cpu")
    np.testing.assert_allclose(built.run(feeds)[output_name], expected, rtol=TOLERANCE,
                               atol=TOLERANCE)


# --- real models --------------------------------------------------------------------------------


def accuracy(graph: Graph, images: np.ndarray, labels: np.ndarray) -> float:
    name, output = graph.inputs[0].name, graph.outputs[0].name
    logits = np.concatenate([executor.run(graph, {name: images[i:i + 1]})[output]
                             for i in range(len(images))])
    return float(np.mean(logits.argmax(-1) == labels))


@pytest.mark.slow
def test_digits_cnn_recovers_accuracy():
    from graphcomp.finetune import FinetuneOptions, finetune
    from graphcomp.models import _digits_module
    from graphcomp.models_io import load_model
    from graphcomp.pipeline import DEFAULT_PIPELINE

    original = PassManager(DEFAULT_PIPELINE, verify=False).run(
        load_model("zoo:digits-cnn").graph).graph
    train_images, train_labels, test_images, test_labels = _digits_module().load_split()
    decomposed, result = run_lowrank(original, ratio=0.5)
    methods = {r["layer"]: (r["method"], r["ranks"]) for r in result.details["layers"]}
    assert methods == {"conv2": ("tucker2", [16, 8]), "fc1": ("svd", [32]),
                       "fc2": ("svd", [5])}
    # conv1 has one input channel: its Tucker-2 chain costs more MACs than the conv.
    assert "no MAC saving" in result.details["skipped"][0]["reason"]
    assert result.details["params_after"] < 0.6 * result.details["params_before"]
    assert result.details["macs_after"] < 0.5 * result.details["macs_before"]

    name = original.inputs[0].name
    recovered = finetune(decomposed, original, {name: train_images, "labels": train_labels},
                         FinetuneOptions(epochs=20, lr=2e-3)).graph
    original_accuracy = accuracy(original, test_images, test_labels)
    decomposed_accuracy = accuracy(decomposed, test_images, test_labels)
    recovered_accuracy = accuracy(recovered, test_images, test_labels)
    assert original_accuracy > 0.97
    assert decomposed_accuracy < original_accuracy - 0.05  # the decomposition did cost accuracy
    assert recovered_accuracy >= original_accuracy - 0.01


@pytest.mark.slow
def test_minilm_energy_bounds_layer_error():
    from graphcomp.models_io import load_model
    from graphcomp.pipeline import DEFAULT_PIPELINE

    loaded = load_model("zoo:minilm")
    original = PassManager(DEFAULT_PIPELINE, verify=False).run(loaded.graph).graph
    batches = loaded.default_data.batches[:16]
    output = original.outputs[0].name

    def embeddings(graph):
        return np.concatenate([executor.run(graph, batch)[output] for batch in batches])

    def mean_cosine(a, b):
        return float(np.mean(np.sum(a * b, axis=1)
                             / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    reference = embeddings(original)
    cosines = {}
    for energy in (0.9, 0.95):
        decomposed, result = run_lowrank(original, method="svd", energy=energy)
        records = result.details["layers"]
        assert records
        assert all(r["op"] == "linear" for r in records)
        assert max(r["error"] for r in records) <= np.sqrt(1 - energy) + 1e-4
        assert result.details["macs_after"] < result.details["macs_before"]
        cosines[energy] = mean_cosine(embeddings(decomposed), reference)
    assert cosines[0.9] < cosines[0.95] < 1.0
    # At 0.99 every layer needs a rank above in * out / (in + out): no MAC saving anywhere.
    _, result = run_lowrank(original, method="svd", energy=0.99)
    assert not result.changed


@pytest.mark.slow
def test_ppocr_rec_head_output_drift():
    from graphcomp.models_io import load_model
    from graphcomp.pipeline import DEFAULT_PIPELINE

    loaded = load_model("zoo:ppocr-rec")
    original = PassManager(DEFAULT_PIPELINE, verify=False).run(loaded.graph).graph
    min_macs = 10_000_000
    decomposed, result = run_lowrank(original, energy=0.99, min_macs=min_macs)
    assert [r["layer"] for r in result.details["layers"]] == ["p2o.MatMul.24"]
    assert all(r["macs_before"] >= min_macs for r in result.details["layers"])
    assert result.details["macs_after"] < result.details["macs_before"]

    output = original.outputs[0].name
    batches = loaded.default_data.batches
    before = np.concatenate([executor.run(original, batch)[output] for batch in batches])
    after = np.concatenate([executor.run(decomposed, batch)[output] for batch in batches])
    assert float(np.abs(after - before).mean()) < 1e-4  # probabilities over 6625 classes
    # The class with the highest probability, per image and time step.
    assert float(np.mean(after.argmax(-1) == before.argmax(-1))) >= 0.9
