"""Tests of the pattern language: wildcards, predicates, shared nodes, rules, traced patterns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphcomp import data, executor
from graphcomp.errors import GraphcompError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.patterns import (
    AnyOp, Const, Either, GraphIndex, Op, RewritePass, Rule, Var, make_node,
    pattern_from_torch, rewrite, rule,
)
from graphcomp.pipeline import PassManager
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_node
from graphcomp.verifier import verify_graph


class Builder:
    """Builds a graph node by node, with shapes from shape inference."""

    def __init__(self, *inputs: Value):
        self.inputs = list(inputs)
        self.nodes: list[Node] = []

    def add(self, op, inputs, name, **attrs) -> Value:
        out = Value(name, ())
        node = Node(name, op, list(inputs), [out], attrs)
        (shape, dtype), = infer_node(node)
        out.shape, out.dtype = tuple(shape), dtype
        self.nodes.append(node)
        return out

    def graph(self, *outputs: Value) -> Graph:
        graph = Graph("test", self.inputs, list(outputs), self.nodes)
        verify_graph(graph)
        return graph


def scalar(name, number):
    return Constant(name, np.array(number, np.float32))


def hardswish_graph() -> Graph:
    # x -> add(3) -> clip(0, 6) -> mul(x, .) -> div(6) -> relu -> y
    x = Value("x", (2, 4))
    b = Builder(x)
    shifted = b.add("add", [x, scalar("three", 3.0)], "add")
    clipped = b.add("clip", [shifted], "clip", min=0.0, max=6.0)
    product = b.add("mul", [x, clipped], "mul")
    divided = b.add("div", [product, scalar("six", 6.0)], "div")
    return b.graph(b.add("relu", [divided], "relu"))


def match_at(pattern, graph, node_name):
    return pattern.match_node(graph.node(node_name), GraphIndex(graph))


# --- matching -----------------------------------------------------------------------------------


def test_wildcard_matches_any_op():
    graph = hardswish_graph()
    pattern = Op("relu", AnyOp(AnyOp(name="inner"), Const(equals=6.0), name="producer"))
    match = match_at(pattern, graph, "relu")
    assert match is not None
    assert match["producer"].op == "div"
    assert match["inner"].op == "mul"
    assert [n.name for n in match.nodes] == ["relu", "div", "mul"]
    assert match_at(Op("*", Var("x")), graph, "clip")["x"].name == "add"


def test_constant_array_predicate():
    graph = hardswish_graph()
    positive = Op("div", Var(), Const("c", where=lambda c: bool((c.data > 5).all())))
    negative = Op("div", Var(), Const(where=lambda c: bool((c.data < 0).all())))
    assert match_at(positive, graph, "div")["c"].name == "six"
    assert match_at(negative, graph, "div") is None


def test_attribute_and_value_predicates():
    graph = hardswish_graph()
    assert match_at(Op("clip", Var(), max=lambda high: high >= 6), graph, "clip") is not None
    assert match_at(Op("clip", Var(), max=lambda high: high < 6), graph, "clip") is None
    assert match_at(Op("clip", Var(where=lambda v: v.shape == (2, 4))), graph, "clip")
    assert match_at(Op("clip", Var(where=lambda v: v.rank == 4)), graph, "clip") is None
    assert match_at(Op("clip", Var(), min=0.0, max=6.0), graph, "clip") is not None


def test_either_tries_alternatives():
    graph = hardswish_graph()
    pattern = Op("mul", Var("x"), Either(Op("sigmoid", Var()), Op("clip", Var()), name="gate"))
    match = match_at(pattern, graph, "mul")
    assert match["gate"].name == "clip"


def test_inner_value_read_outside_is_rejected():
    # x -> relu -> r; y0 = sigmoid(r), y1 = tanh(r): r has a reader outside any match at y0.
    x = Value("x", (3,))
    b = Builder(x)
    r = b.add("relu", [x], "relu")
    graph = b.graph(b.add("sigmoid", [r], "sigmoid"), b.add("tanh", [r], "tanh"))
    assert match_at(Op("sigmoid", Op("relu", Var())), graph, "sigmoid") is None
    assert match_at(Op("sigmoid", Var()), graph, "sigmoid") is not None


def test_shared_inner_node_matches_once():
    # d = x - 1 is read twice, by div and by mul, both inside the match.
    x = Value("x", (3,))
    b = Builder(x)
    d = b.add("sub", [x, scalar("one", 1.0)], "sub")
    s = b.add("mul", [d, d], "square")
    graph = b.graph(b.add("div", [d, s], "div"))
    inner = Op("sub", Var("x"), Const(), name="d")
    pattern = Op("div", inner, Op("mul", inner, inner))
    match = match_at(pattern, graph, "div")
    assert match is not None
    assert [n.name for n in match.nodes] == ["div", "sub", "square"]


# --- rules --------------------------------------------------------------------------------------


@rule(Op("mul", Var("x"), Const(equals=1.0)))
def drop_times_one(graph, match):  # x * 1 -> x
    return match["x"]


def test_rule_decorator_names_rule():
    assert drop_times_one.name == "drop-times-one"
    assert isinstance(drop_times_one, Rule)


def test_rewrite_to_existing_value_keeps_output_name():
    # x -> relu -> r -> mul(1) -> y (graph output)
    x = Value("x", (2, 3))
    b = Builder(x)
    r = b.add("relu", [x], "relu")
    graph = b.graph(b.add("mul", [r, scalar("one", 1.0)], "y"))
    before = format_graph(graph)

    counts = rewrite(graph, drop_times_one)

    assert counts == {"drop-times-one": 1}
    assert format_graph(graph) != before
    assert [n.op for n in graph.nodes] == ["relu"]
    assert graph.outputs[0].name == "y"
    verify_graph(graph)


def test_rewrite_to_value_removes_dead_matched_nodes():
    # relu(relu(x)) -> relu(x): the outer relu goes, the inner one stays because it is the value.
    x = Value("x", (4,))
    b = Builder(x)
    inner = b.add("relu", [x], "inner")
    outer = b.add("relu", [inner], "outer")
    graph = b.graph(b.add("tanh", [outer], "tanh"))
    twice = Rule("relu-twice", Op("relu", Op("relu", Var(), name="inner")),
                 lambda g, m: m["inner"].output)
    assert rewrite(graph, twice) == {"relu-twice": 1}
    assert [n.name for n in graph.nodes] == ["inner", "tanh"]
    verify_graph(graph)


def test_rewrite_building_new_nodes():
    graph = hardswish_graph()
    feeds = data.random_feeds(graph, seed=0, count=1).batches[0]
    expected = executor.run(graph, feeds)["relu"]

    def to_hardswish(graph, match):  # x * clip(x + 3, 0, 6) / 6 -> hardsigmoid(x) * x
        gate = make_node(graph, "hardsigmoid", [match["x"]], "gate", alpha=1 / 6, beta=0.5)
        return [gate, *match.replace_root("mul", [match["x"], gate.output])]

    x = Var("x")
    pattern = Op("div", Op("mul", x, Op("clip", Op("add", x, Const(equals=3.0)))),
                 Const(equals=6.0))
    assert rewrite(graph, Rule("hardswish", pattern, to_hardswish), "test") == {"hardswish": 1}
    assert [n.op for n in graph.nodes] == ["hardsigmoid", "mul", "relu"]
    assert graph.nodes[0].created_by == "test"
    np.testing.assert_allclose(executor.run(graph, feeds)["relu"], expected, rtol=1e-6,
                               atol=1e-6)


def test_rule_that_matches_its_result_forever_raises():
    graph = hardswish_graph()
    again = Rule("relu-again", Op("relu", Var("x")),
                 lambda g, m: m.replace_root("relu", [m["x"]]))
    with pytest.raises(RuntimeError, match="rules kept matching after 3 rewrites, the last one "
                                           "'relu-again' at node 'relu'"):
        rewrite(graph, again, max_rewrites=3)


def test_rule_with_wrong_return_type_raises():
    graph = hardswish_graph()
    wrong = Rule("wrong", Op("relu", Var("x")), lambda g, m: "relu")
    with pytest.raises(TypeError, match="rule 'wrong' returned str"):
        rewrite(graph, wrong)


class DropTimesOne(RewritePass):
    name = "test-drop-times-one"
    summary = "test only: x * 1 -> x"
    rules = (drop_times_one,)


def test_rewrite_pass_through_manager():
    x = Value("x", (2, 3))
    b = Builder(x)
    m = b.add("mul", [x, scalar("one", 1.0)], "mul")
    graph = b.graph(b.add("relu", [m], "relu"))
    feeds = data.random_feeds(graph, seed=0, count=1).batches[0]
    report = PassManager([DropTimesOne()], feeds=feeds).run(graph)
    (record,) = report.records
    assert record.changed is True
    assert record.details == {"drop-times-one": 1}
    assert record.max_abs_error == 0.0
    assert [n.op for n in report.graph.nodes] == ["relu"]


# --- traced patterns ----------------------------------------------------------------------------


def traced_hardswish(x):
    return x * torch.nn.functional.relu6(x + 3) / 6


def test_traced_pattern_matches_exported_form():
    pattern = pattern_from_torch(traced_hardswish, [torch.randn(2, 3)])
    graph = hardswish_graph()
    match = match_at(pattern, graph, "div")
    assert match is not None
    assert match["x"] is graph.inputs[0]
    assert sorted(n.op for n in match.nodes) == ["add", "clip", "div", "mul"]


def test_traced_pattern_checks_constants():
    def times_five(x):
        return x * 5

    graph = hardswish_graph()
    assert match_at(pattern_from_torch(times_five, [torch.randn(3)]), graph, "mul") is None


def test_traced_pattern_parameters_as_constants():
    def affine(x, scale):
        return torch.relu(x / scale)

    pattern = pattern_from_torch(affine, [torch.randn(3), torch.tensor(6.0)],
                                 constants=("scale",))
    match = match_at(pattern, hardswish_graph(), "relu")
    assert match["scale"].name == "six"
    as_var = pattern_from_torch(affine, [torch.randn(3), torch.tensor(6.0)])
    assert match_at(as_var, hardswish_graph(), "relu")["scale"].name == "six"


def test_traced_pattern_errors():
    def relu_of_first(x, unused):
        return torch.relu(x)

    with pytest.raises(ValueError, match=r"constants \['w'\] are not parameters of "
                                         r"relu_of_first\(x, unused\)"):
        pattern_from_torch(relu_of_first, [torch.randn(3), torch.randn(3)], constants=("w",))
    with pytest.raises(GraphcompError, match=r"relu_of_first does not use its parameters "
                                             r"\['unused'\]"):
        pattern_from_torch(relu_of_first, [torch.randn(3), torch.randn(3)])
