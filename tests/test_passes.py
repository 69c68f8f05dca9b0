"""Tests of the built-in passes on tiny hand-built graphs.

Each test builds a graph (drawn in a comment) and checks that it differs from the expected
result. Then it runs one pass and checks the ops in order. Last, it compares the outputs with
those of the graph before the pass in the reference executor, on seeded inputs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.pipeline import PassContext, available_passes
from graphcomp.serialize import format_graph
from graphcomp.verifier import verify_graph

from graph_helpers import Builder

TOLERANCE = 1e-5


def ops(graph: Graph) -> list[str]:
    return [node.op for node in graph.nodes]


def feeds_for(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.shape).astype(v.dtype) for v in graph.inputs}


def run_pass(name: str, graph: Graph, **options):
    """Run pass ``name`` on a copy of ``graph``; return the copy and the PassResult."""
    result_graph = graph.copy()
    result = available_passes()[name](**options).run(result_graph, PassContext())
    verify_graph(result_graph)
    return result_graph, result


def assert_same_outputs(before: Graph, after: Graph, seed: int = 0) -> None:
    feeds = feeds_for(before, seed)
    expected = executor.run(before, feeds)
    actual = executor.run(after, feeds)
    assert list(actual) == list(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=TOLERANCE, atol=TOLERANCE)


def docstring_example(pass_name: str) -> tuple[list[str], list[str]]:
    """The node lines of the before and after blocks in a pass's docstring example."""
    doc = available_passes()[pass_name].__doc__
    blocks = re.search(r"before:\n(.*?)\n\s*after:\n(.*?)(?:\n\s*\n|\s*$)", doc, re.S)
    before, after = blocks.groups()
    return [line.strip() for line in before.splitlines()], [
        line.strip() for line in after.splitlines()
    ]


def node_lines(graph: Graph) -> list[str]:
    return [line.strip() for line in format_graph(graph).splitlines()[1:]]


# --- docstring examples -------------------------------------------------------------------------


def example_dce() -> Graph:
    # x -> relu -> y (output);  x -> sigmoid -> tanh (never read)
    b = Builder()
    x = b.input("x", (2, 3))
    y = b.add("relu", [x], "a", "y")
    t = b.add("sigmoid", [x], "b", "t")
    b.add("tanh", [t], "c", "u")
    return b.graph(y)


def example_remove_identity() -> Graph:
    # x -> identity -> mul(., 1) -> relu -> y
    b = Builder()
    x = b.input("x", (2, 3))
    t = b.add("identity", [x], "a", "t")
    u = b.add("mul", [t, b.const("one", np.float32(1.0))], "b", "u")
    return b.graph(b.add("relu", [u], "c", "y"))


def example_fold_constants() -> Graph:
    # c = 0.5 (float32 scalar);  y = x + c * c
    b = Builder()
    x = b.input("x", (2,))
    c = b.const("c", np.float32(0.5))
    c2 = b.add("mul", [c, c], "a", "c2")
    return b.graph(b.add("add", [x, c2], "b", "y"))


def example_fold_bn() -> Graph:
    # x[1,3,4,4] -> conv2d (1x1, no bias) -> batch_norm -> y
    b = Builder()
    x = b.input("x", (1, 3, 4, 4))
    c = b.add("conv2d", [x, b.random("w", (2, 3, 1, 1))], "conv", "c")
    params = _bn_params(b, 2)
    return b.graph(b.add("batch_norm", [c, *params], "bn", "y", eps=1e-5))


def example_fuse() -> Graph:
    # x -> conv2d -> add(per-channel constant) -> relu -> y
    b = Builder()
    x = b.input("x", (1, 3, 4, 4))
    c = b.add("conv2d", [x, b.random("w", (2, 3, 1, 1))], "conv", "c")
    biased = b.add("add", [c, b.random("shift", (1, 2, 1, 1))], "add", "b")
    return b.graph(b.add("relu", [biased], "act", "y"))


EXAMPLES = {
    "dce": example_dce,
    "remove-identity": example_remove_identity,
    "fold-constants": example_fold_constants,
    "fold-bn": example_fold_bn,
    "fuse": example_fuse,
}


@pytest.mark.parametrize("pass_name", sorted(EXAMPLES))
def test_docstring_example_matches_pass(pass_name):
    before_lines, after_lines = docstring_example(pass_name)
    graph = EXAMPLES[pass_name]()
    assert node_lines(graph) == before_lines
    assert before_lines != after_lines

    result_graph, result = run_pass(pass_name, graph)

    assert node_lines(result_graph) == after_lines
    assert result.changed
    assert_same_outputs(graph, result_graph)


def test_every_builtin_pass_has_an_example():
    builtin = {"dce", "remove-identity", "fold-constants", "fold-bn", "fuse"}
    assert builtin <= set(available_passes())
    assert set(EXAMPLES) == builtin


# --- dce ----------------------------------------------------------------------------------------


def test_dce_keeps_node_with_one_live_output():
    # x -> split -> (p, q);  p -> relu -> y;  q is unread but split must stay
    b = Builder()
    x = b.input("x", (4, 3))
    p, q = Value("p", (2, 3)), Value("q", (2, 3))
    b.nodes.append(Node("split", "split", [x], [p, q], {"axis": 0, "sizes": [2, 2]}))
    y = b.add("relu", [p], "relu", "y")
    b.add("neg", [q], "dead", "z")
    graph = b.graph(y)

    result_graph, result = run_pass("dce", graph)

    assert ops(result_graph) == ["split", "relu"]
    assert result.details["removed"] == 1


def test_dce_without_dead_nodes_reports_no_change():
    graph = example_remove_identity()
    result_graph, result = run_pass("dce", graph)
    assert ops(result_graph) == ops(graph)
    assert not result.changed


# --- remove-identity ----------------------------------------------------------------------------


def _one_op_graph(op: str, x_shape, make_inputs, **attrs) -> Graph:
    # x -> op -> relu -> y
    b = Builder()
    x = b.input("x", x_shape)
    middle = b.add(op, make_inputs(b, x), "candidate", "t", **attrs)
    return b.graph(b.add("relu", [middle], "relu", "y"))


ZERO = np.float32(0.0)
ONE = np.float32(1.0)
IDENTITY_CASES = {
    "identity": ("identity", (2, 3), lambda b, x: [x], {}),
    "cast-same-dtype": ("cast", (2, 3), lambda b, x: [x], {"dtype": "float32"}),
    "reshape-same-shape": ("reshape", (2, 3), lambda b, x: [x], {"shape": [2, 3]}),
    "flatten-2d": ("flatten", (2, 3), lambda b, x: [x], {"axis": 1}),
    "expand-same-shape": ("expand", (2, 3), lambda b, x: [x], {"shape": [1, 3]}),
    "transpose-identity": ("transpose", (2, 3, 4), lambda b, x: [x], {"perm": [0, 1, 2]}),
    "slice-everything": ("slice", (2, 3), lambda b, x: [x],
                         {"starts": [0], "ends": [2**62], "axes": [1]}),
    "pad-zero": ("pad", (2, 3), lambda b, x: [x], {"pads": [0, 0, 0, 0]}),
    "concat-one": ("concat", (2, 3), lambda b, x: [x], {"axis": 1}),
    "clip-unbounded": ("clip", (2, 3), lambda b, x: [x], {}),
    "add-zero": ("add", (2, 3), lambda b, x: [x, b.const("zero", ZERO)], {}),
    "zero-add": ("add", (2, 3), lambda b, x: [b.const("zero", np.zeros(3, np.float32)), x], {}),
    "sub-zero": ("sub", (2, 3), lambda b, x: [x, b.const("zero", ZERO)], {}),
    "mul-one": ("mul", (2, 3), lambda b, x: [x, b.const("one", ONE)], {}),
    "one-mul": ("mul", (2, 3), lambda b, x: [b.const("one", ONE), x], {}),
    "div-one": ("div", (2, 3), lambda b, x: [x, b.const("one", np.ones((1, 3), np.float32))], {}),
}


@pytest.mark.parametrize("case", sorted(IDENTITY_CASES))
def test_remove_identity_removes(case):
    op, shape, make_inputs, attrs = IDENTITY_CASES[case]
    graph = _one_op_graph(op, shape, make_inputs, **attrs)
    assert ops(graph) == [op, "relu"]

    result_graph, result = run_pass("remove-identity", graph)

    assert ops(result_graph) == ["relu"]
    assert result_graph.nodes[0].inputs[0] is result_graph.inputs[0]
    assert result.details["removed"] == 1
    assert_same_outputs(graph, result_graph)


KEPT_CASES = {
    "cast-other-dtype": ("cast", (2, 3), lambda b, x: [x], {"dtype": "float16"}),
    "transpose-swap": ("transpose", (2, 3), lambda b, x: [x], {"perm": [1, 0]}),
    "slice-part": ("slice", (2, 4), lambda b, x: [x], {"starts": [0], "ends": [4], "axes": [1],
                                                       "steps": [2]}),
    "clip-bounded": ("clip", (2, 3), lambda b, x: [x], {"min": 0.0}),
    # The zero broadcasts x from [3] to [2,3], so the add is not an identity.
    "add-zero-broadcasts": ("add", (3,), lambda b, x: [x, b.const("zero", np.zeros((2, 3),
                                                                              np.float32))], {}),
    "zero-sub": ("sub", (2, 3), lambda b, x: [b.const("zero", ZERO), x], {}),
    "mul-two": ("mul", (2, 3), lambda b, x: [x, b.const("two", np.float32(2.0))], {}),
    "div-by-x": ("div", (2, 3), lambda b, x: [b.const("one", ONE), x], {}),
}


@pytest.mark.parametrize("case", sorted(KEPT_CASES))
def test_remove_identity_keeps(case):
    op, shape, make_inputs, attrs = KEPT_CASES[case]
    graph = _one_op_graph(op, shape, make_inputs, **attrs)
    result_graph, result = run_pass("remove-identity", graph)
    assert ops(result_graph) == [op, "relu"]
    assert not result.changed


def test_remove_identity_keeps_graph_output_name():
    # x -> relu -> t -> identity -> y (graph output): relu now writes y
    b = Builder()
    x = b.input("x", (2, 3))
    t = b.add("relu", [x], "relu", "t")
    graph = b.graph(b.add("identity", [t], "id", "y"))

    result_graph, _ = run_pass("remove-identity", graph)

    assert ops(result_graph) == ["relu"]
    assert [v.name for v in result_graph.outputs] == ["y"]
    assert result_graph.nodes[0].outputs[0] is result_graph.outputs[0]
    assert_same_outputs(graph, result_graph)


def test_remove_identity_keeps_identity_between_input_and_output():
    # x (graph input) -> identity -> y (graph output): y cannot take x's name
    b = Builder()
    x = b.input("x", (2, 3))
    graph = b.graph(b.add("identity", [x], "id", "y"))
    result_graph, result = run_pass("remove-identity", graph)
    assert ops(result_graph) == ["identity"]
    assert not result.changed


# --- fold-constants -----------------------------------------------------------------------------


def test_fold_constants_keeps_float32():
    # Constant 0.5 times itself must fold to a float32 0.25, not a float64.
    graph = example_fold_constants()
    result_graph, _ = run_pass("fold-constants", graph)
    folded = result_graph.nodes[0].inputs[1]
    assert isinstance(folded, Constant)
    assert folded.data.dtype == np.float32
    assert folded.data == np.float32(0.25)


def test_fold_constants_folds_chain_and_keeps_inferred_dtype():
    # w[4,3] -> transpose -> reshape[3,4];  ids(int64) -> cast(float32);  y = (x @ w') + ids'
    b = Builder()
    x = b.input("x", (2, 3))
    w = b.random("w", (4, 3))
    wt = b.add("transpose", [w], "transpose", "wt", perm=[1, 0])
    w2 = b.add("reshape", [wt], "reshape", "w2", shape=[3, 4])
    ids = b.add("cast", [b.const("ids", np.arange(4, dtype=np.int64))], "cast", "idsf",
                dtype="float32")
    mm = b.add("matmul", [x, w2], "matmul", "mm")
    graph = b.graph(b.add("add", [mm, ids], "add", "y"))
    assert ops(graph) == ["transpose", "reshape", "cast", "matmul", "add"]

    result_graph, result = run_pass("fold-constants", graph)

    assert ops(result_graph) == ["matmul", "add"]
    assert result.details["folded"] == 3
    assert result_graph.nodes[1].inputs[1].data.dtype == np.float32
    assert_same_outputs(graph, result_graph)


def test_fold_constants_keeps_graph_output_and_large_results():
    # c -> neg -> y (graph output);  e = expand(c to [64,64]) -> add(x, e) -> z
    b = Builder()
    x = b.input("x", (64, 64))
    c = b.const("c", np.float32(2.0))
    y = b.add("neg", [c], "neg", "y")
    e = b.add("expand", [c], "expand", "e", shape=[64, 64])
    graph = b.graph(y, b.add("add", [x, e], "add", "z"))

    result_graph, result = run_pass("fold-constants", graph, max_elements=1000)

    assert ops(result_graph) == ["neg", "expand", "add"]
    assert result.details["too_large"] == 1


# --- fold-bn ------------------------------------------------------------------------------------


def _bn_params(b: Builder, channels: int, prefix: str = "") -> list[Constant]:
    return [
        b.random(f"{prefix}scale", (channels,), 0.5, 2.0),
        b.random(f"{prefix}beta", (channels,), -1.0, 1.0),
        b.random(f"{prefix}mean", (channels,), -1.0, 1.0),
        b.random(f"{prefix}var", (channels,), 0.5, 2.0),
    ]


CONV_CASES = {
    # name: (in channels, out channels, groups, bias, attrs)
    "plain": (3, 4, 1, False, {}),
    "bias-stride-pads": (3, 4, 1, True, {"strides": [2, 2], "pads": [1, 0, 1, 2]}),
    "grouped": (4, 6, 2, True, {"pads": [1, 1, 1, 1]}),
    "depthwise": (4, 4, 4, False, {"pads": [1, 1, 1, 1]}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_fold_bn_into_conv2d(case):
    # x -> conv2d(W[, b]) -> batch_norm -> y
    in_channels, out_channels, groups, with_bias, attrs = CONV_CASES[case]
    b = Builder()
    x = b.input("x", (2, in_channels, 6, 6))
    weights = [b.random("w", (out_channels, in_channels // groups, 3, 3))]
    if with_bias:
        weights.append(b.random("b", (out_channels,)))
    c = b.add("conv2d", [x, *weights], "conv", "c", groups=groups, **attrs)
    graph = b.graph(b.add("batch_norm", [c, *_bn_params(b, out_channels)], "bn", "y", eps=1e-3))
    assert ops(graph) == ["conv2d", "batch_norm"]

    result_graph, result = run_pass("fold-bn", graph)

    assert ops(result_graph) == ["conv2d"]
    conv = result_graph.nodes[0]
    assert len(conv.inputs) == 3
    assert conv.attrs["groups"] == groups
    assert conv.created_by == "fold-bn"
    assert result.details == {"conv": 1}
    assert_same_outputs(graph, result_graph)


def test_fold_bn_across_bias_add():
    # x -> conv2d -> add(c[1,C,1,1]) -> batch_norm -> y   (how ONNX exporters write a bias)
    b = Builder()
    x = b.input("x", (1, 3, 5, 5))
    c = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3))], "conv", "c")
    biased = b.add("add", [b.random("shift", (1, 4, 1, 1)), c], "add", "biased")
    graph = b.graph(b.add("batch_norm", [biased, *_bn_params(b, 4)], "bn", "y"))
    assert ops(graph) == ["conv2d", "add", "batch_norm"]

    result_graph, result = run_pass("fold-bn", graph)

    assert ops(result_graph) == ["conv2d"]
    assert result.details == {"conv-add": 1}
    assert_same_outputs(graph, result_graph)


@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_fold_bn_into_linear_and_matmul(op):
    # x[5,8] -> linear(W[6,8], b) or matmul(W[8,6]) -> batch_norm over the 6 features -> y
    b = Builder()
    x = b.input("x", (5, 8))
    if op == "linear":
        h = b.add("linear", [x, b.random("w", (6, 8)), b.random("b", (6,))], "fc", "h")
    else:
        h = b.add("matmul", [x, b.random("w", (8, 6))], "fc", "h")
    graph = b.graph(b.add("batch_norm", [h, *_bn_params(b, 6)], "bn", "y"))
    assert ops(graph) == [op, "batch_norm"]

    result_graph, _ = run_pass("fold-bn", graph)

    assert ops(result_graph) == ["linear"]
    assert result_graph.nodes[0].inputs[1].shape == (6, 8)
    assert_same_outputs(graph, result_graph)


def test_fold_bn_skips_shared_or_activated_producer():
    # x -> conv1 -> bn1 -> y1 and conv1 -> z (second reader);  x -> conv2{relu} -> bn2 -> y2
    b = Builder()
    x = b.input("x", (1, 3, 4, 4))
    c1 = b.add("conv2d", [x, b.random("w1", (2, 3, 1, 1))], "conv1", "c1")
    y1 = b.add("batch_norm", [c1, *_bn_params(b, 2, "a")], "bn1", "y1")
    z = b.add("neg", [c1], "neg", "z")
    c2 = b.add("conv2d", [x, b.random("w2", (2, 3, 1, 1))], "conv2", "c2", activation="relu")
    y2 = b.add("batch_norm", [c2, *_bn_params(b, 2, "b")], "bn2", "y2")
    graph = b.graph(y1, z, y2)

    result_graph, result = run_pass("fold-bn", graph)

    assert ops(result_graph) == ops(graph)
    assert not result.changed


def test_fold_bn_skips_linear_with_3d_output():
    # x[2,5,8] -> linear -> batch_norm normalizes dim 1 (5 rows), not the 5 features
    b = Builder()
    x = b.input("x", (2, 5, 8))
    h = b.add("linear", [x, b.random("w", (5, 8))], "fc", "h")
    graph = b.graph(b.add("batch_norm", [h, *_bn_params(b, 5)], "bn", "y"))
    result_graph, _ = run_pass("fold-bn", graph)
    assert ops(result_graph) == ["linear", "batch_norm"]


def test_fold_bn_decompose_leftover():
    # x -> relu -> batch_norm -> y: nothing to fold into; decompose gives mul + add
    b = Builder()
    x = b.input("x", (2, 3, 4, 4))
    r = b.add("relu", [x], "relu", "r")
    graph = b.graph(b.add("batch_norm", [r, *_bn_params(b, 3)], "bn", "y"))

    kept_graph, _ = run_pass("fold-bn", graph)
    result_graph, result = run_pass("fold-bn", graph, decompose=True)

    assert ops(kept_graph) == ["relu", "batch_norm"]
    assert ops(result_graph) == ["relu", "mul", "add"]
    assert result.details["decomposed"] == 1
    assert all(n.created_by == "fold-bn" for n in result_graph.nodes[1:])
    assert_same_outputs(graph, result_graph)


# --- fuse ---------------------------------------------------------------------------------------


def test_fuse_matmul_bias_into_linear():
    # x[1,5,8] -> matmul(W[8,4]) -> add(b[4]) -> y   (the PP-OCR rec attention projections)
    b = Builder()
    x = b.input("x", (1, 5, 8))
    mm = b.add("matmul", [x, b.random("w", (8, 4))], "matmul", "mm")
    graph = b.graph(b.add("add", [mm, b.random("b", (4,))], "add", "y"))
    assert ops(graph) == ["matmul", "add"]

    result_graph, result = run_pass("fuse", graph)

    assert ops(result_graph) == ["linear"]
    assert result_graph.nodes[0].inputs[1].shape == (4, 8)
    assert result.details == {"matmul-bias": 1}
    assert_same_outputs(graph, result_graph)


def _hardswish_graph(order: str) -> Graph:
    # x -> conv2d -> c;  c + 3 -> clip(0, 6) -> t;  then c * t / 6 or c * t * (1/6) -> y
    b = Builder()
    x = b.input("x", (1, 3, 6, 6))
    c = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3))], "conv", "c", pads=[1, 1, 1, 1])
    shifted = b.add("add", [c, b.const("three", np.array([3.0], np.float32))], "add", "s")
    clipped = b.add("clip", [shifted], "clip", "t", min=0.0, max=6.0)
    if order == "div":
        product = b.add("mul", [c, clipped], "mul", "p")
        y = b.add("div", [product, b.const("six", np.float32(6.0))], "div", "y")
    elif order == "mul-sixth":
        product = b.add("mul", [clipped, c], "mul", "p")
        y = b.add("mul", [product, b.const("sixth", np.float32(1 / 6))], "scale", "y")
    else:  # x * (clip(x + 3, 0, 6) / 6): hardsigmoid first, then x * hardsigmoid(x)
        gate = b.add("div", [clipped, b.const("six", np.float32(6.0))], "div", "g")
        y = b.add("mul", [c, gate], "mul", "y")
    return b.graph(y)


@pytest.mark.parametrize("order", ["div", "mul-sixth", "gate"])
def test_fuse_hardswish_pattern_into_conv(order):
    graph = _hardswish_graph(order)
    assert ops(graph)[:3] == ["conv2d", "add", "clip"]

    result_graph, _ = run_pass("fuse", graph)

    assert ops(result_graph) == ["conv2d"]
    assert result_graph.nodes[0].attrs["activation"] == "hardswish"
    assert result_graph.nodes[0].created_by == "fuse"
    assert [v.name for v in result_graph.outputs] == ["y"]
    assert_same_outputs(graph, result_graph)


@pytest.mark.parametrize("form", ["div", "mul", "affine"])
def test_fuse_hardsigmoid_patterns(form):
    # x -> clip(x + 3, 0, 6) / 6, or * (1/6), or clip(x * 0.2 + 0.5, 0, 1) -> neg -> y
    b = Builder()
    x = b.input("x", (2, 8))
    if form == "affine":
        scaled = b.add("mul", [b.const("alpha", np.float32(0.2)), x], "mul", "m")
        shifted = b.add("add", [scaled, b.const("beta", np.float32(0.5))], "add", "s")
        gate = b.add("clip", [shifted], "clip", "g", min=0.0, max=1.0)
    else:
        shifted = b.add("add", [x, b.const("three", np.float32(3.0))], "add", "s")
        clipped = b.add("clip", [shifted], "clip", "t", min=0.0, max=6.0)
        number = np.float32(6.0 if form == "div" else 1 / 6)
        gate = b.add(form, [clipped, b.const("k", number)], "scale", "g")
    graph = b.graph(b.add("neg", [gate], "neg", "y"))

    result_graph, _ = run_pass("fuse", graph)

    assert ops(result_graph) == ["hardsigmoid", "neg"]
    expected_alpha = 0.2 if form == "affine" else 1 / 6
    assert result_graph.nodes[0].attrs["alpha"] == pytest.approx(expected_alpha, rel=1e-6)
    assert_same_outputs(graph, result_graph)


ACTIVATION_CASES = {
    # name: (op, attrs, expected fused activation)
    "relu": ("relu", {}, "relu"),
    "relu6-clip": ("clip", {"min": 0.0, "max": 6.0}, "relu6"),
    "relu-clip": ("clip", {"min": 0.0}, "relu"),
    "sigmoid": ("sigmoid", {}, "sigmoid"),
    "hardsigmoid": ("hardsigmoid", {"alpha": 0.16666670143604279, "beta": 0.5}, "hardsigmoid"),
    "hardswish": ("hardswish", {}, "hardswish"),
    "gelu": ("gelu", {}, "gelu"),
    "tanh": ("tanh", {}, "tanh"),
    "silu": ("silu", {}, "silu"),
}


def _layer_then(layer: str, op: str, attrs: dict) -> Graph:
    # x -> layer -> op -> y
    b = Builder()
    if layer == "linear":
        x = b.input("x", (3, 8))
        h = b.add("linear", [x, b.random("w", (5, 8)), b.random("b", (5,))], "layer", "h")
    elif layer == "conv2d":
        x = b.input("x", (1, 3, 5, 5))
        h = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3))], "layer", "h")
    else:
        x = b.input("x", (1, 4, 3, 3))
        h = b.add("conv_transpose2d", [x, b.random("w", (4, 1, 2, 2))], "layer", "h",
                  strides=[2, 2], groups=2)
    return b.graph(b.add(op, [h], "act", "y", **attrs))


@pytest.mark.parametrize("layer", ["conv2d", "conv_transpose2d", "linear"])
@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_fuse_activation_into_layer(layer, case):
    op, attrs, expected = ACTIVATION_CASES[case]
    graph = _layer_then(layer, op, attrs)
    assert ops(graph) == [layer, op]

    result_graph, result = run_pass("fuse", graph)

    assert ops(result_graph) == [layer]
    assert result_graph.nodes[0].attrs["activation"] == expected
    assert result.details == {"activation": 1}
    assert_same_outputs(graph, result_graph)


NOT_FUSED = {
    "gelu-tanh": ("gelu", {"approximate": "tanh"}),
    "hardsigmoid-paddle": ("hardsigmoid", {"alpha": 0.2, "beta": 0.5}),
    "clip-0-5": ("clip", {"min": 0.0, "max": 5.0}),
    "clip-negative": ("clip", {"min": -1.0, "max": 6.0}),
}


@pytest.mark.parametrize("case", sorted(NOT_FUSED))
def test_fuse_keeps_activation_without_fused_form(case):
    op, attrs = NOT_FUSED[case]
    graph = _layer_then("conv2d", op, attrs)
    result_graph, result = run_pass("fuse", graph)
    assert ops(result_graph) == ["conv2d", op]
    assert not result.changed


def test_fuse_skips_layer_output_with_two_readers():
    # x -> conv2d -> h;  h -> relu -> y;  h -> neg -> z
    b = Builder()
    x = b.input("x", (1, 3, 5, 5))
    h = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3))], "conv", "h")
    graph = b.graph(b.add("relu", [h], "relu", "y"), b.add("neg", [h], "neg", "z"))
    result_graph, result = run_pass("fuse", graph)
    assert ops(result_graph) == ["conv2d", "relu", "neg"]
    assert not result.changed


def test_fuse_skips_bias_that_broadcasts_the_output():
    # x -> conv2d -> h[1,4,3,3] + c[2,4,1,1] gives [2,4,3,3]: not a bias
    b = Builder()
    x = b.input("x", (1, 3, 5, 5))
    h = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3))], "conv", "h")
    graph = b.graph(b.add("add", [h, b.random("c", (2, 4, 1, 1))], "add", "y"))
    result_graph, _ = run_pass("fuse", graph)
    assert ops(result_graph) == ["conv2d", "add"]


def test_fuse_silu_pattern():
    # x -> sigmoid -> s;  x * s -> y
    b = Builder()
    x = b.input("x", (2, 8))
    s = b.add("sigmoid", [x], "sigmoid", "s")
    graph = b.graph(b.add("mul", [s, x], "mul", "y"))
    result_graph, _ = run_pass("fuse", graph)
    assert ops(result_graph) == ["silu"]
    assert_same_outputs(graph, result_graph)


@pytest.mark.parametrize("layer", ["conv2d", "conv_transpose2d", "linear"])
def test_fuse_scale_shift_and_activation_into_layer(layer):
    # x -> layer(W, b) -> mul(s) -> add(t) -> hardswish -> y   (PP-OCRv4 rec's affine blocks)
    b = Builder()
    if layer == "linear":
        x = b.input("x", (3, 8))
        h = b.add("linear", [x, b.random("w", (6, 8)), b.random("b", (6,))], "layer", "h")
        scale = b.random("s", (6,), 0.5, 2.0)
    elif layer == "conv2d":
        x = b.input("x", (1, 3, 5, 5))
        h = b.add("conv2d", [x, b.random("w", (6, 3, 3, 3)), b.random("b", (6,))], "layer", "h")
        scale = b.const("s", np.array([1.7], np.float32))
    else:
        x = b.input("x", (1, 4, 3, 3))
        h = b.add("conv_transpose2d", [x, b.random("w", (4, 3, 2, 2)), b.random("b", (6,))],
                  "layer", "h", strides=[2, 2], groups=2)
        scale = b.random("s", (1, 6, 1, 1), 0.5, 2.0)
    scaled = b.add("mul", [scale, h], "mul", "m")
    shifted = b.add("add", [scaled, b.const("t", np.array([0.3], np.float32))], "add", "a")
    graph = b.graph(b.add("hardswish", [shifted], "act", "y"))
    assert ops(graph) == [layer, "mul", "add", "hardswish"]

    result_graph, result = run_pass("fuse", graph)

    assert ops(result_graph) == [layer]
    assert result_graph.nodes[0].attrs["activation"] == "hardswish"
    assert result.details == {"scale-mul": 1, "bias-add": 1, "activation": 1}
    assert_same_outputs(graph, result_graph)


# --- real models --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cls", "rec"])
def test_default_pipeline_on_ppocr(name):
    from graphcomp.frontends.onnx_frontend import import_onnx
    from graphcomp.data import random_feeds
    from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager, output_error
    from graphcomp.zoo import PPOCR_SHAPES, ppocr_path

    graph = import_onnx(ppocr_path(name), PPOCR_SHAPES[name])
    feeds = random_feeds(graph, seed=0, count=1).batches[0]

    report = PassManager(DEFAULT_PIPELINE, feeds=feeds, tolerance=1e-4).run(graph)

    before = executor.run(graph, feeds)
    after = executor.run(report.graph, feeds)
    assert output_error(list(before.values()), list(after.values())) <= 1e-4
    assert len(report.graph) < len(graph) // 2
    remaining = set(ops(report.graph))
    assert not remaining & {"batch_norm", "clip", "identity"}
    assert "batch_norm" in ops(graph)
