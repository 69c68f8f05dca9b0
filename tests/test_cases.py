"""Models from public bug reports against tools of graphcomp's kind, and what graphcomp must
do with each. The models live in tests/cases/, one module per case, each naming its report.

Tolerances: pruning equals the masked reference (the original model with the removed channels
zeroed) to 1e-5. Folding, full-rank SVD and CPU builds equal PyTorch to 1e-5. A CP chain equals
the dense conv with the kernel rebuilt from its own factors to 1e-4 of the output scale. Int8
stays within 0.05 of float32.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper as nph

from graphcomp import executor
from graphcomp.backends.onnx_export import to_onnx
from graphcomp.calibration import CalibrationError
from graphcomp.errors import PassError, UnsupportedOpError
from graphcomp.frontends.onnx_frontend import import_onnx, simplify_model
from graphcomp.frontends.torch_frontend import import_torch
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.passes.quantize import Quantize
from graphcomp.pipeline import DEFAULT_PIPELINE, PassContext, PassManager, output_error
from graphcomp.shapes import infer_shapes

from cases import (
    case01_selfcat, case03_pool_flatten_linear, case05_convtranspose_groups_bn, case07_cp_stride,
    case09_svd_bias, case10_dw_per_channel, case12_no_calibration, case13_onnx_runtime_reshape,
    case17_cuda_tiny_conv, case18_fold_value_float,
)
from graph_helpers import (
    kept_rows, prune_with_reference, run_lowrank, run_prune, torch_params,
    decompose_without_mac_check,
)

TOLERANCE = 1e-5
CP_CHAIN_TOLERANCE = 1e-4


def randomize_bn(bn: torch.nn.BatchNorm2d) -> None:
    """Give a batch norm non-trivial eval statistics, so pruning mistakes show."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=tolerance * max(1.0, float(np.abs(expected).max())))


def ops(graph: Graph) -> list[str]:
    return [node.op for node in graph.nodes]


# --- case01: a tensor concatenated with itself (prune) -----------------------------------------


def self_cat():
    torch.manual_seed(0)
    module = copy.deepcopy(case01_selfcat.m)
    for bn in (module.a[1], module.a[4], module.b[1]):
        randomize_bn(bn)
    return module, case01_selfcat.x


def test_self_concat_removes_both_copies():
    module, x = self_cat()
    graph = import_torch(module, (x,))

    def choose(analysis):
        return {analysis.group_of(analysis.graph.node("a.3").outputs[0]).index: [1, 5]}

    pruned, reference = prune_with_reference(graph, choose)
    expected = case01_selfcat.masked_reference(module, [1, 5])(x).detach().numpy()

    assert pruned.node("b.0").inputs[1].shape == (8, 12, 1, 1)
    assert pruned.node("a.3").inputs[1].shape == (6, 8, 1, 1)
    assert pruned.node("a.4").inputs[1].shape == (6,)
    assert torch_params(graph) == 328
    assert torch_params(pruned) == 274
    assert_close(executor.run(pruned, {"x": x.numpy()})["output"], expected)
    assert_close(executor.run(pruned, {"x": x.numpy()})["output"],
                 executor.run(reference, {"x": x.numpy()})["output"])


def test_repeated_pruning_stays_consistent():
    module, x = self_cat()
    with torch.no_grad():
        module.a[3].weight[[1, 5]] *= 0.01
    graph = import_torch(module, (x,))
    original = graph.node("a.3").inputs[1].data

    first, details = run_prune(graph, ratio=0.25, protect="a.0")
    second, _ = run_prune(first, ratio=0.5, protect="a.0")

    assert kept_rows(first.node("a.3").inputs[1].data, original) == [0, 2, 3, 4, 6, 7]
    assert details["params_after"] < details["params_before"]
    kept = kept_rows(second.node("a.3").inputs[1].data, original)
    assert len(kept) == 3
    assert second.node("b.0").inputs[1].shape == (8, 6, 1, 1)
    for step, removed in ((first, [1, 5]), (second, sorted(set(range(8)) - set(kept)))):
        expected = case01_selfcat.masked_reference(module, removed)(x).detach().numpy()
        assert_close(executor.run(step, {"x": x.numpy()})["output"], expected)


# --- case03: adaptive pooling, flatten and linear (prune) --------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_flatten_keeps_whole_pooled_blocks(size):
    torch.manual_seed(0)
    module = copy.deepcopy(case03_pool_flatten_linear.m)
    randomize_bn(module[1])
    x = torch.randn(2, 3, size, size)
    graph = import_torch(module, (x,))
    removed = [0, 5, 9, 15]

    pruned, _ = prune_with_reference(
        graph, lambda a: {a.group_of(a.graph.node("0").outputs[0]).index: removed})
    reference = case03_pool_flatten_linear.masked_reference(module, removed)
    kept_columns = [c * 25 + k for c in range(16) if c not in removed for k in range(25)]

    assert pruned.node("5").inputs[1].shape == (10, 300)
    assert torch_params(graph) == 4490
    assert torch_params(pruned) == 3370
    np.testing.assert_array_equal(pruned.node("5").inputs[1].data,
                                  graph.node("5").inputs[1].data[:, kept_columns])
    assert_close(executor.run(pruned, {"input": x.numpy()})["output"],
                 reference(x).detach().numpy())


# --- case05: batch norm folded into a grouped ConvTranspose2d (fold-bn) ------------------------


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_bn_into_grouped_conv_transpose(groups):
    module = case05_convtranspose_groups_bn.make(groups)
    x = case05_convtranspose_groups_bn.x
    graph = import_torch(module, (x,))
    assert ops(graph) == ["conv_transpose2d", "batch_norm"]

    folded = PassManager(DEFAULT_PIPELINE, verify=False).run(graph).graph

    assert ops(folded) == ["conv_transpose2d"]
    layer = folded.nodes[0]
    assert layer.inputs[1].shape == (4, 6 // groups, 3, 3)
    assert layer.inputs[2].shape == (6,)
    with torch.no_grad():
        expected = module(x).numpy()
    actual = executor.run(folded, {graph.inputs[0].name: x.numpy()})[folded.outputs[0].name]
    assert actual.shape == (2, 6, 10, 10)
    assert_close(actual, expected)


# --- case07: CP keeps stride, padding and dilation on the spatial factors (lowrank) ----------


def effective_kernel(nodes: list[Node]) -> torch.Tensor:
    """The dense kernel of a CP chain 1x1 -> (kH x 1, depthwise) -> (1 x kW, depthwise) -> 1x1,
    from the chain's weights (``case07_cp_stride.effective_kernel`` does it for PyTorch
    modules)."""
    modules = [torch.nn.Module() for _ in nodes]
    for module, node in zip(modules, nodes):
        module.weight = torch.from_numpy(node.inputs[1].data)
    return case07_cp_stride.effective_kernel(modules)


@pytest.mark.parametrize("index", [0, 1])
def test_cp_strides_only_spatial_factors(index):
    conv, x, expected_shape = [
        (case07_cp_stride.conv, case07_cp_stride.x, (1, 64, 55, 55)),
        (case07_cp_stride.conv2, case07_cp_stride.x2, (1, 32, 17, 20)),
    ][index]
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

    actual = executor.run(result_graph, {graph.inputs[0].name: x.numpy()})
    actual = actual[result_graph.outputs[0].name]
    assert actual.shape == expected_shape
    oracle = F.conv2d(x, effective_kernel(nodes), torch.from_numpy(nodes[3].inputs[2].data),
                      conv.stride, conv.padding, conv.dilation).numpy()
    scale = float(np.abs(oracle).max())
    assert float(np.abs(actual - oracle).max()) <= CP_CHAIN_TOLERANCE * scale


# --- case09: SVD keeps the bias (lowrank) -------------------------------------------------------


def test_svd_chain_keeps_bias():
    lin, x = case09_svd_bias.lin, case09_svd_bias.x
    graph = import_torch(lin, (x,))
    feeds = {graph.inputs[0].name: x.numpy()}
    output = graph.outputs[0].name

    full = decompose_without_mac_check(graph, "svd", "rank", 48)
    assert_close(executor.run(full, feeds)[output], lin(x).detach().numpy())

    rank16, result = run_lowrank(graph, rank=16)
    assert result.details["layers"][0]["ranks"] == [16]
    assert_close(executor.run(rank16, feeds)[output],
                 case09_svd_bias.svd_reference(x, 16).detach().numpy())
    zero = {graph.inputs[0].name: np.zeros_like(x.numpy())}
    bias = lin.bias.detach().numpy()
    np.testing.assert_array_equal(executor.run(rank16, zero)[output],
                                  np.broadcast_to(bias, (8, 48)))


def test_svd_chain_without_bias():
    lin_nb, x = case09_svd_bias.lin_nb, case09_svd_bias.x
    graph = import_torch(lin_nb, (x,))

    result_graph, _ = run_lowrank(graph, rank=16)

    assert ops(result_graph) == ["linear", "linear"]
    assert [len(node.inputs) for node in result_graph.nodes] == [2, 2]
    u, s, vh = torch.linalg.svd(lin_nb.weight.detach().double(), full_matrices=False)
    expected = (x.double() @ ((u[:, :16] * s[:16]) @ vh[:16]).T).numpy()
    actual = executor.run(result_graph, {graph.inputs[0].name: x.numpy()})
    assert_close(actual[result_graph.outputs[0].name], expected)


# --- case10: depthwise filters of very different ranges (quantize) ----------------------------


def test_depthwise_per_channel_scales():
    # graphcomp quantizes weights per output channel on every backend (TVM, ONNX, PyTorch), so
    # no backend falls back to float for lack of per-channel support.
    model, x = case10_dw_per_channel.m, case10_dw_per_channel.x
    weight = model[0].weight.detach()
    # Per-tensor int8 (one scale for all filters) zeroes the smallest filters.
    per_tensor_scale = float(weight.abs().max()) / 127
    per_tensor = torch.clamp(torch.round(weight / per_tensor_scale), -127, 127) * per_tensor_scale
    assert int((per_tensor.flatten(1).abs().sum(1) == 0).sum()) >= 1

    graph = import_torch(model, (x,))
    result = PassManager(DEFAULT_PIPELINE + ",quantize:int8",
                         calibration=[{"input": x.numpy()}]).run(graph).graph

    depthwise = next(n for n in result.nodes if n.op == "qconv2d" and n.attrs["groups"] == 16)
    weight_q, w_scale = depthwise.inputs[1].data, depthwise.inputs[2].data
    restored = torch.from_numpy(weight_q.astype(np.float32) * w_scale[:, None, None, None])
    errors = case10_dw_per_channel.per_channel_rel_err(restored, weight)
    assert float(errors.max()) < 0.01
    assert np.all(np.abs(weight_q).reshape(16, -1).sum(axis=1) > 0)
    assert np.all(w_scale > 0)
    expected = model(x).detach().numpy()
    assert output_error([expected], [executor.run(result, {"input": x.numpy()})["output"]]) < 0.05


# --- case12: quantizing without calibration data (quantize) -----------------------------------


def linear_5x5() -> Graph:
    return import_torch(case12_no_calibration.m, (case12_no_calibration.x,))


def test_no_calibration_raises_naming_tensors():
    graph = linear_5x5()
    with pytest.raises(PassError, match="tensors have no range: 'input', 'output'"):
        PassManager("quantize:int8").run(graph)
    with pytest.raises(PassError, match="zero calibration batches were given"):
        PassManager("quantize:int8", calibration=case12_no_calibration.calib_empty).run(graph)


def test_no_calibration_leaves_graph_unchanged():
    graph = linear_5x5()
    before = ops(graph)
    with pytest.raises(CalibrationError, match="needs calibration data"):
        Quantize(mode="int8").run(graph, PassContext())
    assert ops(graph) == before


def test_calibrated_linear_within_tolerance():
    model, x, graph = case12_no_calibration.m, case12_no_calibration.x, linear_5x5()
    calibration = [{"input": batch.numpy()} for batch in case12_no_calibration.calib_ok]

    result = PassManager("quantize:int8", calibration=calibration).run(graph).graph

    expected = model(x).detach().numpy()
    actual = executor.run(result, {"input": x.numpy()})["output"]
    assert np.abs(actual - expected).max() <= 0.05
    assert np.any(actual != 0)


# --- case13: Reshape to a shape given at run time (ONNX import) --------------------------------


def test_runtime_reshape_shape_is_rejected(tmp_path):
    # graphcomp's IR has static shapes only, so no graph fits all three feeds of the case.
    path = tmp_path / "runtime_reshape.onnx"
    onnx.save(case13_onnx_runtime_reshape.model, path)
    with pytest.raises(UnsupportedOpError, match="Reshape with a non-constant shape") as info:
        import_onnx(path)
    assert "Reshape_0" in str(info.value)
    assert info.value.exit_code == 2


# --- case17: 1-channel convs with 1x2 and 3x1 kernels (CPU and CUDA builds) -------------------


def tiny_conv(input_shape, kernel) -> tuple[Graph, torch.nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    module, x = case17_cuda_tiny_conv.make(input_shape, kernel)
    x_value, y = Value("x", input_shape), Value("y", ())
    conv_weight = Constant("w", module.weight.detach().numpy().copy())
    conv = Node("conv", "conv2d", [x_value, conv_weight], [y])
    graph = Graph("tiny_conv", [x_value], [y], [conv])
    infer_shapes(graph)
    return graph, module, x


@pytest.mark.parametrize("input_shape,kernel", case17_cuda_tiny_conv.cases)
def test_tiny_conv_on_cpu_matches_pytorch(input_shape, kernel):
    from graphcomp.backends.tvm import build

    graph, module, x = tiny_conv(input_shape, kernel)
    with torch.no_grad():
        expected = module(x).numpy()

    actual = build(graph, "cpu").run({"x": x.numpy()})["y"]

    assert actual.shape == expected.shape
    assert float(np.max(np.abs(actual - expected))) <= TOLERANCE


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("input_shape,kernel", case17_cuda_tiny_conv.cases)
def test_tiny_conv_builds_for_cuda(input_shape, kernel, tmp_path):
    from graphcomp.backends.tvm import build

    graph, _, _ = tiny_conv(input_shape, kernel)

    build(graph, "cuda:sm_90").export(tmp_path)

    assert (tmp_path / "model.so").stat().st_size > 0


# --- case18: folding Constant(value_float) keeps float32 (ONNX import and export) -------------


def test_folded_value_float_stays_float32():
    folded = simplify_model(case18_fold_value_float.model, "value_float_fold")

    initializers = {init.name: nph.to_array(init) for init in folded.graph.initializer}
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert initializers["c2"].dtype == np.float32
    assert initializers["c2"] == np.float32(0.25)
    x = np.array([1.0, -3.0], np.float32)
    session = ort.InferenceSession(folded.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + np.float32(0.25))


def test_imported_and_exported_model_adds_quarter(tmp_path):
    path = tmp_path / "value_float.onnx"
    onnx.save(case18_fold_value_float.model, path)
    x = np.array([1.0, -3.0], np.float32)

    graph = import_onnx(path)

    constants = [v for n in graph.nodes for v in n.inputs if isinstance(v, Constant)]
    assert [(c.name, c.dtype) for c in constants] == [("c2", "float32")]
    y = executor.run(graph, {"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x + np.float32(0.25))
    exported = to_onnx(graph)
    session = ort.InferenceSession(exported.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + np.float32(0.25))
