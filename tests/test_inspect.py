"""Per-pass tracing and the before/after node comparison of ``graphcomp inspect --after``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.analysis import graph_stats
from graphcomp.cli import main
from graphcomp.inspect import PipelineTrace, node_changes, node_states, pass_rows
from graphcomp.ir import Constant
from graphcomp.models_io import load_model
from graphcomp.pipeline import PassManager
from graphcomp.serialize import format_graph

from graph_helpers import Builder

CONV_ATTRS = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "groups": 1}


def conv_bn_relu_linear():
    # x[2,3,6,6] -> conv2d(w, b) -> batch_norm -> relu -> identity -> reshape -> linear -> y
    b = Builder()
    x = b.input("x", (2, 3, 6, 6))
    c = b.add("conv2d", [x, b.random("w", (4, 3, 3, 3)), b.random("b", (4,))], "conv", "c",
              **CONV_ATTRS)
    n = b.add("batch_norm", [c, b.random("scale", (4,), 0.5, 2.0), b.random("beta", (4,)),
                             b.random("mean", (4,)), b.random("var", (4,), 0.5, 2.0)],
              "bn", "n", eps=1e-5)
    r = b.add("relu", [n], "relu", "r")
    i = b.add("identity", [r], "copy", "i")
    f = b.add("reshape", [i], "flatten", "f", shape=[2, 144])
    return b.graph(b.add("linear", [f, b.random("fc_w", (32, 144)), b.random("fc_b", (32,))],
                         "fc", "y"))


def trace_pipeline(graph, pipeline: str, feeds=None):
    trace = PipelineTrace(graph)
    manager = PassManager(pipeline, feeds=feeds, after_pass=trace.after_pass)
    return manager.run(graph), trace


def by_node(rows):
    return {row["node"]: row for row in rows}


def seeded_feeds(graph):
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in graph.inputs}


def test_statuses_and_responsible_passes():
    graph = conv_bn_relu_linear()
    report, trace = trace_pipeline(graph, "remove-identity,fold-bn,dce", seeded_feeds(graph))
    assert [n.op for n in graph.nodes] != [n.op for n in report.graph.nodes]

    rows = by_node(node_changes(trace))

    assert rows["bn"]["status"] == "removed"
    assert rows["bn"]["passes"] == ["fold-bn"]
    assert rows["copy"]["status"] == "removed"
    assert rows["copy"]["passes"] == ["remove-identity"]
    assert rows["conv"]["status"] == "changed"
    assert rows["conv"]["passes"] == ["fold-bn"]
    # Folding keeps the weight shapes, so only their values changed.
    assert "weight values" in rows["conv"]["changes"]
    assert rows["relu"]["status"] == "kept"
    assert rows["relu"]["changes"] == ["rewired"]
    assert rows["fc"]["status"] == "kept"
    assert rows["fc"]["params"] == [32 * 144 + 32, 32 * 144 + 32]
    np.testing.assert_allclose(
        executor.run(report.graph, seeded_feeds(graph))["y"],
        executor.run(graph, seeded_feeds(graph))["y"], rtol=1e-5, atol=1e-5,
    )


def test_added_nodes_name_their_pass():
    graph = conv_bn_relu_linear()
    report, trace = trace_pipeline(graph, "lowrank:rank=4:exclude=conv*")

    rows = node_changes(trace)

    added = [row for row in rows if row["status"] == "added"]
    assert added, "lowrank should replace the linear layer by a chain of new nodes"
    assert {row["created_by"] for row in added} == {"lowrank"}
    assert all(row["passes"] == ["lowrank"] for row in added)
    # The chain's last layer keeps the layer's name, with a low-rank weight.
    assert by_node(rows)["fc"]["status"] == "changed"
    assert by_node(rows)["fc"]["passes"] == ["lowrank"]
    assert "constants: -@float32[32,144] +@float32[32,4]" in by_node(rows)["fc"]["changes"]
    final_names = [node.name for node in report.graph.nodes]
    assert [row["node"] for row in added] == [n for n in final_names if n not in
                                              {node.name for node in graph.nodes}]


def test_pass_rows_match_graph_stats():
    graph = conv_bn_relu_linear()
    pipeline = ["remove-identity", "fold-bn", "lowrank:rank=4:exclude=conv*", "dce"]
    _, trace = trace_pipeline(graph, ",".join(pipeline))

    rows = pass_rows(trace)

    assert [row["name"] for row in rows] == ["remove-identity", "fold-bn", "lowrank", "dce"]
    for count, row in enumerate(rows, start=1):
        prefix = PassManager(",".join(pipeline[:count]), verify=False).run(graph).graph
        stats = graph_stats(prefix)
        assert (row["nodes_after"], row["params"], row["macs"], row["bytes"]) == (
            stats.nodes, stats.params, stats.macs, stats.bytes)
    assert rows[0]["removed"] == ["copy"]
    assert rows[1]["removed"] == ["bn"]
    assert rows[1]["changed_nodes"] == ["conv"]
    assert rows[3]["removed"] == rows[3]["added"] == rows[3]["changed_nodes"] == []


def test_node_states_record_edges():
    graph = conv_bn_relu_linear()

    states = node_states(graph)

    assert states["conv"].graph_inputs == ("x",)
    assert states["conv"].sources == ()
    assert states["bn"].sources == ("conv",)
    assert states["fc"].graph_output
    assert not states["relu"].graph_output
    assert states["conv"].weights != states["fc"].weights


def test_inspect_after_json_on_digits_cnn(capsys):
    code = main(["inspect", "zoo:digits-cnn", "--after", "fold-bn,dce", "--json"])
    assert code == 0

    payload = json.loads(capsys.readouterr().out)

    rows = by_node(payload["nodes"])
    original = load_model("zoo:digits-cnn").graph
    batch_norms = [node.name for node in original.nodes if node.op == "batch_norm"]
    assert batch_norms
    for name in batch_norms:
        assert rows[name]["status"] == "removed"
        assert rows[name]["passes"] == ["fold-bn"]
    assert [row["name"] for row in payload["passes"]] == ["fold-bn", "dce"]
    assert payload["passes"][0]["removed"] == batch_norms
    assert payload["passes"][0]["max_abs_error"] < 1e-4
    assert len(payload["after"]) == len(original.nodes) - len(batch_norms)


def test_inspect_after_table(capsys):
    assert main(["inspect", "zoo:digits-cnn", "--after", "fold-bn,dce"]) == 0

    out = capsys.readouterr().out

    assert "what changed" in out
    assert "removed" in out
    assert "weight values" in out or "constants:" in out
    assert "max error" in out


def test_inspect_dump_dir_numbers_each_pass(tmp_path, capsys):
    dump = tmp_path / "dump"
    code = main(["inspect", "zoo:digits-cnn", "--after", "fold-bn,dce", "--dump-dir", str(dump),
                 "--text"])
    assert code == 0
    final_text = capsys.readouterr().out

    names = sorted(path.name for path in dump.iterdir())

    assert names == ["00-input.txt", "01-fold-bn.txt", "02-dce.txt"]
    original = load_model("zoo:digits-cnn").graph
    assert (dump / "00-input.txt").read_text() == format_graph(original)
    assert (dump / "01-fold-bn.txt").read_text() != (dump / "00-input.txt").read_text()
    assert (dump / "02-dce.txt").read_text().strip() == final_text.strip()


def test_inspect_dump_dir_blocked_by_file(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("")

    code = main(["inspect", "zoo:digits-cnn", "--after", "dce", "--dump-dir", str(blocker)])

    assert code == 2
    assert "--dump-dir" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline", ["fold-bn", "fold-bn,dce"])
def test_final_states_match_final_graph(pipeline):
    graph = conv_bn_relu_linear()
    report, trace = trace_pipeline(graph, pipeline)

    assert trace.after == node_states(report.graph)
    assert trace.before == node_states(graph)


def test_non_pass_step_attributed_not_listed():
    # Fine-tuning (compile --recover) changes weight values after the passes.
    graph = conv_bn_relu_linear()
    report, trace = trace_pipeline(graph, "dce")
    tuned = report.graph.copy()
    fc = tuned.node("fc")
    fc.inputs[1] = Constant("fc_w_tuned", fc.inputs[1].data * 0.5)

    trace.add_step("recover", tuned)

    rows = by_node(node_changes(trace))
    assert rows["fc"]["status"] == "changed"
    assert rows["fc"]["passes"] == ["recover"]
    assert rows["fc"]["changes"] == ["weight values"]
    assert rows["conv"]["status"] == "kept"
    assert [row["name"] for row in pass_rows(trace)] == ["dce"]
