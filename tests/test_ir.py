"""The graph IR: text form, JSON round trip, networkx view, verifier, reference executor."""

import numpy as np
import pytest
import torch

from graphcomp import executor
from graphcomp.analysis import graph_stats, to_networkx
from graphcomp.errors import ShapeError, VerificationError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.serialize import format_graph, graph_from_dict, graph_to_dict, load_graph, save_graph
from graphcomp.shapes import infer_shapes
from graphcomp.verifier import verify_graph


def small_cnn() -> Graph:
    """x -> conv(3->4, 3x3, pad 1) -> batch_norm -> relu -> global_avg_pool -> flatten -> linear
    (4->2)."""
    rng = np.random.default_rng(0)
    x = Value("x", (1, 3, 8, 8))

    def const(name, shape, low=-1.0, high=1.0):
        return Constant(name, rng.uniform(low, high, shape).astype(np.float32))

    def out(name):
        return Value(name, ())

    nodes = [
        Node("conv", "conv2d", [x, const("conv.w", (4, 3, 3, 3)), const("conv.b", (4,))],
             [out("c")], {"pads": [1, 1, 1, 1], "strides": [1, 1]}),
        Node("bn", "batch_norm",
             [Value("c", ()), const("bn.scale", (4,)), const("bn.bias", (4,)),
              const("bn.mean", (4,)), const("bn.var", (4,), 0.5, 2.0)],
             [out("b")], {"eps": 1e-5}),
        Node("relu", "relu", [Value("b", ())], [out("r")]),
        Node("pool", "global_avg_pool", [Value("r", ())], [out("p")]),
        Node("flat", "flatten", [Value("p", ())], [out("f")], {"axis": 1}),
        Node("fc", "linear", [Value("f", ()), const("fc.w", (2, 4)), const("fc.b", (2,))],
             [out("y")]),
    ]
    # Wire each node to the previous node's output value object.
    for previous, node in zip(nodes, nodes[1:]):
        node.inputs[0] = previous.outputs[0]
    graph = Graph("small_cnn", [x], [nodes[-1].outputs[0]], nodes)
    infer_shapes(graph)
    return graph


def torch_small_cnn(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The same network written directly in PyTorch, as an independent reference."""
    weights = {c.name: torch.from_numpy(c.data) for c in graph.constants()}
    t = torch.nn.functional.conv2d(torch.from_numpy(x), weights["conv.w"], weights["conv.b"],
                                   padding=1)
    t = torch.nn.functional.batch_norm(t, weights["bn.mean"], weights["bn.var"],
                                       weights["bn.scale"], weights["bn.bias"], eps=1e-5)
    t = torch.relu(t).mean(dim=(2, 3))
    return torch.nn.functional.linear(t, weights["fc.w"], weights["fc.b"]).numpy()


def test_shapes_inferred():
    graph = small_cnn()
    assert graph.node("conv").output.shape == (1, 4, 8, 8)
    assert graph.node("pool").output.shape == (1, 4, 1, 1)
    assert graph.outputs[0].shape == (1, 2)


def test_executor_matches_pytorch():
    graph = small_cnn()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    result = executor.run(graph, {"x": x})["y"]
    np.testing.assert_allclose(result, torch_small_cnn(graph, x), atol=1e-6)


def test_executor_rejects_wrong_feeds():
    graph = small_cnn()
    with pytest.raises(ShapeError, match="input 'x' has shape"):
        executor.run(graph, {"x": np.zeros((1, 3, 4, 4), np.float32)})
    with pytest.raises(ShapeError, match="missing"):
        executor.run(graph, {})


def test_text_form_one_line_per_node():
    text = format_graph(small_cnn())
    lines = text.splitlines()
    assert lines[0] == "graph small_cnn(%x: float32[1,3,8,8]) -> (%y)"
    assert len(lines) == 1 + 6
    assert lines[1] == (
        "  conv: %c = conv2d(%x, @conv.w, @conv.b) {pads=[1,1,1,1], strides=[1,1]} "
        "-> float32[1,4,8,8]"
    )


def test_json_round_trip(tmp_path):
    graph = small_cnn()
    path = tmp_path / "graph.json"
    save_graph(graph, path)
    loaded = load_graph(path)
    assert format_graph(loaded) == format_graph(graph)
    assert graph_to_dict(loaded) == graph_to_dict(graph)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(executor.run(loaded, {"x": x})["y"],
                                  executor.run(graph, {"x": x})["y"])


def test_json_rejects_other_format():
    with pytest.raises(Exception, match="not a graphcomp graph"):
        graph_from_dict({"format": "something-else"})


def test_stats_count_params_and_macs():
    stats = graph_stats(small_cnn())
    assert stats.nodes == 6
    # conv 4*3*3*3 + 4, bn 4*4, linear 2*4 + 2
    assert stats.params == 108 + 4 + 16 + 8 + 2
    # conv: 64 output pixels * 4 channels * 27; bn: 256; pool: 256; linear: 2 * 4
    assert stats.macs == 64 * 4 * 27 + 256 + 256 + 8
    assert stats.bytes == 4 * stats.params


def test_networkx_view_edges():
    view = to_networkx(small_cnn())
    assert list(view.successors("conv")) == ["bn"]
    assert view.number_of_edges() == 5


def test_copy_is_independent():
    graph = small_cnn()
    clone = graph.copy()
    clone.nodes[0].attrs["pads"] = [0, 0, 0, 0]
    clone.nodes.pop()
    assert graph.nodes[0].attrs["pads"] == [1, 1, 1, 1]
    assert len(graph.nodes) == 6
    assert clone.constants()[0].data is graph.constants()[0].data


def test_verifier_accepts_good_graph():
    verify_graph(small_cnn())


def test_verifier_names_node_out_of_order():
    graph = small_cnn()
    graph.nodes[1], graph.nodes[2] = graph.nodes[2], graph.nodes[1]
    with pytest.raises(VerificationError, match="node 'relu'.*not produced before"):
        verify_graph(graph)
    graph.sort()
    verify_graph(graph)


def test_verifier_names_stale_shape():
    graph = small_cnn()
    graph.node("conv").attrs["pads"] = [0, 0, 0, 0]
    with pytest.raises(VerificationError, match="node 'conv'.*infer_shapes"):
        verify_graph(graph)


def test_verifier_names_dangling_input():
    graph = small_cnn()
    graph.node("relu").inputs[0] = Value("ghost", (1, 4, 8, 8))
    with pytest.raises(VerificationError, match="input 'ghost' is not produced"):
        verify_graph(graph)


def test_verifier_names_unknown_op():
    graph = small_cnn()
    graph.node("relu").op = "frobnicate"
    with pytest.raises(VerificationError, match="node 'relu' \\(op frobnicate\\): unknown op"):
        verify_graph(graph)


def test_shape_inference_error_names_node():
    graph = small_cnn()
    graph.node("fc").inputs[1] = Constant("bad", np.zeros((2, 5), np.float32))
    with pytest.raises(ShapeError, match="node 'fc' \\(op linear"):
        infer_shapes(graph)


def test_error_stats_treat_lost_nan_as_mismatch():
    from graphcomp.compiler import ErrorStats

    stats = ErrorStats()
    stats.add(np.array([1.0, 2.0]), np.array([np.nan, np.nan]))
    assert stats.mismatch
    assert stats.relative_error == float("inf")
    agreeing = ErrorStats()
    agreeing.add(np.array([np.nan, 2.0]), np.array([np.nan, 2.0]))
    assert not agreeing.mismatch
    assert agreeing.max_abs == 0.0
