"""Tests for the ONNX frontend: each op against ONNX Runtime, folding, errors, real models.

Every numerical test runs the imported graph with graphcomp's reference executor and the
original ONNX file with ONNX Runtime (CPU) on the same seeded input, and compares the outputs
with the tolerance stated in the test.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nph

from graphcomp import executor
from graphcomp.errors import (
    GraphcompError, ModelLoadError, OptionError, ShapeError, UnsupportedOpError,
)
from graphcomp.frontends.onnx_frontend import (
    build_graph, import_onnx, lower_constant_nodes, parse_input_shapes, simplify_model,
)
from graphcomp.ir import Constant
from graphcomp.zoo import PPOCR_SHAPES, ppocr_cls_labels, ppocr_inputs, ppocr_path

FLOAT_TOLERANCE = 1e-5  # max abs error relative to max(1, max |reference|) for small graphs


# --- helpers -----------------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    """A checked ONNX model. ``inputs`` are (name, shape, TensorProto type); an output is a
    name, typed by ONNX shape inference, or a (name, shape, type) tuple."""
    output_infos = [
        oh.make_tensor_value_info(out[0], out[2], out[1]) if isinstance(out, tuple)
        else oh.make_value_info(out, onnx.TypeProto()) for out in outputs
    ]
    graph = oh.make_graph(
        nodes, "test_graph",
        [oh.make_tensor_value_info(name, dtype, shape) for name, shape, dtype in inputs],
        output_infos,
        [nph.from_array(np.asarray(array), name) for name, array in dict(initializers).items()],
    )
    opsets = [oh.make_opsetid("", opset)] + [oh.make_opsetid(d, v) for d, v in extra_opsets]
    model = oh.make_model(graph, opset_imports=opsets)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def random_feeds(model, seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = (shapes or {}).get(value.name) or [d.dim_value for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) > 0.5
        else:
            feeds[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def run_onnxruntime(path_or_model, feeds):
    source = path_or_model if isinstance(path_or_model, str) else \
        path_or_model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def import_and_compare(tmp_path, model, input_shapes=None, tolerance=FLOAT_TOLERANCE):
    """Import ``model`` from a file, run both sides on seeded inputs, return the graph."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    graph = import_onnx(path, input_shapes)
    feeds = random_feeds(model, shapes=input_shapes)
    expected = run_onnxruntime(str(path), feeds)
    actual = executor.run(graph, feeds)
    assert list(actual) == list(expected)
    for name, reference in expected.items():
        assert actual[name].shape == reference.shape, name
        assert actual[name].dtype == reference.dtype, name
        if np.issubdtype(reference.dtype, np.floating):
            scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
            error = float(np.abs(actual[name] - reference).max(initial=0.0))
            assert error <= tolerance * scale, f"{name}: max error {error}, scale {scale}"
        else:
            np.testing.assert_array_equal(actual[name], reference)
    return graph


def node(op_type, inputs, outputs, name="", **attrs):
    return oh.make_node(op_type, inputs, outputs, name=name, **attrs)


def weights(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X4 = [("x", [1, 4, 9, 11], TP.FLOAT)]
X3 = [("x", [2, 5, 6], TP.FLOAT)]


# --- every op against ONNX Runtime -------------------------------------------------------------
# Each case: ONNX nodes, inputs, initializers, opset. The graph reads "x" and writes "y".

OP_CASES = {
    "conv_pads_strides_dilations_bias": (
        [node("Conv", ["x", "w", "b"], ["y"], strides=[2, 1], pads=[1, 2, 0, 1],
              dilations=[1, 2])],
        X4, {"w": weights(6, 4, 3, 3), "b": weights(6)}, 17),
    "conv_same_upper_stride2": (
        [node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
        X4, {"w": weights(6, 4, 3, 3)}, 17),
    "conv_same_lower": (
        [node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_LOWER")],
        X4, {"w": weights(6, 4, 4, 4)}, 17),
    "conv_valid_grouped": (
        [node("Conv", ["x", "w"], ["y"], group=2, auto_pad="VALID", kernel_shape=[3, 2])],
        X4, {"w": weights(6, 2, 3, 2)}, 11),
    "conv_depthwise": (
        [node("Conv", ["x", "w", "b"], ["y"], group=4, pads=[1, 1, 1, 1])],
        X4, {"w": weights(4, 1, 3, 3), "b": weights(4)}, 13),
    "conv_transpose_groups_output_padding": (
        [node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1],
              output_padding=[1, 1], group=2)],
        X4, {"w": weights(4, 3, 3, 3), "b": weights(6)}, 17),
    "conv_transpose_output_shape": (
        [node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[19, 22])],
        X4, {"w": weights(4, 2, 3, 3)}, 17),
    "conv_transpose_same_upper": (
        [node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
        X4, {"w": weights(4, 2, 3, 3)}, 17),
    "batch_norm": (
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
        X4, {"s": weights(4), "b": weights(4, seed=2), "m": weights(4, seed=3),
             "v": np.abs(weights(4, seed=4)) + 0.5}, 15),
    "gemm_trans_alpha_beta": (
        [node("Gemm", ["a", "w", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0)],
        [("a", [7, 3], TP.FLOAT)], {"w": weights(5, 7), "c": weights(5)}, 13),
    "gemm_full_c": (
        [node("Gemm", ["a", "w", "c"], ["y"], beta=0.5)],
        [("a", [3, 7], TP.FLOAT)], {"w": weights(7, 5), "c": weights(3, 5)}, 13),
    "gemm_runtime_b": (
        [node("Gemm", ["a", "bt", "c"], ["y"], transB=1, alpha=1.5)],
        [("a", [3, 7], TP.FLOAT), ("bt", [5, 7], TP.FLOAT)], {"c": weights(1, 5)}, 13),
    "matmul_constant_weight": (
        [node("MatMul", ["x", "w"], ["y"])], X3, {"w": weights(6, 4)}, 13),
    "matmul_batched": (
        [node("MatMul", ["x", "z"], ["y"])],
        [("x", [2, 3, 4], TP.FLOAT), ("z", [1, 4, 5], TP.FLOAT)], {}, 13),
    "unary_chain": (
        [node("Relu", ["x"], ["r"]), node("Sigmoid", ["x"], ["s"]), node("Tanh", ["s"], ["t"]),
         node("Erf", ["t"], ["e"]), node("Abs", ["x"], ["a"]), node("Sqrt", ["a"], ["q"]),
         node("Exp", ["e"], ["p"]), node("Log", ["p"], ["l"]), node("Neg", ["l"], ["n"]),
         node("Add", ["r", "q"], ["rq"]), node("Sub", ["rq", "n"], ["y"])],
        X3, {}, 13),
    "hard_sigmoid_hard_swish": (
        [node("HardSigmoid", ["x"], ["h"]), node("HardSigmoid", ["x"], ["g"], alpha=0.3,
                                                 beta=0.4),
         node("HardSwish", ["x"], ["s"]), node("Mul", ["h", "g"], ["hg"]),
         node("Add", ["hg", "s"], ["y"])],
        X3, {}, 14),
    "clip_attributes_opset6": (
        [node("Clip", ["x"], ["y"], min=-0.5, max=0.7)], X3, {}, 6),
    "clip_inputs": (
        [node("Clip", ["x", "lo", "hi"], ["c"]), node("Clip", ["x", "", "hi"], ["d"]),
         node("Add", ["c", "d"], ["y"])],
        X3, {"lo": np.array(-0.3, np.float32), "hi": np.array(0.6, np.float32)}, 13),
    "pow_float_and_int_exponent": (
        [node("Abs", ["x"], ["a"]), node("Pow", ["a", "e"], ["p"]),
         node("Pow", ["x", "k"], ["q"]), node("Add", ["p", "q"], ["y"])],
        X3, {"e": np.array(1.5, np.float32), "k": np.array(3, np.int64)}, 15),
    "binary_broadcasting": (
        [node("Mul", ["x", "c"], ["m"]), node("Div", ["m", "d"], ["q"]),
         node("Sub", ["q", "x"], ["y"])],
        X3, {"c": weights(6), "d": np.abs(weights(5, 1)) + 1.0}, 13),
    "variadic_max_min_sum": (
        [node("Max", ["x", "z", "w"], ["a"]), node("Min", ["x", "z"], ["b"]),
         node("Sum", ["a", "b", "x"], ["y"])],
        [("x", [2, 5, 6], TP.FLOAT), ("z", [5, 6], TP.FLOAT)], {"w": weights(6)}, 13),
    "concat_split_input": (
        [node("Concat", ["x", "x"], ["c"], axis=-1),
         node("Split", ["c", "sizes"], ["y", "y2"], axis=2)],
        X3, {"sizes": np.array([5, 7], np.int64)}, 13),
    "split_attribute_opset11": (
        [node("Split", ["x"], ["y", "y2", "y3"], axis=1, split=[1, 3, 1])], X3, {}, 11),
    "split_num_outputs_uneven": (
        [node("Split", ["x"], ["y", "y2", "y3"], axis=1, num_outputs=3)], X3, {}, 18),
    "split_equal_default": (
        [node("Split", ["x"], ["y", "y2"], axis=-1)], X3, {}, 13),
    "reshape_zero_and_minus_one": (
        [node("Reshape", ["x", "s"], ["y"])], X3, {"s": np.array([0, -1, 2], np.int64)}, 13),
    "flatten_axes": (
        [node("Flatten", ["x"], ["y"], axis=2), node("Flatten", ["x"], ["y2"], axis=-1),
         node("Flatten", ["x"], ["y3"], axis=0)], X4, {}, 13),
    "squeeze_unsqueeze_opset11": (
        [node("Unsqueeze", ["x"], ["u"], axes=[0, -1]), node("Squeeze", ["u"], ["y"],
                                                            axes=[-1])], X3, {}, 11),
    "squeeze_unsqueeze_opset13": (
        [node("Unsqueeze", ["x", "axes"], ["u"]), node("Squeeze", ["u"], ["y"])],
        X3, {"axes": np.array([1, 3], np.int64)}, 13),
    "transpose": (
        [node("Transpose", ["x"], ["t"]), node("Transpose", ["t"], ["y"], perm=[1, 0, 2])],
        X3, {}, 13),
    "slice_inputs": (
        [node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
         node("Slice", ["x", "starts", "big"], ["y2"])],
        X3, {"starts": np.array([-4, 1], np.int64), "ends": np.array([9223372036854775807, 5],
                                                                     np.int64),
             "axes": np.array([-1, 1], np.int64), "steps": np.array([2, 3], np.int64),
             "big": np.array([100, 100], np.int64)}, 13),
    "slice_attributes_opset9": (
        [node("Slice", ["x"], ["y"], starts=[1, -3], ends=[2, 1000], axes=[0, 2])], X3, {}, 9),
    "gather_constant_and_runtime_indices": (
        [node("Gather", ["x", "i"], ["g"], axis=1), node("Gather", ["x", "k"], ["h"], axis=-1),
         node("Gather", ["x", "j"], ["y"], axis=0)],
        X3 + [("j", [2, 2], TP.INT64)],
        {"i": np.array([[0, -1], [2, 3]], np.int64), "k": np.array(-2, np.int64)}, 13),
    "cast_round_trip": (
        [node("Cast", ["x"], ["i"], to=TP.INT32), node("Cast", ["i"], ["y"], to=TP.FLOAT),
         node("Cast", ["x"], ["b"], to=TP.BOOL)], X3, {}, 13),
    "identity_intermediate_and_output": (
        [node("Identity", ["x"], ["i"]), node("Relu", ["i"], ["r"]),
         node("Identity", ["r"], ["y"])], X3, {}, 13),
    "softmax_opset11_coerced_2d": (
        [node("Softmax", ["x"], ["y"], axis=1)], X4, {}, 11),
    "softmax_opset11_default_axis": (
        [node("Softmax", ["x"], ["y"])], X3, {}, 11),
    "softmax_opset13_axis1": (
        [node("Softmax", ["x"], ["y"], axis=1)], X4, {}, 13),
    "reduce_attribute_axes": (
        [node("ReduceMean", ["x"], ["y"], axes=[1, -1], keepdims=0),
         node("ReduceMax", ["x"], ["y2"], axes=[0]), node("ReduceMean", ["x"], ["y3"])],
        X3, {}, 13),
    "reduce_input_axes": (
        [node("ReduceSum", ["x", "axes"], ["y"], keepdims=1),
         node("ReduceMean", ["x", "axes"], ["y2"], keepdims=0),
         node("ReduceMax", ["x", "axes"], ["y3"])],
        X3, {"axes": np.array([-2], np.int64)}, 18),
    "max_pool_ceil_mode": (
        [node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              ceil_mode=1)], X4, {}, 13),
    "max_pool_same_upper_asymmetric": (
        [node("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2],
              auto_pad="SAME_UPPER")], X4, {}, 13),
    "max_pool_dilated": (
        [node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], X4, {}, 13),
    "average_pool_exclude_pad": (
        [node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], strides=[3, 2],
              pads=[1, 1, 1, 1])], X4, {}, 13),
    "average_pool_include_pad_asymmetric": (
        [node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 2, 1],
              count_include_pad=1)], X4, {}, 13),
    "global_pools": (
        [node("GlobalAveragePool", ["x"], ["a"]), node("GlobalMaxPool", ["x"], ["m"]),
         node("Add", ["a", "m"], ["y"])], X4, {}, 13),
    "resize_nearest_asymmetric_scales": (
        [node("Resize", ["x", "", "scales"], ["y"], mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
        X4, {"scales": np.array([1, 1, 2, 2], np.float32)}, 13),
    "resize_nearest_half_pixel_integer_factor": (
        [node("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
        X4, {"scales": np.array([1, 1, 3, 2], np.float32)}, 13),
    "resize_linear_half_pixel_sizes": (
        [node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear")],
        X4, {"sizes": np.array([1, 4, 14, 7], np.int64)}, 13),
    "resize_linear_align_corners": (
        [node("Resize", ["x", "roi", "scales"], ["y"], mode="linear",
              coordinate_transformation_mode="align_corners")],
        X4, {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}, 11),
    "resize_linear_pytorch_half_pixel_axes": (
        [node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", axes=[2, 3],
              coordinate_transformation_mode="pytorch_half_pixel")],
        X4, {"sizes": np.array([5, 6], np.int64)}, 18),
    "upsample_nearest_opset7_attribute": (
        [node("Upsample", ["x"], ["y"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0])],
        X4, {}, 7),
    "resize_nearest_opset10": (
        [node("Resize", ["x", "scales"], ["y"], mode="nearest")],
        X4, {"scales": np.array([1, 1, 2, 1], np.float32)}, 10),
    "upsample_nearest_opset9": (
        [node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
        X4, {"scales": np.array([1, 1, 2, 3], np.float32)}, 9),
    "pad_constant_value": (
        [node("Pad", ["x", "pads", "value"], ["y"])],
        X3, {"pads": np.array([0, 1, 2, 1, 0, 3], np.int64),
             "value": np.array(1.5, np.float32)}, 13),
    "pad_reflect_edge": (
        [node("Pad", ["x", "pads"], ["r"], mode="reflect"),
         node("Pad", ["x", "pads"], ["e"], mode="edge"), node("Add", ["r", "e"], ["y"])],
        X4, {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, 13),
    "pad_axes_opset18": (
        [node("Pad", ["x", "pads", "", "axes"], ["y"])],
        X3, {"pads": np.array([1, 2, 3, 0], np.int64), "axes": np.array([-1, 0], np.int64)}, 18),
    "pad_attributes_opset2": (
        [node("Pad", ["x"], ["y"], pads=[0, 1, 0, 0, 2, 1], value=-1.0)], X3, {}, 2),
    "expand": (
        [node("Expand", ["x", "shape"], ["y"])],
        [("x", [3, 1], TP.FLOAT)], {"shape": np.array([2, 1, 4], np.int64)}, 13),
    "where_and_comparisons": (
        [node("Equal", ["i", "j"], ["eq"]), node("Not", ["eq"], ["ne"]),
         node("Less", ["x", "z"], ["lt"]), node("Greater", ["x", "z"], ["gt"]),
         node("Where", ["lt", "x", "z"], ["y"]), node("Where", ["gt", "x", "z"], ["y2"]),
         node("Identity", ["ne"], ["y3"])],
        [("x", [2, 5, 6], TP.FLOAT), ("z", [6], TP.FLOAT), ("i", [5, 6], TP.INT64),
         ("j", [6], TP.INT64)], {}, 13),
    "layer_norm_scale_bias": (
        [node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)],
        X3, {"s": weights(6), "b": weights(6, seed=2)}, 17),
    "layer_norm_axis1_scale_only": (
        [node("LayerNormalization", ["x", "s"], ["y"], axis=1)], X3, {"s": weights(5, 6)}, 17),
    "gelu_exact_and_tanh": (
        [node("Gelu", ["x"], ["g"]), node("Gelu", ["x"], ["t"], approximate="tanh"),
         node("Add", ["g", "t"], ["y"])], X3, {}, 20),
    "dropout_inference": (
        [node("Dropout", ["x"], ["d"]), node("Relu", ["d"], ["y"])], X3, {}, 13),
}


@pytest.mark.parametrize("case", list(OP_CASES), ids=list(OP_CASES))
def test_op_matches_onnxruntime(tmp_path, case):
    nodes, inputs, initializers, opset = OP_CASES[case]
    outputs = [n for n in ("y", "y2", "y3") if any(n in nd.output for nd in nodes)]
    model = make_model(nodes, inputs, outputs, initializers, opset)
    import_and_compare(tmp_path, model)


# --- graph structure ---------------------------------------------------------------------------


def test_names_and_metadata(tmp_path):
    # ONNX Runtime rejects repeated node names, so this compares with numpy.
    model = make_model(
        [node("Relu", ["x"], ["a"]), node("Neg", ["a"], ["b"], name="dup"),
         node("Abs", ["b"], ["out.0"], name="dup")],
        X3, ["out.0"], opset=13,
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    graph = import_onnx(path)
    x = random_feeds(model)["x"]
    np.testing.assert_array_equal(executor.run(graph, {"x": x})["out.0"], np.maximum(x, 0))
    assert [n.name for n in graph.nodes] == ["Relu_0", "dup", "dup_1"]
    assert [v.name for v in graph.inputs] == ["x"]
    assert [v.name for v in graph.outputs] == ["out.0"]
    assert graph.metadata == {"source": str(tmp_path / "model.onnx"), "frontend": "onnx",
                              "opset": 13}


def test_mapped_ops_and_static_attributes(tmp_path):
    model = OP_CASES["reshape_zero_and_minus_one"]
    graph = import_and_compare(tmp_path, make_model(*model[:2], ["y"], *model[2:]))
    assert [n.op for n in graph.nodes] == ["reshape"]
    assert graph.nodes[0].attrs["shape"] == [2, 15, 2]


def test_constant_gemm_weight_becomes_linear(tmp_path):
    nodes, inputs, initializers, opset = OP_CASES["gemm_trans_alpha_beta"]
    graph = import_and_compare(tmp_path, make_model(nodes, inputs, ["y"], initializers, opset))
    assert [n.op for n in graph.nodes] == ["transpose", "linear"]
    assert graph.nodes[1].inputs[1].shape == (5, 7)


def test_shape_chain_folds_to_static_reshape(tmp_path):
    # x[N,3,H,W] -> Shape -> Gather(0) -> Unsqueeze -> Concat([-1]) -> Reshape(x) = x[N, 3*H*W]
    model = make_model(
        [node("Shape", ["x"], ["shape"]), node("Gather", ["shape", "zero"], ["n"]),
         node("Unsqueeze", ["n", "axes"], ["n1"]),
         node("Concat", ["n1", "minus_one"], ["target"], axis=0),
         node("Reshape", ["x", "target"], ["flat"], name="flatten_by_shape"),
         node("Relu", ["flat"], ["y"])],
        [("x", ["N", 3, "H", "W"], TP.FLOAT)], [("y", ["N", "M"], TP.FLOAT)],
        {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
         "minus_one": np.array([-1], np.int64)}, opset=13,
    )
    graph = import_and_compare(tmp_path, model, input_shapes={"x": (2, 3, 4, 5)})
    assert [n.op for n in graph.nodes] == ["reshape", "relu"]
    assert graph.node("flatten_by_shape").attrs["shape"] == [2, 60]
    assert graph.outputs[0].shape == (2, 60)


def test_shape_ops_convert_without_folding():
    # build_graph alone (no folding) still turns Shape, Size and ConstantOfShape into constants.
    model = make_model(
        [node("Shape", ["x"], ["shape"]), node("Size", ["x"], ["size"]),
         node("ConstantOfShape", ["shape"], ["ones"],
              value=nph.from_array(np.array([1.0], np.float32))),
         node("Add", ["x", "ones"], ["sum"]), node("Reshape", ["sum", "flat"], ["y"]),
         node("Identity", ["size"], ["y2"])],
        X3, ["y", "y2"], {"flat": np.array([-1], np.int64)}, opset=13,
    )
    graph = build_graph(model, "unfolded")
    assert [n.op for n in graph.nodes] == ["add", "reshape", "identity"]
    x = random_feeds(model)["x"]
    outputs = executor.run(graph, {"x": x})
    np.testing.assert_array_equal(outputs["y"], (x + 1.0).reshape(-1))
    assert outputs["y2"] == x.size


def test_external_data_model(tmp_path):
    model = make_model([node("MatMul", ["x", "w"], ["y"])], X3, ["y"], {"w": weights(6, 64)})
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size == 6 * 64 * 4
    graph = import_onnx(path)
    feeds = random_feeds(model)
    expected = run_onnxruntime(str(path), feeds)["y"]
    assert float(np.abs(executor.run(graph, feeds)["y"] - expected).max()) <= 1e-5 * max(
        1.0, float(np.abs(expected).max()))


# --- folding keeps ONNX dtypes ------------------------------------------------------------------


def test_every_folded_tensor_keeps_inferred_dtype():
    # Constants of each attribute kind feed foldable chains of several dtypes.
    model = make_model(
        [node("Constant", [], ["f"], value_floats=[0.5, 1.5]),
         node("Constant", [], ["i"], value_int=3),
         node("Constant", [], ["ints"], value_ints=[-2, 1]),
         node("Constant", [], ["h"], value=nph.from_array(np.array([2, 4], np.float16))),
         node("Mul", ["f", "f"], ["f2"]), node("Cast", ["i"], ["i32"], to=TP.INT32),
         node("Add", ["i32", "i32"], ["i64x"]), node("Cast", ["i64x"], ["i_float"], to=TP.FLOAT),
         node("Abs", ["ints"], ["target"]), node("Cast", ["h"], ["h32"], to=TP.FLOAT),
         node("Add", ["f2", "h32"], ["fh"]), node("Mul", ["fh", "i_float"], ["scale"]),
         node("Add", ["x", "scale"], ["s"]), node("Reshape", ["s", "target"], ["y"])],
        [("x", [2], TP.FLOAT)], [("y", [2, 1], TP.FLOAT)], opset=17,
    )
    inferred = onnx.shape_inference.infer_shapes(lower_constant_nodes(model))
    expected = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    folded = simplify_model(model, "dtype_fold")
    folded_types = {init.name: init.data_type for init in folded.graph.initializer}
    assert set(folded_types) == {"scale", "target"}
    for name, data_type in folded_types.items():
        assert data_type == expected[name], name
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run_onnxruntime(folded, {"x": x})["y"],
                                  run_onnxruntime(model, {"x": x})["y"])


# --- bad input -----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nothere\.onnx: file not found"):
        import_onnx(tmp_path / "nothere.onnx")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        import_onnx(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty\.onnx: the file is empty"):
        import_onnx(path)


def test_truncated_file(tmp_path):
    data = make_model([node("MatMul", ["x", "w"], ["y"])], X3, ["y"],
                      {"w": weights(6, 64)}).SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"truncated\.onnx: cannot be parsed.*truncated"):
        import_onnx(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelLoadError, match=r"random\.onnx: cannot be parsed"):
        import_onnx(path)


def test_protobuf_that_is_not_a_model(tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(nph.from_array(weights(3, 3)).SerializeToString())
    with pytest.raises(ModelLoadError, match=r"tensor\.onnx: is a serialized ONNX tensor "
                                             r"\(TensorProto\)"):
        import_onnx(path)


def test_model_that_fails_the_checker(tmp_path):
    model = make_model([node("Relu", ["x"], ["y"])], X3, ["y"])
    model.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match=r"invalid\.onnx: is not a valid ONNX model"):
        import_onnx(path)


def test_missing_external_data(tmp_path):
    model = make_model([node("MatMul", ["x", "w"], ["y"])], X3, ["y"], {"w": weights(6, 64)})
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: the model keeps weights in "
                                             r"external data files that are missing .*weights\.bin"):
        import_onnx(path)


def test_unsupported_ops_reported_together(tmp_path):
    model = make_model(
        [node("MyOp", ["x"], ["a"], name="custom_1", domain="com.example"),
         node("LeakyRelu", ["a"], ["b"], name="leaky_1"),
         node("LeakyRelu", ["b"], ["y"], name="leaky_2")],
        X3, [("y", [2, 5, 6], TP.FLOAT)], opset=13, extra_opsets=[("com.example", 1)],
    )
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(path)
    message = str(info.value)
    assert "unsupported.onnx: 2 unsupported op type(s)" in message
    assert "MyOp (domain com.example, opset 1) at node(s) custom_1" in message
    assert "LeakyRelu (domain ai.onnx, opset 13) at node(s) leaky_1, leaky_2" in message


def test_unsupported_attributes_reported_together(tmp_path):
    model = make_model(
        [node("Resize", ["x", "", "scales"], ["y"], name="cubic_resize", mode="cubic"),
         node("Conv", ["z", "w"], ["y2"], name="conv_1d")],
        X4 + [("z", [1, 2, 8], TP.FLOAT)], ["y", "y2"],
        {"scales": np.array([1, 1, 2, 2], np.float32), "w": weights(3, 2, 3)}, opset=13,
    )
    path = tmp_path / "attributes.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(path)
    message = str(info.value)
    assert "Resize (opset 13: Resize with mode 'cubic'" in message
    assert "cubic_resize" in message
    assert "Conv with a 1-D kernel" in message
    assert "conv_1d" in message


# Each case: one node on x[1,4,9,11] (plus initializers) and the reason the import gives.
REJECTED_NODES = {
    "resize_inexact_scale": (
        node("Resize", ["x", "", "scales"], ["y"], mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        {"scales": np.array([1, 1, 1.5, 2], np.float32)}, "is not input size times scale"),
    "resize_nearest_align_corners": (
        node("Resize", ["x", "", "scales"], ["y"], mode="nearest",
             coordinate_transformation_mode="align_corners"),
        {"scales": np.array([1, 1, 2, 2], np.float32)},
        "nearest mode with coordinate_transformation_mode 'align_corners'"),
    "resize_linear_asymmetric": (
        node("Resize", ["x", "", "scales"], ["y"], mode="linear",
             coordinate_transformation_mode="asymmetric"),
        {"scales": np.array([1, 1, 2, 2], np.float32)},
        "linear mode with coordinate_transformation_mode 'asymmetric'"),
    "resize_channels": (
        node("Resize", ["x", "", "scales"], ["y"], mode="nearest"),
        {"scales": np.array([1, 2, 2, 2], np.float32)}, "of the batch or channel dims"),
    "slice_negative_step": (
        node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
        {"starts": np.array([-1], np.int64), "ends": np.array([0], np.int64),
         "axes": np.array([3], np.int64), "steps": np.array([-1], np.int64)},
        "Slice with step -1, only positive steps"),
    "clip_runtime_bound": (
        node("Clip", ["x", "x"], ["y"]), {}, "Clip with a non-constant min"),
    "max_pool_asymmetric_ceil": (
        node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
        {}, "together with ceil_mode=1"),
    "average_pool_asymmetric_exclude_pad": (
        node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        {}, "together with ceil_mode=1 or count_include_pad=0"),
    "batch_norm_training": (
        node("BatchNormalization", ["x", "s", "s", "s", "s"], ["y", "mean", "var"],
             training_mode=1),
        {"s": np.ones(4, np.float32)}, "BatchNormalization with training_mode=1"),
    "pad_wrap": (
        node("Pad", ["x", "pads"], ["y"], mode="wrap"),
        {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}, "Pad with mode 'wrap'"),
    "conv_transpose_too_large_output": (
        node("ConvTranspose", ["x", "w"], ["y"], output_shape=[30, 30]),
        {"w": weights(4, 2, 3, 3)}, "larger than the full output"),
}


@pytest.mark.parametrize("case", list(REJECTED_NODES), ids=list(REJECTED_NODES))
def test_unsupported_attribute_rejected(tmp_path, case):
    onnx_node, initializers, reason = REJECTED_NODES[case]
    onnx_node.name = "rejected"
    output = ("y", ["n", "c", "h", "w"], TP.FLOAT)
    model = make_model([onnx_node], X4, [output], initializers, opset=19)
    path = tmp_path / "rejected.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError, match=r"at node\(s\) rejected") as info:
        import_onnx(path)
    assert reason in str(info.value)


def test_integer_div_rejected(tmp_path):
    model = make_model([node("Div", ["i", "i"], ["y"], name="int_div")],
                       [("i", [3], TP.INT64)], ["y"], opset=13)
    path = tmp_path / "int_div.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpError, match="Div on int64 tensors"):
        import_onnx(path)


def dynamic_model():
    return make_model(
        [node("Relu", ["x"], ["y"]), node("Neg", ["z"], ["y2"])],
        [("x", ["batch", 3, "height", "width"], TP.FLOAT), ("z", ["n", 4], TP.FLOAT)],
        ["y", "y2"],
    )


def test_dynamic_dims_without_shapes(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_model(), path)
    with pytest.raises(ShapeError) as info:
        import_onnx(path, {"z": (2, 4)})
    message = str(info.value)
    assert "x: [batch, 3, height, width]" in message
    assert "z:" not in message
    assert "--input-shape x=D0,3,D2,D3" in message
    with pytest.raises(ShapeError) as info:
        import_onnx(path)
    assert "z: [n, 4]" in str(info.value)


def test_dynamic_dims_with_shapes(tmp_path):
    graph = import_and_compare(tmp_path, dynamic_model(),
                               input_shapes={"x": (1, 3, 5, 7), "z": (2, 4)})
    assert [v.shape for v in graph.inputs] == [(1, 3, 5, 7), (2, 4)]


def test_shape_with_wrong_rank(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_model(), path)
    with pytest.raises(ShapeError, match=r"input 'x' is declared as \[batch, 3, height, width\]"
                                         r", but the given shape is \[1, 3, 5\]: the model's rank"):
        import_onnx(path, {"x": (1, 3, 5), "z": (2, 4)})


def test_shape_contradicting_fixed_dim(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_model(), path)
    with pytest.raises(ShapeError, match=r"input 'z' is declared as \[n, 4\], but the given "
                                         r"shape is \[2, 5\]: dim 1 is fixed to 4"):
        import_onnx(path, {"x": (1, 3, 5, 7), "z": (2, 5)})


def test_shape_for_unknown_input(tmp_path):
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_model(), path)
    with pytest.raises(ShapeError, match=r"\['image'\], which are not inputs of the model; "
                                         r"its inputs are \['x', 'z'\]"):
        import_onnx(path, {"image": (1, 3, 5, 7), "z": (2, 4)})


def test_shape_inconsistent_with_weights(tmp_path):
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [("x", ["n", "k"], TP.FLOAT)],
                       ["y"], {"w": weights(6, 4)})
    path = tmp_path / "matmul.onnx"
    onnx.save(model, path)
    with pytest.raises(ShapeError, match=r"matmul\.onnx: ONNX shape inference failed"):
        import_onnx(path, {"x": (2, 5)})


def test_shape_inconsistent_with_conv_weight(tmp_path):
    # ONNX shape inference does not check Conv channels; graphcomp's does.
    model = make_model([node("Conv", ["x", "w"], ["y"], name="conv")],
                       [("x", ["n", "c", 8, 8], TP.FLOAT)], ["y"], {"w": weights(2, 3, 3, 3)})
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    with pytest.raises(ShapeError, match=r"conv\.onnx: shape inference failed at node 'conv' "
                                         r"\(op conv2d.*input has 4 channels"):
        import_onnx(path, {"x": (1, 4, 8, 8)})


def test_parse_input_shapes():
    specs = ["x=1,3,640,640", "save/scale=0.tmp=2, 5"]
    assert parse_input_shapes(specs) == {"x": (1, 3, 640, 640), "save/scale=0.tmp": (2, 5)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("spec, message", [
    ("x", "expected NAME=D0,D1"),
    ("=1,2", "expected NAME=D0,D1"),
    ("x=", "expected NAME=D0,D1"),
    ("x=1,a", "dims must be integers"),
    ("x=1,0", "every dim must be positive"),
])
def test_parse_input_shapes_rejects(spec, message):
    with pytest.raises(OptionError, match=message):
        parse_input_shapes([spec])


def test_parse_input_shapes_rejects_repeated_name():
    with pytest.raises(OptionError, match="input 'x' is given a shape twice"):
        parse_input_shapes(["x=1,2", "x=1,3"])


def test_errors_are_graphcomp_errors():
    for error in (ModelLoadError, ShapeError, UnsupportedOpError, OptionError):
        assert issubclass(error, GraphcompError)


# --- real models ---------------------------------------------------------------------------------

# Outputs must match ONNX Runtime to 1e-3 of the output scale (max |reference|).
REAL_MODEL_TOLERANCE = 1e-3


def text_page(shape, seed=0):
    """Make a seeded random 'page' in [-1, 1]: dark glyph-like blocks on text lines over a
    white background, plus noise. On pure noise, normal or uniform, the detector's map stays
    below 0.1 everywhere, which would hide errors."""
    rng = np.random.default_rng(seed)
    image = np.ones(shape, np.float32)
    height, width = shape[2], shape[3]
    for row in range(height // 16, height - 20, 40):
        column = 10
        while column < width - 20:
            glyph_width = int(rng.integers(4, 12))
            if rng.random() > 0.3:
                image[:, :, row:row + 14, column:column + glyph_width] = -1.0
            column += glyph_width + int(rng.integers(2, 6))
    return image + rng.normal(0, 0.05, shape).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [
    ("det", (1, 3, 320, 320)),
    ("det", PPOCR_SHAPES["det"]["x"]),
    ("rec", PPOCR_SHAPES["rec"]["x"]),
    ("cls", PPOCR_SHAPES["cls"]["x"]),
])
def test_ppocr_matches_onnxruntime(name, shape):
    path = ppocr_path(name)
    start = time.perf_counter()
    graph = import_onnx(path, {"x": shape})
    import_seconds = time.perf_counter() - start
    x = text_page(shape) if name == "det" else \
        np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = run_onnxruntime(str(path), {"x": x})
    actual = executor.run(graph, {"x": x})
    assert list(actual) == list(expected)
    for output_name, reference in expected.items():
        scale = float(np.abs(reference).max())
        error = float(np.abs(actual[output_name] - reference).max())
        assert scale > 0.1, f"{name}: output scale {scale} too small to compare"
        assert error <= REAL_MODEL_TOLERANCE * scale, f"{name}: max error {error}"
    assert import_seconds < 60


def test_ppocr_cls_inputs_cover_both_classes():
    # Every second rendered line is upside down, because upright lines alone keep the
    # classifier saturated on one class and make a lossy pass's drift look smaller.
    images = ppocr_inputs("cls", 4)
    labels = ppocr_cls_labels(4)
    assert labels.tolist() == [0, 1, 0, 1]
    session = ort.InferenceSession(str(ppocr_path("cls")), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": images})[0]
    assert probabilities.argmax(axis=1).tolist() == labels.tolist()


def test_ppocr_cls_default_data_has_labels():
    from graphcomp.models_io import load_model

    data = load_model("zoo:ppocr-cls").default_data
    np.testing.assert_array_equal(data.batches[1]["x"], ppocr_inputs("cls", 4)[1:2])
    assert data.labels.tolist() == [0, 1, 0, 1]
