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
import torch.nn.functional as F

from graphcomp import decompose, executor
from graphcomp.analysis import node_macs
from graphcomp.errors import OptionError, PassError
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.passes.lowrank import DecomposeLowRank, emit_chain, factorize, find_layers, fit_cp
from graphcomp.passes.lowrank import _Target
from graphcomp.patterns import Match, replace_match
from graphcomp.pipeline import PassContext, PassManager, available_passes, parse_pipeline
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_node
from graphcomp.verifier import verify_graph

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


def run_lowrank(graph: Graph, **options):
    """Run the pass on a copy of ``graph``; return the copy and the PassResult."""
    result_graph = graph.copy()
    result = DecomposeLowRank(**options).run(result_graph, PassContext())
    verify_graph(result_graph)
    return result_graph, result


def decompose_without_mac_check(graph: Graph, method: str, criterion: str, value) -> Graph:
    """Replace every layer of a copy of ``graph`` by its chain, even when the chain has more
    MACs (full rank never saves MACs, so the pass itself would leave the layer alone)."""
    result = graph.copy()
    target = _Target(criterion, value)
    for layer in find_layers(result):
        if method == "cp":
            factors, _ = fit_cp(layer, target, max_rank=10**9)
        else:
            factors = factorize(layer, method, target)
        nodes = emit_chain(result, layer, factors.cast(layer.node.inputs[1].dtype), "lowrank")
        assert replace_match(result, Match(layer.node, [layer.node]), nodes)
    verify_graph(result)
    return result


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


# --- SVD keeps the bias ------------------------------------------------------------------------


def bias_layers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).eval()
    with torch.no_grad():
        lin.bias.uniform_(-2, 2)  # a large bias: dropping it is unmistakable
    lin_nb = nn.Linear(64, 48, bias=False).eval()
    x = torch.randn(8, 64)
    return lin, lin_nb, x


def svd_reference(lin: nn.Linear, x: torch.Tensor, rank: int) -> np.ndarray:
    u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    weight = (u[:, :rank] * s[:rank]) @ vh[:rank]
    bias = lin.bias.detach().double() if lin.bias is not None else 0.0
    return (x.double() @ weight.T + bias).numpy()


def test_svd_chain_keeps_bias():
    lin, _, x = bias_layers()
    graph = import_torch(lin, (x,))
    feeds = {graph.inputs[0].name: x.numpy()}

    full = decompose_without_mac_check(graph, "svd", "rank", 48)
    expected = lin(x).detach().numpy()
    np.testing.assert_allclose(outputs(full, feeds), expected, rtol=TOLERANCE, atol=TOLERANCE)

    rank16, result = run_lowrank(graph, rank=16)
    assert result.details["layers"][0]["ranks"] == [16]
    np.testing.assert_allclose(outputs(rank16, feeds), svd_reference(lin, x, 16),
                               rtol=TOLERANCE, atol=TOLERANCE)
    zero = {graph.inputs[0].name: np.zeros_like(x.numpy())}
    bias = lin.bias.detach().numpy()
    np.testing.assert_array_equal(outputs(rank16, zero), np.broadcast_to(bias, (8, 48)))


def test_svd_chain_without_bias():
    _, lin_nb, x = bias_layers()
    graph = import_torch(lin_nb, (x,))
    result_graph, _ = run_lowrank(graph, rank=16)
    assert ops(result_graph) == ["linear", "linear"]
    assert [len(node.inputs) for node in result_graph.nodes] == [2, 2]
    feeds = {graph.inputs[0].name: x.numpy()}
    np.testing.assert_allclose(outputs(result_graph, feeds), svd_reference(lin_nb, x, 16),
                               rtol=TOLERANCE, atol=TOLERANCE)


# --- CP keeps stride, padding and dilation on the spatial factors -----------------------------


def strided_conv_layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 11, stride=4, padding=2).eval()  # AlexNet conv1
    x = torch.randn(1, 3, 224, 224)
    conv2 = nn.Conv2d(16, 32, (3, 5), stride=2, padding=(2, 4), dilation=2).eval()
    x2 = torch.randn(1, 16, 33, 40)
    return [(conv, x, (1, 64, 55, 55)), (conv2, x2, (1, 32, 17, 20))]


def effective_kernel(nodes: list[Node]) -> torch.Tensor:
    """The dense kernel of a CP chain 1x1 -> (kH x 1, depthwise) -> (1 x kW, depthwise) -> 1x1."""
    weights = [torch.from_numpy(node.inputs[1].data) for node in nodes]
    first, vertical = weights[0][:, :, 0, 0], weights[1][:, 0, :, 0]
    horizontal, last = weights[2][:, 0, 0, :], weights[3][:, :, 0, 0]
    return torch.einsum("or,ri,rh,rw->oihw", last, first, vertical, horizontal)


@pytest.mark.parametrize("index", [0, 1])
def test_cp_strides_only_spatial_factors(index):
    conv, x, expected_shape = strided_conv_layers()[index]
    graph = import_torch(conv, (x,))
    result_graph, result = run_lowrank(graph, method="cp", rank=8)
    assert result.details["layers"][0]["method"] == "cp"
    nodes = result_graph.nodes
    assert [tuple(n.inputs[1].shape[2:]) for n in nodes] == [
        (1, 1), (conv.kernel_size[0], 1), (1, conv.kernel_size[1]), (1, 1)]
    for one_by_one in (nodes[0], nodes[3]):
        assert one_by_one.attrs["strides"] == [1, 1]
        assert one_by_one.attrs["pads"] == [0, 0, 0, 0]
        assert one_by_one.attrs["dilations"] == [1, 1]
    (stride_h, stride_w), (pad_h, pad_w) = conv.stride, conv.padding
    dilation_h, dilation_w = conv.dilation
    assert nodes[1].attrs["strides"] == [stride_h, 1]
    assert nodes[1].attrs["pads"] == [pad_h, 0, pad_h, 0]
    assert nodes[1].attrs["dilations"] == [dilation_h, 1]
    assert nodes[2].attrs["strides"] == [1, stride_w]
    assert nodes[2].attrs["pads"] == [0, pad_w, 0, pad_w]
    assert nodes[2].attrs["dilations"] == [1, dilation_w]

    feeds = {graph.inputs[0].name: x.numpy()}
    actual = outputs(result_graph, feeds)
    assert actual.shape == expected_shape
    oracle = F.conv2d(x, effective_kernel(nodes), torch.from_numpy(nodes[3].inputs[2].data),
                      conv.stride, conv.padding, conv.dilation).numpy()
    scale = float(np.abs(oracle).max())
    assert float(np.abs(actual - oracle).max()) <= CP_CHAIN_TOLERANCE * scale


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
