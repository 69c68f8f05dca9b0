"""Tests of pipeline parsing and the pass manager, with test-only passes that misbehave."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphcomp import data, executor, pipeline
from graphcomp.cli import main
from graphcomp.errors import OptionError, PassError, ShapeError, VerificationError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.pipeline import (
    DEFAULT_PIPELINE, Pass, PassManager, PassNodeError, PassResult, available_passes,
    output_error, parse_pipeline, register_pass,
)
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_node


def seeded_feeds(graph):
    return data.random_feeds(graph, seed=0, count=1).batches[0]


# --- test-only passes ---------------------------------------------------------------------------


class CorruptWeight(Pass):
    """Doubles the first conv weight while claiming to be lossless."""

    name = "test-corrupt-weight"
    summary = "test only: double the first conv weight"

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "conv2d")
        conv.inputs[1] = Constant("doubled", conv.inputs[1].data * 2)
        return PassResult(changed=True)


class ScaleOutput(Pass):
    """Lossy by declaration: scales the first conv weight by ``factor``."""

    name = "test-lossy-scale"
    summary = "test only: a lossy pass"
    lossless = False
    options = {"factor": float}
    defaults = {"factor": 1.5}

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "conv2d")
        conv.inputs[1] = Constant("scaled", conv.inputs[1].data * self.config["factor"])
        return PassResult(changed=True, details={"scaled": 1})


class RaiseAtNode(Pass):
    """Fails with a PassNodeError naming the first node."""

    name = "test-raise"
    summary = "test only: raise"

    def run(self, graph, ctx):
        try:
            int("not a number")
        except ValueError as exc:
            raise PassNodeError(graph.nodes[0].name, "cannot rewrite this node") from exc


class DropProducer(Pass):
    """Removes the first node, leaving its readers with a dangling input."""

    name = "test-drop-producer"
    summary = "test only: leave a malformed graph"

    def run(self, graph, ctx):
        graph.nodes.pop(0)
        return PassResult(changed=True)


class NeedsFoldBn(Pass):
    """Does nothing, but requires fold-bn to run first."""

    name = "test-needs-fold-bn"
    summary = "test only: requires fold-bn"
    requires = ("fold-bn",)
    options = {"mode": str, "strict": bool, "count": int}

    @classmethod
    def parse_word(cls, word):
        if word in ("fast", "slow"):
            return {"mode": word}
        return super().parse_word(word)

    def run(self, graph, ctx):
        return PassResult(changed=False)


class FlattenOutput(Pass):
    """Reshapes the graph output to 1-D, without declaring that it invalidates 'interface'."""

    name = "test-flatten-output"
    summary = "test only: change the output shape"

    def run(self, graph, ctx):
        old = graph.outputs[0]
        new = Value(old.name, (old.size,), old.dtype)
        old.name = f"{old.name}_before_flatten"
        graph.nodes.append(Node("flatten_output", "reshape", [old], [new],
                                {"shape": [old.size]}))
        graph.outputs[0] = new
        return PassResult(changed=True)


class SilentRemoveIdentity(Pass):
    """Removes the identity node but reports changed=False."""

    name = "test-silent-change"
    summary = "test only: change the graph, report no change"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.op == "identity")
        graph.replace_uses(node.output, node.inputs[0])
        graph.remove_nodes([node])
        return PassResult(changed=False)


class ReturnsBool(Pass):
    """Returns a plain bool from run()."""

    name = "test-returns-bool"
    summary = "test only: return False"

    def run(self, graph, ctx):
        return False


class AddDeadNode(Pass):
    """Pass that adds a node no other node reads, without declaring that it invalidates
    'no-dead-code'."""

    name = "test-add-dead-node"
    summary = "test only: leave dead code"

    def run(self, graph, ctx):
        x = graph.inputs[0]
        graph.nodes.insert(0, Node("dead", "relu", [x], [Value("dead_out", x.shape)]))
        return PassResult(changed=True)


class ClaimsNoDeadCode(Pass):
    """Declares that it establishes 'no-dead-code' but does nothing."""

    name = "test-claims-no-dead-code"
    summary = "test only: a false 'establishes'"
    establishes = ("no-dead-code",)

    def run(self, graph, ctx):
        return PassResult(changed=False)


class NeedsFloat(Pass):
    """Does nothing, but requires the property 'float'."""

    name = "test-needs-float"
    summary = "test only: requires float"
    requires = ("float",)

    def run(self, graph, ctx):
        return PassResult(changed=False)


TEST_PASSES = (CorruptWeight, ScaleOutput, RaiseAtNode, DropProducer, NeedsFoldBn,
               FlattenOutput, SilentRemoveIdentity, ReturnsBool, AddDeadNode, ClaimsNoDeadCode,
               NeedsFloat)


@pytest.fixture(autouse=True)
def test_passes_registered(monkeypatch):
    """Register the test-only passes for one test; they leave the registry afterwards."""
    available_passes()
    for cls in TEST_PASSES:
        monkeypatch.setitem(pipeline._REGISTRY, cls.name, cls)
        register_pass(cls)


# --- fixtures -----------------------------------------------------------------------------------


def conv_bn_relu_graph() -> Graph:
    # x[1,3,6,6] -> identity -> conv2d(W) -> batch_norm -> relu -> y
    rng = np.random.default_rng(0)
    x = Value("x", (1, 3, 6, 6))
    nodes = []

    def add(op, inputs, name, **attrs):
        out = Value(name + "_out", ())
        node = Node(name, op, inputs, [out], attrs)
        (shape, dtype), = infer_node(node)
        out.shape, out.dtype = tuple(shape), dtype
        nodes.append(node)
        return out

    def const(name, shape, low=-1.0, high=1.0):
        return Constant(name, rng.uniform(low, high, shape).astype(np.float32))

    t = add("identity", [x], "id")
    c = add("conv2d", [t, const("w", (4, 3, 3, 3))], "conv", pads=[1, 1, 1, 1])
    params = [const("s", (4,), 0.5, 2), const("b", (4,)), const("m", (4,)),
              const("v", (4,), 0.5, 2)]
    bn = add("batch_norm", [c, *params], "bn")
    y = add("relu", [bn], "relu")
    return Graph("toy", [x], [y], nodes)


@pytest.fixture
def graph() -> Graph:
    return conv_bn_relu_graph()


# --- parsing ------------------------------------------------------------------------------------


def test_parse_default_pipeline():
    passes = parse_pipeline(DEFAULT_PIPELINE)
    assert [p.name for p in passes] == ["fold-constants", "remove-identity", "fold-bn", "fuse",
                                        "dce"]
    assert all(p.lossless for p in passes)


@pytest.mark.parametrize("text", ["none", "NONE", " none\n"])
def test_parse_none_pipeline(text):
    assert parse_pipeline(text) == []


@pytest.mark.parametrize("text", ["", "  ", "\n"])
def test_parse_empty_text_rejected(text):
    with pytest.raises(OptionError, match="the pipeline is empty; write 'none'"):
        parse_pipeline(text)


@pytest.mark.parametrize("text", [",", "dce,,dce", ",dce", "dce,", "dce, ,fuse"])
def test_parse_empty_item_rejected(text):
    with pytest.raises(OptionError, match=r"has an empty pass name .* write 'none'"):
        parse_pipeline(text)


def test_parse_one_pass_per_line():
    passes = parse_pipeline("fold-bn,\nfuse,\n\ndce\n")
    assert [p.name for p in passes] == ["fold-bn", "fuse", "dce"]


def test_parse_typed_options_and_words():
    text = "fold-bn, test-needs-fold-bn:fast:count=3:strict=0\n fold-constants:max_elements=10"
    first, second, third = parse_pipeline(text)
    assert first.config == {"decompose": False}
    assert second.config == {"mode": "fast", "count": 3, "strict": False}
    assert third.config == {"max_elements": 10}


@pytest.mark.parametrize("word, expected", [("true", True), ("1", True), ("False", False),
                                            ("0", False)])
def test_parse_bool_values(word, expected):
    (fold,) = parse_pipeline(f"fold-bn:decompose={word}")
    assert fold.config["decompose"] is expected


def test_parse_bool_flag_word():
    (fold,) = parse_pipeline("fold-bn:decompose")
    assert fold.config["decompose"] is True


def test_parse_float_option_accepts_int_text():
    (scale,) = parse_pipeline("test-lossy-scale:factor=2")
    assert scale.config["factor"] == 2.0


@pytest.mark.parametrize("text, message", [
    ("fold-bnn", r"unknown pass 'fold-bnn'\. Did you mean 'fold-bn'\? Known passes: .*dce"),
    ("zzz", r"unknown pass 'zzz'\. Known passes: "),
    ("fold-bn:ratio=0.5", r"pass 'fold-bn' has no option 'ratio'; accepted options: decompose"),
    ("fuse:x=1", r"pass 'fuse' has no option 'x'; it takes no options"),
    ("fold-constants:max_elements=abc", r"option 'max_elements' expects int, got 'abc'"),
    ("fold-constants:max_elements=1.5", r"option 'max_elements' expects int"),
    ("fold-bn:decompose=maybe", r"option 'decompose' expects bool, got 'maybe'"),
    ("fold-bn:int8", r"pass 'fold-bn' does not accept the word 'int8'; accepted options"),
    ("fold-bn:decompose:decompose=0", r"option 'decompose' is given twice"),
    ("fold-bn::decompose", r"empty option"),
    ("fold-bn:=1", r"option without a name"),
])
def test_parse_errors(text, message):
    with pytest.raises(OptionError, match=message):
        parse_pipeline(text)


def test_pass_init_checks_python_values():
    fold_bn = available_passes()["fold-bn"]
    with pytest.raises(OptionError, match="option 'decompose' expects bool, got 1"):
        fold_bn(decompose=1)


def test_register_pass_rejects_taken_name():
    class Impostor(Pass):
        name = "dce"
        summary = "another dce"

    with pytest.raises(ValueError, match="pass name 'dce' is already taken"):
        register_pass(Impostor)


# --- pass manager -------------------------------------------------------------------------------


def test_manager_runs_default_pipeline(graph):
    feeds = seeded_feeds(graph)
    before_text = format_graph(graph)

    report = PassManager(DEFAULT_PIPELINE, feeds=feeds).run(graph)

    assert [n.op for n in graph.nodes] == ["identity", "conv2d", "batch_norm", "relu"]
    assert format_graph(graph) == before_text
    assert [n.op for n in report.graph.nodes] == ["conv2d"]
    assert report.graph.nodes[0].attrs["activation"] == "relu"
    assert [r.name for r in report.records] == DEFAULT_PIPELINE.split(",")
    assert [r.nodes_before for r in report.records] == [4, 4, 3, 2, 1]
    assert [r.changed for r in report.records] == [False, True, True, True, False]
    assert all(r.max_abs_error is not None and r.max_abs_error <= 1e-5 for r in report.records)
    expected = executor.run(graph, feeds)["relu_out"]
    np.testing.assert_allclose(executor.run(report.graph, feeds)["relu_out"], expected,
                               rtol=1e-5, atol=1e-5)


def test_manager_report_to_dict_is_json(graph):
    report = PassManager("fold-bn,fuse", verify=False).run(graph)
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["nodes_before"] == 4
    assert payload["nodes_after"] == 2
    assert payload["records"][0]["details"] == {"conv": 1}
    assert payload["records"][0]["max_abs_error"] is None


def test_manager_writes_dump_files(graph, tmp_path):
    manager = PassManager("remove-identity,fold-bn", dump_dir=tmp_path, verify=False)
    report = manager.run(graph)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.txt", "01-remove-identity.txt", "02-fold-bn.txt"]
    assert (tmp_path / "00-input.txt").read_text() == format_graph(graph)
    assert (tmp_path / "02-fold-bn.txt").read_text() == format_graph(report.graph)
    assert "batch_norm" in (tmp_path / "01-remove-identity.txt").read_text()
    assert "batch_norm" not in (tmp_path / "02-fold-bn.txt").read_text()


def test_manager_catches_corrupting_pass(graph):
    manager = PassManager("remove-identity,fold-bn,test-corrupt-weight", feeds=seeded_feeds(graph))
    with pytest.raises(PassError, match=r"pass 'test-corrupt-weight' failed: changed the outputs "
                                        r"by .*rerun with --dump-dir DIR .*"
                                        r"\(passes already run: remove-identity, fold-bn\)"):
        manager.run(graph)


def test_manager_dumps_graph_of_failing_pass(graph, tmp_path):
    manager = PassManager("fold-bn,test-corrupt-weight", feeds=seeded_feeds(graph),
                          dump_dir=tmp_path)
    with pytest.raises(PassError, match="test-corrupt-weight"):
        manager.run(graph)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.txt", "01-fold-bn.txt", "02-test-corrupt-weight.txt"]
    assert "@doubled" in (tmp_path / "02-test-corrupt-weight.txt").read_text()


def test_manager_records_error_of_lossy_pass(graph):
    feeds = seeded_feeds(graph)
    report = PassManager("test-lossy-scale:factor=1.5", feeds=feeds, tolerance=1e-4).run(graph)
    (record,) = report.records
    assert record.max_abs_error > 1e-4
    assert record.options == {"factor": 1.5}
    assert record.details == {"scaled": 1}


def test_manager_without_feeds_skips_numbers(graph):
    report = PassManager("test-corrupt-weight").run(graph)
    assert report.records[0].max_abs_error is None


def test_manager_wraps_raising_pass(graph):
    manager = PassManager("fold-bn,test-raise", verify=False)
    with pytest.raises(PassError, match=r"pass 'test-raise' failed at node 'id': PassNodeError: "
                                        r"cannot rewrite this node \(passes already run: "
                                        r"fold-bn\)") as info:
        manager.run(graph)
    assert info.value.pass_name == "test-raise"
    assert info.value.already_run == ["fold-bn"]
    assert info.value.node == "id"
    assert isinstance(info.value.__cause__, PassNodeError)
    assert isinstance(info.value.__cause__.__cause__, ValueError)


def test_manager_verifies_structure(graph):
    with pytest.raises(PassError, match=r"pass 'test-drop-producer' failed: left a malformed "
                                        r"graph: .*not produced before this node") as info:
        PassManager("test-drop-producer", verify=False).run(graph)
    assert isinstance(info.value.__cause__, VerificationError)


def test_manager_rejects_malformed_input(graph):
    graph.nodes.pop(0)
    with pytest.raises(VerificationError, match="input graph 'toy' is malformed"):
        PassManager("dce").run(graph)


def test_manager_checks_requires():
    with pytest.raises(OptionError, match=r"pass 'test-needs-fold-bn' requires 'fold-bn' to run "
                                          r"earlier in the pipeline, for example "
                                          r"'fold-bn,test-needs-fold-bn'"):
        PassManager("test-needs-fold-bn,fold-bn")


def test_manager_accepts_satisfied_requires(graph):
    report = PassManager("fold-bn,test-needs-fold-bn", verify=False).run(graph)
    assert [r.name for r in report.records] == ["fold-bn", "test-needs-fold-bn"]


def test_manager_calls_progress(graph):
    calls = []
    PassManager("remove-identity,dce", verify=False,
                progress=lambda *args: calls.append(args)).run(graph)
    assert calls == [("remove-identity", 0, 2), ("dce", 1, 2)]


def test_manager_rejects_wrong_feeds(graph):
    manager = PassManager("dce", feeds={"x": np.zeros((1, 3, 5, 5), np.float32)})
    with pytest.raises(ShapeError, match=r"input 'x' has shape \(1, 3, 5, 5\)"):
        manager.run(graph)


def test_output_error_is_relative_to_output_scale():
    before = [np.array([10.0, -20.0]), np.array([0.0, 0.0])]
    assert output_error(before, [np.array([10.0, -19.0]), np.zeros(2)]) == pytest.approx(0.05)
    assert output_error(before, [before[0], np.array([0.0, 0.5])]) == pytest.approx(0.5)
    assert output_error(before, [before[0], np.array([0.0, np.nan])]) == float("inf")
    assert output_error(before, [before[0]]) == float("inf")


# --- pass contracts -----------------------------------------------------------------------------


def test_contract_requires_property_invalidated_earlier():
    with pytest.raises(OptionError, match=r"pass 'prune' requires property 'float' \(no "
                                          r"quantized op .*\), but pass 'quantize' before it "
                                          r"invalidates it and no pass between establishes it "
                                          r"again; run 'quantize' later in the pipeline"):
        PassManager("fold-bn,quantize:dynamic,dce,prune:ratio=0.5")


def test_contract_requires_property_of_input_graph():
    # x -> quantize -> dequantize -> y: the input graph is not float.
    x = Value("x", (2, 3))
    scale = Constant("scale", np.array(0.1, np.float32))
    zero = Constant("zero", np.array(0, np.int8))
    q = Value("q", (2, 3), "int8")
    y = Value("y", (2, 3))
    graph = Graph("quantized", [x], [y], [
        Node("quant", "quantize", [x, scale, zero], [q]),
        Node("dequant", "dequantize", [q, scale, zero], [y]),
    ])
    with pytest.raises(OptionError, match=r"pass 'test-needs-float' requires property 'float' "
                                          r".* but the input graph 'quantized' lacks it "
                                          r"\(node 'quant' is a quantize\)"):
        PassManager("dce,test-needs-float").run(graph)


def test_contract_accepts_valid_property_order(graph):
    report = PassManager("test-needs-float,fold-bn,dce", verify=False).run(graph)
    assert [r.name for r in report.records] == ["test-needs-float", "fold-bn", "dce"]


def test_contract_catches_changed_output_shape(graph):
    with pytest.raises(PassError, match=r"pass 'test-flatten-output' failed: it changed property "
                                        r"'interface' .* output 'relu_out' float32\[1,4,6,6\] "
                                        r"became output 'relu_out' float32\[144\]"):
        PassManager("test-flatten-output", verify=False).run(graph)


def test_contract_catches_unreported_change(graph):
    with pytest.raises(PassError, match=r"pass 'test-silent-change' failed: returned "
                                        r"changed=False but changed the graph"):
        PassManager("test-silent-change", verify=False).run(graph)


def test_contract_off_skips_checks(graph):
    report = PassManager("test-silent-change", verify=False, check_contract=False).run(graph)
    assert [n.op for n in report.graph.nodes] == ["conv2d", "batch_norm", "relu"]


def test_contract_accepts_bool_result(graph):
    (record,) = PassManager("test-returns-bool", verify=False).run(graph).records
    assert record.changed is False


def test_contract_catches_broken_preserved_property(graph):
    with pytest.raises(PassError, match=r"pass 'test-add-dead-node' failed: property "
                                        r"'no-dead-code' .* held before it and not after, and it "
                                        r"does not declare that it invalidates it: nothing reads "
                                        r"the outputs of node 'dead' \(relu\) \(passes already "
                                        r"run: dce\)"):
        PassManager("dce,test-add-dead-node", verify=False).run(graph)


def test_contract_catches_false_establishes(graph):
    graph.nodes.insert(0, Node("dead", "relu", [graph.inputs[0]],
                               [Value("dead_out", graph.inputs[0].shape)]))
    with pytest.raises(PassError, match=r"it declares that it establishes 'no-dead-code', but "
                                        r"nothing reads the outputs of node 'dead'"):
        PassManager("test-claims-no-dead-code", verify=False).run(graph)
    report = PassManager("dce,test-claims-no-dead-code", verify=False).run(graph)
    assert "dead" not in [n.name for n in report.graph.nodes]


def test_register_pass_checks_contract_names():
    class UnknownProperty(Pass):
        name = "test-unknown-property"
        summary = "test only"
        invalidates = ("shapes-ish",)

    class NamedLikeProperty(Pass):
        name = "float"
        summary = "test only"

    class RequiresString(Pass):
        name = "test-requires-string"
        summary = "test only"
        requires = "float"

    with pytest.raises(TypeError, match=r"invalidates unknown properties \['shapes-ish'\]; "
                                        r"known properties: interface, float, no-dead-code"):
        register_pass(UnknownProperty)
    with pytest.raises(TypeError, match="pass name 'float' is the name of a graph property"):
        register_pass(NamedLikeProperty)
    with pytest.raises(TypeError, match="'requires' must be a tuple of names, got 'float'"):
        register_pass(RequiresString)


def test_builtin_contracts_are_declared():
    passes = available_passes()
    assert passes["quantize"].invalidates == ("float",)
    assert passes["dce"].establishes == ("no-dead-code",)
    for name in ("prune", "lowrank"):
        assert "float" in passes[name].requires
    for name in ("fold-constants", "remove-identity", "fold-bn", "fuse", "dce"):
        assert passes[name].invalidates == ()


def test_passes_command_shows_option_choices(capsys):
    assert main(["passes", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["passes"]}
    assert "measure:auto|true|false" in rows["lowrank"]["options"]
    assert "method:auto|svd|tucker2|cp" in rows["lowrank"]["options"]
    assert "criterion:l1|l2|bn|taylor" in rows["prune"]["options"]
    assert "calib:minmax|percentile|mse" in rows["quantize"]["options"]
    assert "sensitivity:bool" in rows["quantize"]["options"]
    # Every listed choice is accepted, and a value outside them is not.
    for name, cls in available_passes().items():
        for key, allowed in cls.choices.items():
            for value in allowed:
                parse_pipeline(f"{name}:{key}={value}")
            with pytest.raises(OptionError):
                parse_pipeline(f"{name}:{key}=no-such-choice")
