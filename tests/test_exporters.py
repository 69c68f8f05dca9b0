"""The exporters: graph -> ONNX model (checked in ONNX Runtime) and graph -> torch.nn.Module.

Every registered op has at least one one-node case below. Tolerances: ONNX Runtime against the
reference executor 1e-5 (absolute and relative), GraphModule against the reference executor
1e-6 absolute, real PP-OCR models 1e-4 relative to the largest output magnitude.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphcomp import executor
from graphcomp.backends.onnx_export import (
    MAX_OPSET, OnnxExportError, export_onnx, export_onnx_bytes, to_onnx,
)
from graphcomp.backends.torch_export import GraphModule, to_torch
from graphcomp.errors import OptionError, ShapeError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import ACTIVATIONS, registered_ops
from graphcomp.shapes import infer_shapes
from graphcomp.verifier import verify_graph

ONNX_TOLERANCE = 1e-5
TORCH_TOLERANCE = 1e-6
REAL_MODEL_TOLERANCE = 1e-4

RNG = np.random.default_rng(0)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def small_ints(*shape: int) -> np.ndarray:
    """Floats from {-1, 0, 1}, so comparisons see equal entries too."""
    return RNG.integers(-1, 2, shape).astype(np.float32)


def booleans(*shape: int) -> np.ndarray:
    return RNG.integers(0, 2, shape).astype(bool)


@dataclass
class OpCase:
    """A one-node graph: ``op`` applied to graph inputs and constants (names starting '@')."""

    id: str
    op: str
    inputs: list[tuple[str, np.ndarray]]
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: int = 1

    def graph(self) -> Graph:
        values = [
            Constant(name[1:], array) if name.startswith("@")
            else Value(name, array.shape, str(array.dtype))
            for name, array in self.inputs
        ]
        outputs = [Value(f"out{i}", ()) for i in range(self.outputs)]
        node = Node(f"{self.op}_node", self.op, values, outputs, dict(self.attrs))
        graph_inputs = [v for v in values if not isinstance(v, Constant)]
        graph = Graph(self.id, graph_inputs, outputs, [node])
        infer_shapes(graph)
        verify_graph(graph)
        return graph

    def feeds(self) -> dict[str, np.ndarray]:
        return {name: array for name, array in self.inputs if not name.startswith("@")}


def unary_cases() -> list[OpCase]:
    cases = [OpCase(op, op, [("x", normal(2, 3, 4))]) for op in (
        "relu", "sigmoid", "tanh", "erf", "exp", "neg", "abs", "identity", "silu", "hardswish",
    )]
    cases += [OpCase(op, op, [("x", uniform(0.5, 2.0, 2, 3, 4))])
              for op in ("sqrt", "rsqrt", "log", "reciprocal")]
    cases += [
        OpCase("logical_not", "logical_not", [("x", booleans(2, 5))]),
        OpCase("gelu", "gelu", [("x", normal(2, 3, 4))]),
        OpCase("gelu_tanh", "gelu", [("x", normal(2, 3, 4))], {"approximate": "tanh"}),
        OpCase("hardsigmoid", "hardsigmoid", [("x", normal(2, 8) * 4)]),
        OpCase("hardsigmoid_alpha", "hardsigmoid", [("x", normal(2, 8) * 4)],
               {"alpha": 0.2, "beta": 0.4}),
        OpCase("clip", "clip", [("x", normal(2, 8))], {"min": -0.5, "max": 0.7}),
        OpCase("clip_min_only", "clip", [("x", normal(2, 8))], {"min": 0.1, "max": None}),
        OpCase("clip_max_only", "clip", [("x", normal(2, 8))], {"max": 0.1}),
        OpCase("clip_no_bounds", "clip", [("x", normal(2, 8))], {"min": None, "max": None}),
        OpCase("clip_int64", "clip", [("x", np.arange(-5, 5, dtype=np.int64))],
               {"min": -2, "max": 3}),
        OpCase("cast_to_int32", "cast", [("x", normal(2, 8) * 10)], {"dtype": "int32"}),
        OpCase("cast_to_bool", "cast", [("x", small_ints(2, 8))], {"dtype": "bool"}),
        OpCase("cast_int_to_float", "cast", [("x", np.arange(6, dtype=np.int64))],
               {"dtype": "float32"}),
    ]
    return cases


def binary_cases() -> list[OpCase]:
    cases = [OpCase(op, op, [("a", normal(2, 3, 4)), ("@b", normal(3, 1))])
             for op in ("add", "sub", "mul", "maximum", "minimum")]
    cases += [
        OpCase("div", "div", [("a", normal(2, 3, 4)), ("b", uniform(0.5, 2.0, 2, 3, 4))]),
        OpCase("pow", "pow", [("a", uniform(0.5, 2.0, 2, 3)), ("@b", normal(3))]),
        OpCase("where", "where", [("cond", booleans(2, 3)), ("a", normal(2, 3)),
                                  ("@b", normal(3))]),
    ]
    cases += [OpCase(op, op, [("a", small_ints(3, 4)), ("b", small_ints(4))]) for op in (
        "equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
    )]
    cases += [OpCase(op, op, [("a", booleans(3, 4)), ("b", booleans(3, 4))])
              for op in ("logical_and", "logical_or", "logical_xor")]
    # ONNX compares one dtype only, so the exporter casts int32 to int64 first.
    cases.append(OpCase("less_mixed_ints", "less", [("a", np.arange(-3, 3, dtype=np.int64)),
                                                    ("@b", np.array([1], np.int32))]))
    return cases


def conv_cases() -> list[OpCase]:
    x = normal(1, 4, 9, 8)
    cases = [
        OpCase("conv2d", "conv2d", [("x", x), ("@w", normal(6, 4, 3, 3)), ("@b", normal(6))],
               {"strides": [2, 1], "pads": [1, 0, 2, 1]}),
        OpCase("conv2d_grouped", "conv2d", [("x", x), ("@w", normal(4, 2, 3, 3))],
               {"groups": 2, "dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    ]
    cases += [
        OpCase(f"conv2d_{name}", "conv2d", [("x", x), ("@w", normal(3, 4, 1, 1) * 2)],
               {"activation": name})
        for name in ACTIVATIONS
    ]
    cases += [
        OpCase("conv_transpose2d", "conv_transpose2d",
               [("x", normal(1, 4, 5, 6)), ("@w", normal(4, 3, 3, 3)), ("@b", normal(6))],
               {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0], "groups": 2,
                "activation": "hardswish"}),
        OpCase("conv_transpose2d_plain", "conv_transpose2d",
               [("x", normal(1, 4, 5, 6)), ("@w", normal(4, 2, 2, 2))], {"strides": [2, 2]}),
    ]
    return cases


def nn_cases() -> list[OpCase]:
    return [
        OpCase("linear_gemm", "linear", [("x", normal(3, 5)), ("@w", normal(4, 5)),
                                         ("@b", normal(4))]),
        OpCase("linear_gemm_gelu", "linear", [("x", normal(3, 5)), ("@w", normal(4, 5))],
               {"activation": "gelu"}),
        OpCase("linear_rank3", "linear", [("x", normal(2, 3, 5)), ("@w", normal(4, 5)),
                                          ("@b", normal(4))], {"activation": "relu"}),
        OpCase("linear_rank3_no_bias", "linear", [("x", normal(2, 3, 5)), ("@w", normal(4, 5))]),
        OpCase("matmul", "matmul", [("a", normal(2, 3, 5)), ("@b", normal(5, 4))]),
        OpCase("batch_norm", "batch_norm",
               [("x", normal(2, 3, 4, 4)), ("@scale", normal(3)), ("@bias", normal(3)),
                ("@mean", normal(3)), ("@var", uniform(0.5, 2.0, 3))], {"eps": 1e-3}),
        OpCase("layer_norm", "layer_norm",
               [("x", normal(2, 3, 8)), ("@scale", normal(8)), ("@bias", normal(8))]),
        OpCase("layer_norm_no_scale", "layer_norm", [("x", normal(2, 3, 8))],
               {"axis": 1, "eps": 1e-6}),
        OpCase("softmax", "softmax", [("x", normal(2, 5, 3))], {"axis": 1}),
        OpCase("embedding", "embedding",
               [("ids", np.array([[1, 9, 0], [3, 3, 7]], np.int64)), ("@table", normal(10, 4))]),
    ]


def pool_cases() -> list[OpCase]:
    x = normal(1, 3, 9, 10)
    return [
        OpCase("max_pool2d", "max_pool2d", [("x", x)],
               {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
        OpCase("max_pool2d_dilated", "max_pool2d", [("x", x)],
               {"kernel": [2, 3], "strides": [1, 2], "dilations": [2, 2]}),
        OpCase("avg_pool2d", "avg_pool2d", [("x", x)],
               {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        OpCase("avg_pool2d_include_pad", "avg_pool2d", [("x", x)],
               {"kernel": [3, 2], "pads": [1, 1, 1, 1], "count_include_pad": True,
                "ceil_mode": True, "strides": [2, 3]}),
        OpCase("global_avg_pool", "global_avg_pool", [("x", x)]),
        OpCase("adaptive_avg_pool2d", "adaptive_avg_pool2d", [("x", normal(1, 3, 8, 6))],
               {"output_size": [4, 3]}),
        OpCase("adaptive_avg_pool2d_1x1", "adaptive_avg_pool2d", [("x", x)],
               {"output_size": [1, 1]}),
    ]


def resize_cases() -> list[OpCase]:
    x = normal(1, 2, 4, 5)
    return [
        OpCase("resize_nearest_up", "resize", [("x", x)], {"size": [8, 10]}),
        OpCase("resize_nearest_defaults", "resize", [("x", x)], {"size": [7, 8]}),
        OpCase("resize_nearest_uneven", "resize", [("x", x)],
               {"size": [7, 3], "mode": "nearest", "coordinate_transformation": "asymmetric",
                "nearest_mode": "floor"}),
        OpCase("resize_linear_half_pixel", "resize", [("x", x)],
               {"size": [7, 12], "mode": "linear", "coordinate_transformation": "half_pixel"}),
        OpCase("resize_linear_to_one_row", "resize", [("x", x)],
               {"size": [1, 3], "mode": "linear", "coordinate_transformation": "half_pixel"}),
        OpCase("resize_linear_align_corners", "resize", [("x", x)],
               {"size": [6, 9], "mode": "linear", "coordinate_transformation": "align_corners"}),
    ]


def tensor_cases() -> list[OpCase]:
    x = normal(2, 6, 5)
    return [
        OpCase("concat", "concat", [("a", normal(2, 3)), ("@b", normal(2, 1)),
                                    ("c", normal(2, 2))], {"axis": 1}),
        OpCase("split", "split", [("x", x)], {"axis": 1, "sizes": [1, 3, 2]}, outputs=3),
        OpCase("reshape", "reshape", [("x", x)], {"shape": [3, 4, 5]}),
        OpCase("flatten", "flatten", [("x", x)], {"axis": 2}),
        OpCase("flatten_axis_rank", "flatten", [("x", x)], {"axis": 3}),
        OpCase("transpose", "transpose", [("x", x)], {"perm": [2, 0, 1]}),
        OpCase("expand", "expand", [("x", normal(6, 1))], {"shape": [2, 6, 5]}),
        OpCase("pad_constant", "pad", [("x", normal(1, 2, 3, 4))],
               {"pads": [0, 1, 2, 0, 0, 0, 1, 3], "value": 1.5}),
        OpCase("pad_reflect", "pad", [("x", normal(1, 2, 3, 4))],
               {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "mode": "reflect"}),
        OpCase("pad_replicate", "pad", [("x", normal(1, 2, 3, 4))],
               {"pads": [0, 0, 2, 0, 0, 0, 1, 3], "mode": "replicate"}),
        OpCase("slice", "slice", [("x", x)],
               {"starts": [-4, 1], "ends": [100, -1], "axes": [1, -1], "steps": [2, 1]}),
        OpCase("slice_default_axes", "slice", [("x", x)], {"starts": [1], "ends": [2]}),
        OpCase("gather", "gather",
               [("x", x), ("@indices", np.array([[0, -1], [2, 5]], np.int64))], {"axis": 1}),
        OpCase("gather_scalar_index", "gather", [("x", x), ("@i", np.array(3, np.int64))],
               {"axis": -1}),
        OpCase("reduce_mean", "reduce_mean", [("x", x)], {"axes": [1], "keepdims": True}),
        OpCase("reduce_mean_all", "reduce_mean", [("x", x)], {"keepdims": False}),
        OpCase("reduce_sum", "reduce_sum", [("x", x)], {"axes": [0, -1], "keepdims": False}),
        OpCase("reduce_max", "reduce_max", [("x", x)], {"axes": [2]}),
        OpCase("reduce_max_all", "reduce_max", [("x", x)]),
    ]


def int8s(*shape: int, low: int = -128, high: int = 127, dtype=np.int8) -> np.ndarray:
    return RNG.integers(low, high + 1, shape).astype(dtype)


def quantized_cases() -> list[OpCase]:
    """Integer outputs must equal the reference exactly (the tolerance is below one step)."""
    ties = (np.arange(-300, 300, dtype=np.float32) + 0.5) * np.float32(0.0625)
    conv = {"x_scale": 0.05, "x_zero_point": -7, "y_scale": 0.4, "y_zero_point": 5,
            "pads": [1, 0, 2, 1], "strides": [2, 1]}
    linear = {"x_scale": 0.03, "x_zero_point": 11, "y_scale": 0.25, "y_zero_point": -20}
    weight = ("@w", int8s(6, 4, 3, 3, low=-127))
    w_scale = ("@w_scale", uniform(0.002, 0.02, 6))
    bias = ("@b", RNG.integers(-3000, 3000, 6).astype(np.int32))
    return [
        OpCase("quantize_ties", "quantize", [("x", ties), ("@s", np.float32(0.0625)),
                                             ("@z", np.int8(-3))]),
        OpCase("quantize_per_channel_uint8", "quantize",
               [("x", normal(2, 3, 4) * 3), ("@s", uniform(0.01, 0.05, 3)),
                ("@z", np.array([0, 128, 250], np.uint8))], {"axis": 1}),
        OpCase("dequantize_per_channel", "dequantize",
               [("q", int8s(4, 3, 2)), ("@s", uniform(0.01, 0.1, 4)), ("@z", int8s(4))],
               {"axis": 0}),
        OpCase("dequantize_int32", "dequantize",
               [("q", RNG.integers(-10**6, 10**6, (3, 5)).astype(np.int32)),
                ("@s", np.float32(1e-3)), ("@z", np.int32(0))]),
        OpCase("qconv2d", "qconv2d", [("x", int8s(1, 4, 7, 6)), weight, w_scale, bias], conv),
        OpCase("qconv2d_relu", "qconv2d", [("x", int8s(1, 4, 7, 6)), weight, w_scale],
               {**conv, "activation": "relu"}),
        OpCase("qconv2d_relu_low_zero_point", "qconv2d",
               [("x", int8s(1, 4, 7, 6)), weight, w_scale, bias],
               {**conv, "activation": "relu", "y_zero_point": -128}),
        OpCase("qconv2d_depthwise_uint8", "qconv2d",
               [("x", int8s(1, 6, 5, 5, low=0, high=255, dtype=np.uint8)),
                ("@w", int8s(6, 1, 3, 3, low=-127)), w_scale],
               {"x_scale": 0.02, "x_zero_point": 131, "y_scale": 0.1, "y_zero_point": 128,
                "groups": 6, "pads": [1, 1, 1, 1]}),
        OpCase("qlinear_relu", "qlinear",
               [("x", int8s(3, 40)), ("@w", int8s(7, 40, low=-127)),
                ("@w_scale", uniform(0.002, 0.02, 7)),
                ("@b", RNG.integers(-5000, 5000, 7).astype(np.int32))],
               {**linear, "activation": "relu"}),
        OpCase("qlinear_rank3", "qlinear",
               [("x", int8s(2, 3, 40)), ("@w", int8s(7, 40, low=-127)),
                ("@w_scale", uniform(0.002, 0.02, 7))], linear),
        OpCase("dynamic_qlinear", "dynamic_qlinear",
               [("x", normal(3, 40)), ("@w", int8s(7, 40, low=-127)),
                ("@w_scale", uniform(0.002, 0.02, 7)), ("@b", normal(7))]),
        OpCase("dynamic_qlinear_rank3_gelu", "dynamic_qlinear",
               [("x", normal(2, 3, 40) + 0.5), ("@w", int8s(7, 40, low=-127)),
                ("@w_scale", uniform(0.002, 0.02, 7))], {"activation": "gelu"}),
        OpCase("dynamic_qlinear_per_row", "dynamic_qlinear",
               [("x", normal(2, 3, 40) * uniform(0.1, 5.0, 2, 3, 1)),
                ("@w", int8s(7, 40, low=-127)), ("@w_scale", uniform(0.002, 0.02, 7)),
                ("@b", normal(7))], {"per_row": True, "activation": "relu"}),
        # The QDQ export sums dequantized products in float. Power-of-two scales make those
        # sums exact, so the export must equal the reference's integers here.
        OpCase("qconv_transpose2d_relu_uint8", "qconv_transpose2d",
               [("x", int8s(1, 4, 5, 4, low=0, high=255, dtype=np.uint8)),
                ("@w", int8s(4, 3, 3, 3, low=-127)),
                ("@w_scale", np.float32(2.0) ** -RNG.integers(6, 9, 3).astype(np.float32)),
                ("@b", RNG.integers(-3000, 3000, 3).astype(np.int32))],
               {"x_scale": 0.0625, "x_zero_point": 120, "y_scale": 0.5, "y_zero_point": 100,
                "strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0],
                "activation": "relu"}),
        OpCase("qmatmul_broadcast", "qmatmul",
               [("a", int8s(2, 3, 4, 9, low=0, high=255, dtype=np.uint8)), ("b", int8s(3, 9, 5))],
               {"a_scale": 0.03, "a_zero_point": 130, "b_scale": 0.05, "b_zero_point": -4,
                "y_scale": 0.7, "y_zero_point": 90}),
    ]


CASES = unary_cases() + binary_cases() + conv_cases() + nn_cases() + pool_cases() + \
    resize_cases() + tensor_cases() + quantized_cases()


def run_onnx(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_outputs_match(actual: list[np.ndarray], expected: dict[str, np.ndarray],
                         graph: Graph, atol: float, rtol: float) -> None:
    assert len(actual) == len(graph.outputs)
    for value, result in zip(graph.outputs, actual):
        reference = expected[value.name]
        assert result.shape == reference.shape, value.name
        assert result.dtype == reference.dtype, value.name
        np.testing.assert_allclose(result, reference, atol=atol, rtol=rtol, err_msg=value.name)


# --- registry coverage and per-op equivalence ------------------------------------------------


def test_every_registered_op_has_a_case():
    covered = {case.op for case in CASES}
    missing = sorted(set(registered_ops()) - covered)
    assert not missing, f"add an OpCase to tests/test_exporters.py for: {missing}"


def test_case_ids_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("opset", [17, MAX_OPSET])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_onnx_export_matches_executor(case: OpCase, opset: int):
    graph = case.graph()
    expected = executor.run(graph, case.feeds())
    model = to_onnx(graph, opset)
    actual = run_onnx(model, case.feeds())
    assert_outputs_match(actual, expected, graph, ONNX_TOLERANCE, ONNX_TOLERANCE)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_graph_module_matches_executor(case: OpCase):
    graph = case.graph()
    expected = executor.run(graph, case.feeds())
    module = to_torch(graph)
    with torch.no_grad():
        result = module(*(torch.from_numpy(a) for a in case.feeds().values()))
    results = result if isinstance(result, tuple) else (result,)
    actual = [tensor.numpy() for tensor in results]
    assert_outputs_match(actual, expected, graph, TORCH_TOLERANCE, 0.0)


def test_slice_negative_step_matches_numpy():
    # The reference executor rejects negative steps, so NumPy slicing is the reference here.
    x = normal(5, 6)
    case = OpCase("slice_negative", "slice", [("x", x)],
                  {"starts": [-1, 4], "ends": [-100, 0], "axes": [0, 1], "steps": [-2, -1]})
    graph = case.graph()
    actual = run_onnx(to_onnx(graph), {"x": x})[0]
    np.testing.assert_array_equal(actual, x[-1:-100:-2, 4:0:-1])


def test_slice_negative_step_empty_matches_numpy():
    x = normal(5, 6)
    case = OpCase("slice_empty", "slice", [("x", x)],
                  {"starts": [-10], "ends": [0], "axes": [1], "steps": [-1]})
    actual = run_onnx(to_onnx(case.graph()), {"x": x})[0]
    assert actual.shape == x[:, -10:0:-1].shape


# --- model-level behaviour -------------------------------------------------------------------


def small_cnn() -> Graph:
    """x[1,3,8,8] -> conv(3->4, 3x3, pad 1) -> batch_norm -> relu -> global_avg_pool ->
    flatten -> linear(4->2) -> y[1,2], with dotted constant names as PyTorch modules give."""
    x = Value("x", (1, 3, 8, 8))
    conv = Node("conv", "conv2d", [x, Constant("conv.weight", normal(4, 3, 3, 3)),
                                   Constant("conv.bias", normal(4))],
                [Value("c", ())], {"pads": [1, 1, 1, 1]})
    bn = Node("bn", "batch_norm",
              [conv.output, Constant("bn.weight", uniform(0.5, 2.0, 4)),
               Constant("bn.bias", normal(4)), Constant("bn.running_mean", normal(4)),
               Constant("bn.running_var", uniform(0.5, 2.0, 4))],
              [Value("b", ())])
    relu = Node("relu", "relu", [bn.output], [Value("r", ())])
    pool = Node("pool", "global_avg_pool", [relu.output], [Value("p", ())])
    flat = Node("flat", "flatten", [pool.output], [Value("f", ())])
    fc = Node("fc", "linear", [flat.output, Constant("fc.weight", normal(2, 4)),
                               Constant("fc.bias", normal(2))], [Value("y", ())])
    graph = Graph("small_cnn", [x], [fc.output], [conv, bn, relu, pool, flat, fc])
    infer_shapes(graph)
    verify_graph(graph)
    return graph


def test_onnx_keeps_names_shapes_dtypes():
    graph = small_cnn()
    model = to_onnx(graph)
    onnx_graph = model.graph
    assert [v.name for v in onnx_graph.input] == ["x"]
    assert [v.name for v in onnx_graph.output] == ["y"]
    shape = [d.dim_value for d in onnx_graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 8, 8]
    assert onnx_graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_shape = [d.dim_value for d in onnx_graph.output[0].type.tensor_type.shape.dim]
    assert out_shape == [1, 2]
    initializers = {t.name for t in onnx_graph.initializer}
    assert {c.name for c in graph.constants()} <= initializers
    produced = {name for n in onnx_graph.node for name in n.output}
    assert {"c", "b", "r", "p", "f", "y"} <= produced
    assert [n.name for n in onnx_graph.node] == ["conv", "bn", "relu", "pool", "flat", "fc"]
    assert [n.op_type for n in onnx_graph.node][-1] == "Gemm"


def test_onnx_initializer_data_equals_constants():
    graph = small_cnn()
    model = to_onnx(graph)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for const in graph.constants():
        np.testing.assert_array_equal(arrays[const.name], const.data)


def test_export_onnx_writes_loadable_file(tmp_path):
    graph = small_cnn()
    path = tmp_path / "out" / "small_cnn.onnx"
    export_onnx(graph, path)
    assert path.read_bytes() == export_onnx_bytes(graph)
    assert sorted(p.name for p in path.parent.iterdir()) == ["small_cnn.onnx"]
    x = normal(1, 3, 8, 8)
    actual = run_onnx(path.read_bytes(), {"x": x})
    expected = executor.run(graph, {"x": x})
    assert_outputs_match(actual, expected, graph, ONNX_TOLERANCE, ONNX_TOLERANCE)


def test_onnx_export_rejects_unknown_ops():
    graph = small_cnn()
    graph.node("relu").op = "frobnicate"
    graph.node("pool").op = "frobnicate"
    with pytest.raises(OnnxExportError, match=r"op 'frobnicate' at node\(s\) relu, pool"):
        to_onnx(graph)


def test_onnx_renames_constant_that_clashes_with_value():
    case = OpCase("clash", "add", [("x", normal(3)), ("@out0", normal(3))])
    graph = case.graph()
    model = to_onnx(graph)
    assert [t.name for t in model.graph.initializer] == ["out0_1"]
    assert [v.name for v in model.graph.output] == ["out0"]
    actual = run_onnx(model, case.feeds())
    assert_outputs_match(actual, executor.run(graph, case.feeds()), graph, ONNX_TOLERANCE,
                         ONNX_TOLERANCE)


def test_adaptive_pool_uneven_raises():
    case = OpCase("uneven", "adaptive_avg_pool2d", [("x", normal(1, 2, 7, 6))],
                  {"output_size": [2, 3]})
    with pytest.raises(NotImplementedError, match="adaptive_avg_pool2d node .* not a multiple"):
        to_onnx(case.graph())


def test_pad_circular_raises():
    case = OpCase("circular", "pad", [("x", normal(1, 2, 3, 4))],
                  {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "circular"})
    with pytest.raises(NotImplementedError, match="pad node 'pad_node': mode 'circular'"):
        to_onnx(case.graph())


@pytest.mark.parametrize("opset", [13, MAX_OPSET + 1])
def test_onnx_export_rejects_opset(opset: int):
    with pytest.raises(OptionError, match=f"supports opsets 17 to {MAX_OPSET}, got {opset}"):
        to_onnx(small_cnn(), opset)


def test_reduce_axes_follow_opset():
    case = OpCase("reduce", "reduce_mean", [("x", normal(2, 3))], {"axes": [1]})
    node_17 = to_onnx(case.graph(), 17).graph.node[0]
    node_18 = to_onnx(case.graph(), 18).graph.node[0]
    assert [a.name for a in node_17.attribute] == ["axes", "keepdims"]
    assert len(node_17.input) == 1
    assert len(node_18.input) == 2


# --- GraphModule ------------------------------------------------------------------------------


def test_graph_module_parameters_and_buffers():
    module = GraphModule(small_cnn())
    parameters = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    assert sorted(parameters) == ["bn_bias", "bn_weight", "conv_bias", "conv_weight",
                                  "fc_bias", "fc_weight"]
    assert sorted(buffers) == ["bn_running_mean", "bn_running_var"]
    assert module.constant_names["conv_weight"] == "conv.weight"
    assert module.constant_names["bn_running_var"] == "bn.running_var"
    assert all(p.requires_grad for p in parameters.values())


def test_graph_module_frozen():
    module = to_torch(small_cnn(), trainable=False)
    assert not any(p.requires_grad for p in module.parameters())


def test_graph_module_sanitizes_clashing_names():
    case = OpCase("clash", "add", [("x", normal(2)), ("@forward", normal(2))])
    graph = case.graph()
    # A second constant whose sanitized name equals the first constant's name.
    node = Node("add2", "add", [graph.outputs[0], Constant("for.ward", normal(2))],
                [Value("y", (2,))])
    node2 = Node("add3", "add", [node.output, Constant("for_ward", normal(2))],
                 [Value("z", (2,))])
    graph.nodes += [node, node2]
    graph.outputs = [node2.output]
    module = to_torch(graph)
    assert sorted(module.constant_names.values()) == ["for.ward", "for_ward", "forward"]
    assert "forward" not in module.constant_names
    x = normal(2)
    expected = executor.run(graph, {"x": x})["z"]
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), expected,
                               atol=TORCH_TOLERANCE, rtol=0)


def test_graph_module_gradients_reach_parameters():
    module = to_torch(small_cnn())
    x = torch.from_numpy(normal(1, 3, 8, 8))
    loss = module(x).square().sum()
    loss.backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
    assert module.conv_weight.grad.abs().sum() > 0


def test_graph_module_to_graph_after_step():
    graph = small_cnn()
    module = to_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = normal(1, 3, 8, 8)
    module(torch.from_numpy(x)).square().sum().backward()
    optimizer.step()

    tuned = module.to_graph()
    verify_graph(tuned)
    before = {c.name: c.data for c in graph.constants()}
    after = {c.name: c.data for c in tuned.constants()}
    assert sorted(after) == sorted(before)
    changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
    assert changed == sorted(module.constant_names[n] for n, _ in module.named_parameters())
    for name in after:
        assert after[name].dtype == before[name].dtype, name
    with torch.no_grad():
        trained_output = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(executor.run(tuned, {"x": x})["y"], trained_output,
                               atol=TORCH_TOLERANCE, rtol=0)


def test_graph_module_keeps_its_own_graph():
    graph = small_cnn()
    module = to_torch(graph)
    graph.node("relu").op = "sigmoid"
    assert module.graph.node("relu").op == "relu"


def test_graph_module_deepcopy_is_independent():
    # Distillation keeps a frozen deep copy as the teacher while the student trains.
    graph = small_cnn()
    student = to_torch(graph)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student.conv_weight.add_(1.0)
        x = torch.from_numpy(normal(1, 3, 8, 8))
        assert not torch.equal(teacher(x), student(x))
    teacher_weights = {c.name: c.data for c in teacher.to_graph().constants()}
    student_weights = {c.name: c.data for c in student.to_graph().constants()}
    original = graph.constants()[0]
    assert original.name == "conv.weight"
    np.testing.assert_array_equal(teacher_weights["conv.weight"], original.data)
    np.testing.assert_array_equal(student_weights["conv.weight"], original.data + 1.0)


def test_graph_module_rejects_wrong_inputs():
    module = to_torch(small_cnn())
    with pytest.raises(ShapeError, match="takes 1 inputs"):
        module()
    with pytest.raises(ShapeError, match=r"input 'x' has shape \(1, 3, 4, 4\)"):
        module(torch.zeros(1, 3, 4, 4))


# --- real models ------------------------------------------------------------------------------


def test_onnx_reimport_matches_executor(tmp_path):
    frontend = pytest.importorskip("graphcomp.frontends.onnx_frontend")
    graph = small_cnn()
    path = tmp_path / "small_cnn.onnx"
    export_onnx(graph, path)
    reimported = frontend.import_onnx(path, {"x": (1, 3, 8, 8)})
    x = normal(1, 3, 8, 8)
    np.testing.assert_allclose(executor.run(reimported, {"x": x})["y"],
                               executor.run(graph, {"x": x})["y"], atol=TORCH_TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cls", "rec", "det"])
def test_ppocr_round_trip_matches_onnxruntime(name: str, tmp_path):
    frontend = pytest.importorskip("graphcomp.frontends.onnx_frontend")
    from graphcomp.zoo import PPOCR_SHAPES, ppocr_path

    path = ppocr_path(name)
    shapes = PPOCR_SHAPES[name]
    graph = frontend.import_onnx(path, shapes)
    exported = tmp_path / f"{name}.onnx"
    export_onnx(graph, exported)

    rng = np.random.default_rng(1)
    feeds = {key: rng.uniform(-1, 1, shape).astype(np.float32) for key, shape in shapes.items()}
    original = run_onnx(path.read_bytes(), feeds)
    actual = run_onnx(exported.read_bytes(), feeds)
    assert len(actual) == len(original)
    for result, reference in zip(actual, original):
        assert result.shape == reference.shape
        scale = float(np.abs(reference).max())
        assert float(np.abs(result - reference).max()) <= REAL_MODEL_TOLERANCE * scale
