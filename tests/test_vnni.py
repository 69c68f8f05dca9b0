"""int8 layers in the layouts of AVX-512 VNNI dot products (graphcomp/ops/vnni.py).

The packed lowering runs on any x86 host, with plain loops when untuned, so the numerical
tests force the VNNI features on and compare with the reference executor bit for bit. Only
the test that runs the vpdpbusd instruction itself needs a host with AVX-512 VNNI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphcomp
from graphcomp import executor
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import vnni
from graphcomp.ops.lowering import TargetFeatures
from graphcomp.pipeline import PassManager
from graphcomp.shapes import infer_shapes

tvm = pytest.importorskip("tvm")

from graphcomp.backends.tvm import build, targets  # noqa: E402
from graphcomp.backends.tvm.intrinsics import (  # noqa: E402
    VNNI_INTRINSIC, has_avx512_vnni, register_intrinsics,
)
from graphcomp.backends.tvm.lower import plan_weights  # noqa: E402

VNNI = TargetFeatures(vnni=True)


def test_conv_weight_packing_layout():
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (20, 6, 3, 2), dtype=np.int8)  # 20 -> 32, 6 -> 8
    packed = vnni.pack_conv_weight(weight)
    assert packed.shape == (2, 2, 3, 2, 16, 4)
    o, c, y, x = 17, 5, 2, 1
    assert packed[o // 16, c // 4, y, x, o % 16, c % 4] == weight[o, c, y, x]
    unpacked = packed.transpose(0, 4, 1, 5, 2, 3).reshape(32, 8, 3, 2)
    np.testing.assert_array_equal(unpacked[:20, :6], weight)
    assert not unpacked[20:].any()
    assert not unpacked[:, 6:].any()


def test_transposed_weight_packing_layout():
    weight = np.arange(2 * 3 * 2 * 2, dtype=np.int8).reshape(2, 3, 2, 2)  # [C, O, kH, kW]
    packed = vnni.pack_transposed_weight(weight)
    assert packed.shape == (1, 1, 16, 4)
    o, i, j, c = 2, 1, 0, 1
    assert packed[0, 0, (o * 2 + i) * 2 + j, c] == weight[c, o, i, j]


def test_linear_weight_packing_layout():
    weight = np.arange(-40, 40, dtype=np.int8).reshape(10, 8)
    packed = vnni.pack_linear_weight(weight)
    assert packed.shape == (1, 2, 16, 4)
    assert packed[0, 1, 9, 3] == weight[9, 7]
    assert not packed[0, :, 10:].any()


def int8_cnn() -> Graph:
    """x (1,5,9,10) -> conv a (5->20, 3x3, pad 1) -> relu -> conv b (20->20, 3x3, stride 2,
    dilation 1, pads 0 1 1 2) -> conv dw (20 channels, depthwise) -> flatten -> fc (->12),
    quantized with uint8 activations. a and b share nothing; fc reads a [1, 480] input."""
    rng = np.random.default_rng(3)
    x = Value("x", (1, 5, 9, 10))
    names = ("a", "a_relu", "b", "dw", "flat", "y")
    values = {name: Value(name, ()) for name in names}

    def const(name, *shape):
        return Constant(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    nodes = [
        Node("conv_a", "conv2d", [x, const("wa", 20, 5, 3, 3), const("ba", 20)],
             [values["a"]], {"pads": [1, 1, 1, 1]}),
        Node("relu", "relu", [values["a"]], [values["a_relu"]]),
        Node("conv_b", "conv2d", [values["a_relu"], const("wb", 20, 20, 3, 3)], [values["b"]],
             {"pads": [0, 1, 1, 2], "strides": [2, 2]}),
        Node("conv_dw", "conv2d", [values["b"], const("wdw", 20, 1, 3, 3)], [values["dw"]],
             {"pads": [1, 1, 1, 1], "groups": 20}),
        Node("flatten", "reshape", [values["dw"]], [values["flat"]], {"shape": [1, 480]}),
        Node("fc", "linear", [values["flat"], const("wfc", 12, 480), const("bfc", 12)],
             [values["y"]]),
    ]
    graph = Graph("int8_cnn", [x], [values["y"]], nodes)
    infer_shapes(graph)
    calibration = [{"x": np.random.default_rng(s).standard_normal((1, 5, 9, 10))
                    .astype(np.float32)} for s in range(3)]
    return PassManager("quantize:int8,dce", calibration=calibration).run(graph).graph


def test_plan_packs_dense_layers_with_vnni():
    graph = int8_cnn()
    plain = plan_weights(graph, TargetFeatures())
    assert not plain.packed
    packed = plan_weights(graph, VNNI)
    by_node = {node.name: node for node in graph.nodes}
    packed_nodes = {name for name, node in by_node.items()
                    if any((id(node), i) in packed.packed for i in range(len(node.inputs)))}
    # The depthwise conv keeps its plain weight; dense convs and the linear layer pack theirs.
    assert packed_nodes == {"conv_a", "conv_b", "fc"}
    # A weight that every reader takes packed is not a parameter in its plain layout.
    assert by_node["conv_a"].inputs[1].name not in packed.arrays
    assert by_node["conv_a"].inputs[1].name in plain.arrays
    assert packed.arrays[packed.packed[(id(by_node["conv_a"]), 1)]].shape == (2, 2, 3, 3, 16, 4)


@pytest.fixture
def vnni_features(monkeypatch):
    """Lower as for a VNNI target on any host: the packed layouts without the instruction."""
    monkeypatch.setattr(targets, "target_features", lambda target: VNNI)


def test_packed_int8_layers_match_reference(vnni_features):
    graph = int8_cnn()
    built = build(graph, "cpu")
    assert any(name.endswith(".packed") for name in built.weights)
    for seed in range(2):
        feeds = {"x": np.random.default_rng(10 + seed).standard_normal((1, 5, 9, 10))
                 .astype(np.float32)}
        expected = executor.run(graph, feeds)
        np.testing.assert_array_equal(built.run(feeds)["y"], expected["y"])


def test_packed_dynamic_linear_matches_reference(vnni_features):
    torch.manual_seed(0)
    # The last layer sums 8 products per output, too few to pack (vnni.MIN_REDUCTION).
    layers = torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.GELU(),
                                 torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    loaded = graphcomp.load_model(layers.eval(), example_inputs=(torch.randn(2, 5, 32),))
    graph = PassManager("quantize:dynamic,dce").run(loaded.graph).graph
    assert sum(node.op == "dynamic_qlinear" for node in graph.nodes) == 3
    built = build(graph, "cpu")
    assert sum(name.endswith(".packed") for name in built.weights) == 2
    feeds = {graph.inputs[0].name: np.random.default_rng(1).standard_normal((2, 5, 32))
             .astype(np.float32)}
    expected = executor.run(graph, feeds)
    (name,) = expected
    np.testing.assert_allclose(built.run(feeds)[name], expected[name], rtol=1e-5, atol=1e-5)


def test_packed_transposed_conv_matches_reference(vnni_features):
    # up: stride 2 = kernel 2, 36 input channels, packed. smooth: kernel 3, stride 2, plain.
    torch.manual_seed(1)
    layers = torch.nn.Sequential(torch.nn.ConvTranspose2d(36, 5, 2, 2), torch.nn.ReLU(),
                                 torch.nn.ConvTranspose2d(5, 3, 3, 2, padding=1))
    loaded = graphcomp.load_model(layers.eval(), example_inputs=(torch.randn(1, 36, 5, 6),))
    calibration = [{loaded.graph.inputs[0].name: torch.randn(1, 36, 5, 6).numpy()}
                   for _ in range(3)]
    graph = PassManager("quantize:int8,dce", calibration=calibration).run(loaded.graph).graph
    transposed = [node for node in graph.nodes if node.op == "qconv_transpose2d"]
    assert len(transposed) == 2
    assert transposed[0].attrs["x_zero_point"] != 0  # the correction term is exercised
    built = build(graph, "cpu")
    assert sum(name.endswith(".packed") for name in built.weights) == 1
    feeds = {graph.inputs[0].name: torch.randn(1, 36, 5, 6).numpy()}
    expected = executor.run(graph, feeds)
    (name,) = expected
    np.testing.assert_array_equal(built.run(feeds)[name], expected[name])


def test_vnni_env_switch_disables_packing(monkeypatch):
    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    assert targets.target_features(target).vnni
    monkeypatch.setenv(targets.VNNI_ENV, "0")
    assert not targets.target_features(target).vnni
    monkeypatch.delenv(targets.VNNI_ENV)
    skylake = tvm.target.Target({"kind": "llvm", "mcpu": "skylake"})
    assert not targets.target_features(skylake).vnni
    assert not targets.target_features(targets.resolve_target("arm")).vnni


def _tensorized_dot(target):
    """C[i, j] = sum_k A[i, k] * B[j, k] for A uint8 [2, 8], B int8 [16, 8], with B given
    packed as [1, 2, 16, 4] and the 16 x 4 inner block tensorized with dot_16x4_vnni."""
    from tvm import te
    from tvm.s_tir import Schedule

    a = te.placeholder((2, 8), "uint8", name="a")
    b = te.placeholder((1, 2, 16, 4), "int8", name="b")
    k = te.reduce_axis((0, 8), name="k")
    c = te.compute((2, 16), lambda i, j: te.sum(
        a[i, k].astype("int32") * b[0, k // 4, j, k % 4].astype("int32"), axis=k), name="c")
    schedule = Schedule(te.create_prim_func([a, b, c]))
    block = schedule.get_sblock("c")
    i, j, k = schedule.get_loops(block)
    k_outer, k_inner = schedule.split(k, factors=[None, 4])
    schedule.reorder(i, k_outer, j, k_inner)
    initial = schedule.decompose_reduction(block, k_outer)
    assert initial is not None
    schedule.tensorize(j, VNNI_INTRINSIC)
    return tvm.compile(schedule.mod, target=target)


def test_vnni_intrinsic_computes_dot_products():
    host = targets.resolve_target("cpu")
    if not has_avx512_vnni(host):
        # The code still has to compile for a VNNI CPU; running it needs one.
        cascadelake = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
        register_intrinsics(cascadelake)
        _tensorized_dot(cascadelake)
        pytest.skip("this host has no AVX-512 VNNI to run vpdpbusd")
    register_intrinsics(host)
    library = _tensorized_dot(host)
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (2, 8), dtype=np.uint8)
    b = rng.integers(-128, 128, (16, 8), dtype=np.int8)
    packed = vnni.pack_linear_weight(b)
    device = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((2, 16), np.int32), device)
    library["main"](tvm.runtime.tensor(a, device), tvm.runtime.tensor(packed, device), out)
    np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ b.astype(np.int32).T)
