"""Small ONNX models built with onnx.helper, shared by the CLI and compile tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def conv_bn_relu_gemm(batch: int | str = "N", size: int = 8) -> onnx.ModelProto:
    """x[batch,3,size,size] -> Conv(3->4, 3x3, pad 1) -> BatchNormalization -> Relu ->
    GlobalAveragePool -> Flatten -> Gemm(4->5) -> Softmax -> y[batch,5]."""
    rng = np.random.default_rng(0)
    initializers = [
        _initializer("conv.w", rng.standard_normal((4, 3, 3, 3)) * 0.3),
        _initializer("conv.b", rng.standard_normal(4)),
        _initializer("bn.scale", rng.uniform(0.5, 2.0, 4)),
        _initializer("bn.bias", rng.uniform(-1, 1, 4)),
        _initializer("bn.mean", rng.uniform(-1, 1, 4)),
        _initializer("bn.var", rng.uniform(0.5, 2.0, 4)),
        _initializer("fc.w", rng.standard_normal((4, 5))),
        _initializer("fc.b", rng.standard_normal(5)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv",
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                         ["b"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc"),
        helper.make_node("Softmax", ["g"], ["y"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn_relu_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_unsupported_ops() -> onnx.ModelProto:
    """x -> Relu -> NonZero -> ... and x -> Det: two op types graphcomp does not import."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Det", ["r"], ["d"], name="det_node"),
        helper.make_node("Hardmax", ["r"], ["h"], name="hardmax_node"),
    ]
    graph = helper.make_graph(
        nodes, "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
