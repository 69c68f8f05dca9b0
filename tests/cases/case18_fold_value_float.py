"""Constant folding turned Constant(value_float=...) into a float64 initializer, and ONNX
Runtime refused the model (https://github.com/NVIDIA/TensorRT/pull/4834)."""

import onnx
from onnx import TensorProto as TP
from onnx import helper as oh

g = oh.make_graph(
    [oh.make_node("Constant", [], ["c"], value_float=0.5),  # scalar float attribute (float32)
     oh.make_node("Mul", ["c", "c"], ["c2"]),  # constant-only subgraph -> foldable
     oh.make_node("Add", ["x", "c2"], ["y"])], "value_float_fold",
    [oh.make_tensor_value_info("x", TP.FLOAT, [2])],
    [oh.make_tensor_value_info("y", TP.FLOAT, [2])])
model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
onnx.checker.check_model(model)  # expected after folding: one Add with a FLOAT 0.25 initializer
