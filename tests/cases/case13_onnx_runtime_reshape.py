"""A Reshape whose shape is a runtime int64 input crashed type inference in an ONNX importer
(https://github.com/apache/tvm/issues/20174)."""

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh

g = oh.make_graph(
    [oh.make_node("Reshape", ["data", "shape"], ["y"])], "runtime_reshape",
    [oh.make_tensor_value_info("data", TP.FLOAT, [2, 3, 4]),
     oh.make_tensor_value_info("shape", TP.INT64, [2])],  # the shape is a graph input
    [oh.make_tensor_value_info("y", TP.FLOAT, ["a", "b"])])
model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
onnx.checker.check_model(model)
feeds = [{"data": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
          "shape": np.array(s, np.int64)}
         for s in ([6, 4], [4, -1], [24, 1])]  # expected y = data.reshape(shape)
