"""Every registered op, lowered to Relax, compiled by TVM for this CPU and run, must match the
reference executor (each op's PyTorch implementation).

Each case is a one-node graph; inputs given with ``feed(array)`` are graph inputs, plain numpy
arrays are constants (float arrays with more than one element become weights of ``main``).
Float outputs must match to a max abs error of 1e-5 (inputs are kept small, so that is
near float32 rounding); integer and boolean outputs must match exactly. A new op fails
``test_every_op_has_case`` until it gets a case here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import ACTIVATIONS, registered_ops
from graphcomp.shapes import infer_node

tvm = pytest.importorskip("tvm")
from graphcomp.backends.tvm import build  # noqa: E402

MAX_ABS_ERROR = 1e-5
RNG = np.random.default_rng(2024)


@dataclass
class Feed:
    """Data for a graph input (a plain numpy array in a case is a constant instead)."""

    data: np.ndarray


@dataclass
class Case:
    op: str
    label: str
    inputs: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: int = 1


def feed(data) -> Feed:
    return Feed(np.asarray(data))


def randn(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def uniform(low: float, high: float, *shape) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def booleans(*shape) -> np.ndarray:
    return RNG.random(shape) > 0.5


def small_ints(*shape) -> np.ndarray:
    # Integer-valued floats, so equality comparisons are true for some elements.
    return RNG.integers(-2, 3, shape).astype(np.float32)


def single_op_graph(case: Case) -> tuple[Graph, dict[str, np.ndarray]]:
    """Build the one-node graph of a case and its feeds."""
    values: list[Value] = []
    feeds: dict[str, np.ndarray] = {}
    for index, item in enumerate(case.inputs):
        if isinstance(item, Feed):
            value = Value(f"in{index}", item.data.shape, str(item.data.dtype))
            feeds[value.name] = item.data
        else:
            value = Constant(f"const{index}", np.asarray(item))
        values.append(value)
    outputs = [Value(f"out{i}", ()) for i in range(case.outputs)]
    node = Node(f"{case.op}_node", case.op, values, outputs, dict(case.attrs))
    for value, (shape, dtype) in zip(outputs, infer_node(node)):
        value.shape, value.dtype = tuple(shape), dtype
    inputs = [v for v in values if not isinstance(v, Constant)]
    return Graph(f"{case.op}_{case.label}", inputs, outputs, [node]), feeds


# --- the cases --------------------------------------------------------------------------------

X4 = (2, 3, 4, 5)


def unary_cases() -> list[Case]:
    cases = [Case(op, "randn", [feed(randn(*X4))]) for op in (
        "relu", "sigmoid", "tanh", "erf", "exp", "neg", "abs", "identity", "silu", "hardswish",
    )]
    cases += [Case(op, "positive", [feed(uniform(0.5, 2.0, *X4))]) for op in (
        "sqrt", "rsqrt", "log", "reciprocal",
    )]
    cases += [
        Case("logical_not", "bool", [feed(booleans(*X4))]),
        Case("gelu", "exact", [feed(randn(*X4))]),
        Case("gelu", "tanh", [feed(randn(*X4))], {"approximate": "tanh"}),
        Case("hardsigmoid", "default", [feed(randn(*X4, scale=4))]),
        Case("hardsigmoid", "alpha_beta", [feed(randn(*X4, scale=4))], {"alpha": 0.2, "beta": 0.4}),
        Case("clip", "min_max", [feed(randn(*X4))], {"min": -0.5, "max": 0.7}),
        Case("clip", "min_only", [feed(randn(*X4))], {"min": 0.1}),
        Case("clip", "max_only", [feed(randn(*X4))], {"max": 0.2}),
        Case("cast", "to_int32", [feed(randn(*X4, scale=3))], {"dtype": "int32"}),
        Case("cast", "to_float16", [feed(randn(*X4))], {"dtype": "float16"}),
        Case("cast", "int64_to_float", [feed(RNG.integers(-9, 9, X4))], {"dtype": "float32"}),
        Case("cast", "to_bool", [feed(small_ints(*X4))], {"dtype": "bool"}),
    ]
    return cases


def binary_cases() -> list[Case]:
    cases = []
    for op in ("add", "sub", "mul", "maximum", "minimum"):
        cases.append(Case(op, "broadcast", [feed(randn(2, 3, 4)), feed(randn(3, 1))]))
        cases.append(Case(op, "constant", [feed(randn(2, 3, 4)), randn(4)]))
    cases += [
        Case("div", "broadcast", [feed(randn(2, 3, 4)), feed(uniform(0.5, 2.0, 3, 1))]),
        Case("div", "scalar", [feed(randn(2, 3, 4)), np.float32(4.0)]),
        Case("pow", "broadcast", [feed(uniform(0.5, 2.0, 2, 3, 4)), feed(uniform(-2, 2, 4))]),
        Case("pow", "squared", [feed(randn(2, 3, 4)), np.float32(2.0)]),
        Case("where", "broadcast",
             [feed(booleans(2, 3, 4)), feed(randn(2, 3, 4)), feed(randn(3, 1))]),
    ]
    for op in ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal"):
        cases.append(Case(op, "broadcast", [feed(small_ints(2, 3, 4)), feed(small_ints(4))]))
    for op in ("logical_and", "logical_or", "logical_xor"):
        cases.append(Case(op, "broadcast", [feed(booleans(2, 3, 4)), feed(booleans(3, 1))]))
    return cases


def conv_cases() -> list[Case]:
    x = feed(randn(1, 4, 9, 8))
    cases = [
        Case("conv2d", "bias_pad", [x, randn(6, 4, 3, 3, scale=0.3), randn(6)],
             {"pads": [1, 1, 1, 1]}),
        Case("conv2d", "groups_dilation", [x, randn(6, 2, 3, 3, scale=0.3)],
             {"groups": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        Case("conv2d", "asymmetric_pads_stride", [x, randn(5, 4, 3, 2, scale=0.3), randn(5)],
             {"pads": [0, 1, 2, 0], "strides": [2, 2]}),
        Case("conv2d", "depthwise", [x, randn(4, 1, 3, 3, scale=0.3), randn(4)],
             {"groups": 4, "pads": [1, 1, 1, 1]}),
    ]
    for activation in ACTIVATIONS:
        cases.append(Case("conv2d", f"fused_{activation}", [x, randn(6, 4, 3, 3, scale=0.3),
                                                           randn(6)],
                          {"pads": [1, 1, 1, 1], "activation": activation}))
    cases += [
        Case("conv_transpose2d", "stride_output_padding_groups",
             [feed(randn(1, 4, 5, 6)), randn(4, 3, 3, 3, scale=0.3), randn(6)],
             {"strides": [2, 2], "output_padding": [1, 1], "groups": 2, "pads": [1, 1, 1, 1]}),
        Case("conv_transpose2d", "asymmetric_pads_dilation",
             [feed(randn(1, 2, 5, 4)), randn(2, 3, 2, 3, scale=0.3)],
             {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 1, 0]}),
        Case("conv_transpose2d", "fused_relu",
             [feed(randn(1, 4, 5, 6)), randn(4, 2, 2, 2, scale=0.3), randn(2)],
             {"strides": [2, 2], "activation": "relu"}),
        # Stride equal to the kernel: lowered as a matmul and a rearrangement.
        Case("conv_transpose2d", "stride_equals_kernel",
             [feed(randn(2, 5, 3, 4)), randn(5, 3, 2, 3, scale=0.3), randn(3)],
             {"strides": [2, 3], "activation": "sigmoid"}),
        Case("conv_transpose2d", "stride_equals_kernel_one_channel",
             [feed(randn(1, 4, 6, 5)), randn(4, 1, 2, 2, scale=0.3)],
             {"strides": [2, 2]}),
    ]
    return cases


def linear_cases() -> list[Case]:
    cases = [
        Case("linear", "bias", [feed(randn(3, 8)), randn(5, 8, scale=0.3), randn(5)]),
        Case("linear", "no_bias_3d", [feed(randn(2, 3, 8)), randn(5, 8, scale=0.3)]),
        Case("matmul", "2d", [feed(randn(3, 4)), feed(randn(4, 6))]),
        Case("matmul", "batch_broadcast", [feed(randn(2, 1, 3, 4)), randn(5, 4, 6)]),
        Case("matmul", "vector", [feed(randn(3, 4)), feed(randn(4))]),
    ]
    for activation in ACTIVATIONS:
        cases.append(Case("linear", f"fused_{activation}",
                          [feed(randn(3, 8)), randn(5, 8, scale=0.3), randn(5)],
                          {"activation": activation}))
    return cases


def norm_cases() -> list[Case]:
    channels = 4
    bn = [randn(channels), randn(channels), randn(channels), uniform(0.5, 2.0, channels)]
    return [
        Case("batch_norm", "nchw", [feed(randn(2, channels, 5, 5)), *bn], {"eps": 1e-3}),
        Case("layer_norm", "last_axis", [feed(randn(2, 3, 8)), randn(8), randn(8)]),
        Case("layer_norm", "axis1_no_affine", [feed(randn(2, 3, 8))], {"axis": 1}),
        Case("softmax", "last_axis", [feed(randn(2, 3, 8, scale=3))]),
        Case("softmax", "axis1", [feed(randn(2, 3, 8, scale=3))], {"axis": 1}),
    ]


def pool_cases() -> list[Case]:
    x = feed(randn(1, 3, 9, 8))
    return [
        Case("max_pool2d", "ceil_pads", [x],
             {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
        Case("max_pool2d", "floor", [x], {"kernel": [2, 2]}),
        Case("max_pool2d", "dilation", [x], {"kernel": [2, 2], "strides": [1, 1],
                                              "dilations": [2, 2]}),
        Case("avg_pool2d", "ceil_exclude_pad", [x],
             {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
        Case("avg_pool2d", "include_pad", [x],
             {"kernel": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
              "count_include_pad": True}),
        Case("global_avg_pool", "nchw", [x]),
        Case("adaptive_avg_pool2d", "uneven", [feed(randn(1, 3, 7, 5))], {"output_size": [3, 2]}),
    ]


def resize_cases() -> list[Case]:
    x = feed(randn(1, 2, 5, 7))
    return [
        Case("resize", "nearest_double", [x], {"size": [10, 14], "mode": "nearest"}),
        Case("resize", "nearest_uneven", [x], {"size": [8, 11], "mode": "nearest"}),
        Case("resize", "linear_half_pixel", [x], {"size": [8, 11], "mode": "linear",
                                                  "coordinate_transformation": "half_pixel"}),
        Case("resize", "linear_align_corners", [x],
             {"size": [9, 4], "mode": "linear", "coordinate_transformation": "align_corners"}),
        Case("resize", "linear_pytorch_half_pixel_down", [x],
             {"size": [3, 4], "mode": "linear",
              "coordinate_transformation": "pytorch_half_pixel"}),
    ]


def tensor_cases() -> list[Case]:
    x = feed(randn(2, 6, 4))
    return [
        Case("concat", "axis1", [x, feed(randn(2, 2, 4)), randn(2, 1, 4)], {"axis": 1}),
        Case("concat", "negative_axis", [x, feed(randn(2, 6, 3))], {"axis": -1}),
        Case("split", "axis1", [x], {"axis": 1, "sizes": [1, 2, 3]}, outputs=3),
        Case("split", "negative_axis", [x], {"axis": -1, "sizes": [3, 1]}, outputs=2),
        Case("reshape", "3d_to_2d", [x], {"shape": [4, 12]}),
        Case("flatten", "axis1", [feed(randn(2, 3, 4, 5))], {"axis": 1}),
        Case("flatten", "axis2", [feed(randn(2, 3, 4, 5))], {"axis": 2}),
        Case("transpose", "perm", [feed(randn(2, 3, 4, 5))], {"perm": [0, 2, 3, 1]}),
        Case("expand", "broadcast", [feed(randn(3, 1))], {"shape": [2, 3, 4]}),
        Case("pad", "constant", [feed(randn(1, 2, 3, 4))],
             {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": 1.5}),
        Case("pad", "reflect", [feed(randn(1, 2, 4, 5))],
             {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "mode": "reflect"}),
        Case("pad", "replicate", [feed(randn(1, 2, 4, 5))],
             {"pads": [0, 0, 2, 1, 0, 0, 1, 3], "mode": "replicate"}),
        Case("slice", "steps", [feed(randn(4, 10, 6))],
             {"starts": [1, 0], "ends": [10, 5], "axes": [1, 2], "steps": [3, 2]}),
        Case("slice", "negative_bounds", [feed(randn(4, 10, 6))],
             {"starts": [-3], "ends": [1000], "axes": [-1]}),
        Case("gather", "negative_indices", [feed(randn(3, 5, 2)),
                                            np.array([[0, -1], [-5, 3]], np.int64)], {"axis": 1}),
        Case("gather", "indices_input", [randn(6, 3), feed(np.array([5, -2, 0], np.int64))]),
        Case("embedding", "ids", [feed(np.array([[1, 0, 9], [4, 4, 2]], np.int64)),
                                  randn(10, 4)]),
    ]


def reduce_cases() -> list[Case]:
    cases = []
    for op in ("reduce_mean", "reduce_sum", "reduce_max"):
        x = feed(randn(2, 3, 4))
        cases += [
            Case(op, "keepdims", [x], {"axes": [1], "keepdims": True}),
            Case(op, "drop_dims", [x], {"axes": [0, -1], "keepdims": False}),
            Case(op, "all_axes", [x], {"keepdims": False}),
        ]
    return cases


def int8s(*shape, low: int = -128, high: int = 127, dtype=np.int8) -> np.ndarray:
    return RNG.integers(low, high + 1, shape).astype(dtype)


def quantized_cases() -> list[Case]:
    """Integer outputs must equal the reference exactly: rounding ties and saturation
    included (the tie case divides by a power of two, so x / scale lands on every .5)."""
    ties = (np.arange(-300, 300, dtype=np.float32) + 0.5) * np.float32(0.0625)
    x = feed(int8s(1, 4, 7, 6))
    conv = {"x_scale": 0.05, "x_zero_point": -7, "y_scale": 0.4, "y_zero_point": 5}
    linear = {"x_scale": 0.03, "x_zero_point": 11, "y_scale": 0.25, "y_zero_point": -20}
    return [
        Case("quantize", "ties_saturate", [feed(ties), np.float32(0.0625), np.int8(-3)]),
        Case("quantize", "per_channel_uint8", [feed(randn(2, 3, 4, 5, scale=3)),
                                              uniform(0.01, 0.05, 3),
                                              np.array([0, 128, 250], np.uint8)]),
        Case("dequantize", "per_tensor", [feed(int8s(2, 3, 4)), np.float32(0.1), np.int8(4)]),
        Case("dequantize", "per_channel_axis0", [feed(int8s(4, 3, 2)), uniform(0.01, 0.1, 4),
                                                np.zeros(4, np.int8)], {"axis": 0}),
        Case("dequantize", "int32", [feed(RNG.integers(-10**6, 10**6, (3, 5)).astype(np.int32)),
                                     np.float32(1e-3), np.int32(0)]),
        Case("qconv2d", "pads_bias_zero_point",
             [x, int8s(6, 4, 3, 3, low=-127), uniform(0.002, 0.02, 6),
              RNG.integers(-3000, 3000, 6).astype(np.int32)], {**conv, "pads": [1, 1, 1, 1]}),
        Case("qconv2d", "stride_asymmetric_pads_relu",
             [x, int8s(5, 4, 3, 2, low=-127), uniform(0.002, 0.02, 5)],
             {**conv, "pads": [0, 1, 2, 0], "strides": [2, 2], "activation": "relu"}),
        Case("qconv2d", "depthwise_dilation",
             [x, int8s(4, 1, 3, 3, low=-127), uniform(0.002, 0.02, 4),
              RNG.integers(-500, 500, 4).astype(np.int32)],
             {**conv, "groups": 4, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        Case("qconv2d", "uint8_input",
             [feed(int8s(1, 4, 6, 6, low=0, high=255, dtype=np.uint8)),
              int8s(3, 4, 1, 1, low=-127), uniform(0.002, 0.02, 3)],
             {"x_scale": 0.02, "x_zero_point": 131, "y_scale": 0.1, "y_zero_point": 128}),
        Case("qlinear", "bias_relu",
             [feed(int8s(3, 40)), int8s(7, 40, low=-127), uniform(0.002, 0.02, 7),
              RNG.integers(-5000, 5000, 7).astype(np.int32)], {**linear, "activation": "relu"}),
        Case("qlinear", "rank3_no_bias",
             [feed(int8s(2, 3, 40)), int8s(7, 40, low=-127), uniform(0.002, 0.02, 7)], linear),
        Case("dynamic_qlinear", "bias",
             [feed(randn(3, 40)), int8s(7, 40, low=-127), uniform(0.002, 0.02, 7), randn(7)]),
        Case("dynamic_qlinear", "rank3_gelu",
             [feed(randn(2, 3, 40) + 0.5), int8s(7, 40, low=-127), uniform(0.002, 0.02, 7)],
             {"activation": "gelu"}),
        Case("dynamic_qlinear", "per_row",
             [feed(randn(2, 3, 40) * uniform(0.1, 5.0, 2, 3, 1)), int8s(7, 40, low=-127),
              uniform(0.002, 0.02, 7), randn(7)], {"per_row": True}),
        Case("qconv_transpose2d", "stride_pads_zero_point",
             [feed(int8s(1, 4, 5, 4, low=0, high=255, dtype=np.uint8)),
              int8s(4, 3, 3, 3, low=-127), uniform(0.002, 0.02, 3),
              RNG.integers(-3000, 3000, 3).astype(np.int32)],
             {"x_scale": 0.03, "x_zero_point": 120, "y_scale": 0.3, "y_zero_point": 100,
              "strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
        Case("qmatmul", "broadcast_zero_points",
             [feed(int8s(2, 3, 4, 9, low=0, high=255, dtype=np.uint8)), feed(int8s(3, 9, 5))],
             {"a_scale": 0.03, "a_zero_point": 130, "b_scale": 0.05, "b_zero_point": -4,
              "y_scale": 0.7, "y_zero_point": 90}),
    ]


CASES = (
    unary_cases() + binary_cases() + conv_cases() + linear_cases() + norm_cases()
    + pool_cases() + resize_cases() + tensor_cases() + reduce_cases()
    + quantized_cases()
)


# --- the tests --------------------------------------------------------------------------------


def test_every_op_has_case():
    covered = {case.op for case in CASES}
    missing = sorted(set(registered_ops()) - covered)
    assert not missing, f"ops without a lowering case in {__file__}: {missing}"


def assert_outputs_match(label: str, expected: np.ndarray, actual: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    if np.issubdtype(expected.dtype, np.floating):
        error = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
        assert error <= MAX_ABS_ERROR, f"{label}: max abs error {error:.3g} > {MAX_ABS_ERROR}"
    else:
        assert np.array_equal(actual, expected), f"{label}: integer/bool outputs differ"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.label}" for c in CASES])
def test_op_lowering_matches_reference(case: Case):
    graph, feeds = single_op_graph(case)
    expected = executor.run(graph, feeds)
    actual = build(graph, "cpu").run(feeds)
    for value in graph.outputs:
        assert_outputs_match(f"{graph.name}/{value.name}", expected[value.name],
                             actual[value.name])


def test_all_cases_in_one_module():
    """All single-op graphs side by side in one graph: many inputs, weights and outputs in
    one ``main``, so a mix-up in their order shows."""
    graphs = [single_op_graph(case) for case in CASES]
    inputs, outputs, nodes, feeds = [], [], [], {}
    for index, (graph, graph_feeds) in enumerate(graphs):
        for value in graph.values():
            value.name = f"g{index}_{value.name}"
        for node in graph.nodes:
            node.name = f"g{index}_{node.name}"
        inputs += graph.inputs
        outputs += graph.outputs
        nodes += graph.nodes
        feeds.update({f"g{index}_{name}": data for name, data in graph_feeds.items()})
    combined = Graph("all_ops", inputs, outputs, nodes)

    expected = executor.run(combined, feeds)
    actual = build(combined, "cpu").run(feeds)
    for value in combined.outputs:
        assert_outputs_match(value.name, expected[value.name], actual[value.name])
