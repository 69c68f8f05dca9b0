"""TVM kernels of int8 graphs: one kernel per quantized layer after FuseOps, equal to the
reference executor bit for bit.

The quantized lowerings compute the terms that depend on the weights alone (requantization
multiplier, zero-point correction of the bias) at lowering time. They pad with the zero point
inside the convolution's own TIR function. So FuseOps puts each int8 convolution, its
requantization and the float ops up to the next quantize into one kernel. References: the
float graph's kernel count, and the reference executor (exact equality on int8 and on the
float outputs computed from them).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.pipeline import PassManager
from graphcomp.shapes import infer_shapes

pytest.importorskip("tvm")

from graphcomp.backends.tvm import build, lower_to_relax, resolve_target  # noqa: E402
from graphcomp.backends.tvm.tuning import fuse_module  # noqa: E402

RNG = np.random.default_rng(11)


def affine_hardswish_cnn() -> Graph:
    """The layer pattern of PP-OCRv4 det, in float:

        x -> conv1 (3->8, 3x3, pad 1, bias) -> mul @scale -> add @shift -> hardswish
          -> conv2 (8->6, 3x3, stride 2, pad 1, bias) -> y
    """
    x = Value("x", (1, 3, 10, 9))
    values = [Value(name, ()) for name in ("c1", "scaled", "shifted", "act", "y")]

    def const(name, *shape, scale=0.3):
        return Constant(name, (RNG.standard_normal(shape) * scale).astype(np.float32))

    conv = {"pads": [1, 1, 1, 1]}
    nodes = [
        Node("conv1", "conv2d", [x, const("w1", 8, 3, 3, 3), const("b1", 8)], [values[0]],
             dict(conv)),
        Node("affine_mul", "mul", [values[0], const("scale", 1, 8, 1, 1, scale=1.0)],
             [values[1]]),
        Node("affine_add", "add", [values[1], const("shift", 1, 8, 1, 1)], [values[2]]),
        Node("act", "hardswish", [values[2]], [values[3]]),
        Node("conv2", "conv2d", [values[3], const("w2", 6, 8, 3, 3), const("b2", 6)],
             [values[4]], {**conv, "strides": [2, 2]}),
    ]
    graph = Graph("affine_hardswish_cnn", [x], [values[4]], nodes)
    infer_shapes(graph)
    return graph


def feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, 3, 10, 9)).astype(np.float32)}


def quantized_cnn() -> Graph:
    calibration = [feeds(seed) for seed in range(3)]
    return PassManager("quantize:int8,dce", calibration=calibration).run(
        affine_hardswish_cnn()).graph


def fused_kernels(graph: Graph) -> list[str]:
    """Names of the TIR functions that main calls after FuseOps, leaving out reshapes (the
    build turns those into views of their input)."""
    module = fuse_module(lower_to_relax(graph), resolve_target("cpu"))
    called = re.findall(r"R\.call_tir\((?:cls\.)?(\w+)", module["main"].script())
    return [name for name in called if not re.fullmatch(r"reshape\d*", name)]


def test_int8_cnn_has_one_kernel_per_layer():
    graph = quantized_cnn()
    assert [node.op for node in graph.nodes] == [
        "quantize", "qconv2d", "dequantize", "mul", "add", "hardswish", "quantize", "qconv2d",
        "dequantize",
    ]
    float_kernels = fused_kernels(affine_hardswish_cnn())
    int8_kernels = fused_kernels(graph)
    assert len(float_kernels) == 2  # each conv with its epilogue
    # One more than float: quantizing the graph input.
    assert len(int8_kernels) == 3
    assert re.fullmatch(r"fused_divide\w*_round\w*_clip\w*", int8_kernels[0])


def test_int8_conv_kernel_contains_epilogue():
    first_conv, second_conv = fused_kernels(quantized_cnn())[1:]
    # conv1: requantize, dequantize, the affine mul/add, hardswish, quantize for conv2.
    assert first_conv.startswith("fused_qconv2d_zero_point_pad")
    assert first_conv.count("round") == 2
    assert "clip" in first_conv
    assert second_conv.startswith("fused_qconv2d_zero_point_pad")


def test_int8_kernels_compute_no_weight_terms():
    module = lower_to_relax(quantized_cnn())
    text = module["main"].script()
    # Weight sums and multipliers are constants: no reduction or weight reshape at run time.
    assert "R.sum(" not in text
    assert "R.reshape(" not in text


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_int8_cnn_tvm_equals_reference(fused):
    from tvm.s_tir import meta_schedule as ms

    graph = quantized_cnn()
    # An empty database gives the tuned pipeline's FuseOps with TVM's default schedules.
    database = ms.database.MemoryDatabase() if fused else None
    built = build(graph, "cpu", tuning_database=database)
    output = graph.outputs[0].name
    checked = []
    for seed in (20, 21):
        expected = executor.run(graph, feeds(seed))[output]
        actual = built.run(feeds(seed))[output]
        np.testing.assert_array_equal(actual, expected)  # bit for bit, tolerance 0
        checked.append(expected)
    assert len(np.unique(np.concatenate(checked))) > 20  # not a saturated block


def runtime_weight_graph(op: str) -> tuple[Graph, dict[str, np.ndarray]]:
    """qconv2d or qlinear whose weight, weight scale and bias are graph inputs, so the
    lowering computes the weight terms in Relax instead of numpy."""
    if op == "qconv2d":
        x_shape, w_shape = (1, 4, 6, 5), (6, 2, 3, 3)
        attrs = {"pads": [1, 2, 0, 1], "groups": 2, "strides": [1, 2]}
    else:
        x_shape, w_shape = (3, 7), (5, 7)
        attrs = {}
    attrs.update(x_scale=0.04, x_zero_point=9, y_scale=0.3, y_zero_point=-4)
    out_channels = w_shape[0]
    data = {
        "x": RNG.integers(-128, 128, x_shape).astype(np.int8),
        "w": RNG.integers(-127, 128, w_shape).astype(np.int8),
        "w_scale": RNG.uniform(0.002, 0.02, out_channels).astype(np.float32),
        "bias": RNG.integers(-3000, 3000, out_channels).astype(np.int32),
    }
    inputs = [Value(name, array.shape, str(array.dtype)) for name, array in data.items()]
    output = Value("y", (), "int8")
    graph = Graph(op, inputs, [output], [Node(op, op, inputs, [output], attrs)])
    infer_shapes(graph)
    return graph, data


@pytest.mark.parametrize("op", ["qconv2d", "qlinear"])
def test_runtime_weights_tvm_equals_reference(op):
    graph, data = runtime_weight_graph(op)
    text = lower_to_relax(graph)["main"].script()
    assert "R.sum(" in text  # the weight sums are computed at run time
    expected = executor.run(graph, data)["y"]
    actual = build(graph, "cpu").run(data)["y"]
    np.testing.assert_array_equal(actual, expected)  # bit for bit
    assert len(np.unique(expected)) > 10


def test_zero_point_zero_pads_in_relax_conv2d():
    # With x_zero_point 0 the quantized 0.0 is 0, which TVM's conv2d pads with itself.
    x = Value("x", (1, 3, 5, 6), "int8")
    weight = Constant("w", RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8))
    w_scale = Constant("w_scale", RNG.uniform(0.002, 0.02, 4).astype(np.float32))
    attrs = {"pads": [2, 0, 1, 1], "x_scale": 0.05, "x_zero_point": 0, "y_scale": 0.2,
             "y_zero_point": 3}
    output = Value("y", (), "int8")
    graph = Graph("qconv2d", [x], [output], [Node("conv", "qconv2d", [x, weight, w_scale],
                                                   [output], attrs)])
    infer_shapes(graph)
    text = lower_to_relax(graph)["main"].script()
    assert "R.nn.conv2d(" in text
    assert "padding=[2, 0, 1, 1]" in text
    data = {"x": RNG.integers(-128, 128, (1, 3, 5, 6)).astype(np.int8)}
    expected = executor.run(graph, data)["y"]
    np.testing.assert_array_equal(build(graph, "cpu").run(data)["y"], expected)  # bit for bit
    assert len(np.unique(expected)) > 10
