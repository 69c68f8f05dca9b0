"""The example plugin in examples/custom_pass, found through its entry point like an installed
package: listed by ``graphcomp passes``, run by name on PP-OCRv4 rec, and a broken plugin."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import graphcomp
from graphcomp import pipeline
from graphcomp.cli import main
from graphcomp.errors import OptionError, PassError
from graphcomp.ir import Graph, Node, Value
from graphcomp.pipeline import PassManager, available_passes, parse_pipeline, pass_package

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_pass"
PIPELINE = "fold-constants,remove-identity,fold-bn,fuse,fuse-layer-norm,dce"


def write_dist_info(folder: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """Write the metadata that pip would install for a package with these entry points."""
    dist_info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"{key} = {value}" for key, value in entry_points.items()]
    (dist_info / "entry_points.txt").write_text(
        "[graphcomp.passes]\n" + "\n".join(lines) + "\n")


def example_entry_points() -> tuple[str, dict[str, str]]:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    return project["name"], project["entry-points"]["graphcomp.passes"]


@pytest.fixture
def fresh_registry(monkeypatch):
    """Let plugins load again and drop what they register when the test ends."""
    available_passes()
    monkeypatch.setattr(pipeline, "_REGISTRY", dict(pipeline._REGISTRY))
    monkeypatch.setattr(pipeline, "_PACKAGES", dict(pipeline._PACKAGES))
    monkeypatch.setattr(pipeline, "_FAILED_PLUGINS", dict(pipeline._FAILED_PLUGINS))
    monkeypatch.setattr(pipeline, "_PLUGINS_LOADED", False)


@pytest.fixture
def example_installed(tmp_path, monkeypatch, fresh_registry):
    """The example package on sys.path with its entry point, as pip install -e would leave it."""
    name, entry_points = example_entry_points()
    write_dist_info(tmp_path / "site", name, "0.1.0", entry_points)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path / "site"


def test_plugin_listed_with_package(example_installed, capsys):
    assert main(["passes", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["passes"]}
    assert rows["fuse-layer-norm"]["package"] == "graphcomp-fuse-layernorm"
    assert rows["fuse-layer-norm"]["summary"].startswith("fuse decomposed layer norms")
    assert rows["fuse"]["package"] == "graphcomp"

    assert main(["passes"]) == 0
    assert "fuse-layer-norm" in capsys.readouterr().out


@pytest.mark.slow
def test_plugin_runs_on_ppocr_rec(example_installed):
    model = graphcomp.load_model("zoo:ppocr-rec")
    x = model.default_data.batches[0]["x"]
    assert "layer_norm" not in [n.op for n in model.graph.nodes]

    report = graphcomp.run_pipeline(model.graph, PIPELINE, feeds={"x": x}, tolerance=1e-5)

    fused = report.records[PIPELINE.split(",").index("fuse-layer-norm")]
    assert fused.details == {"layer-norm-3d": 5}
    assert fused.nodes_before - fused.nodes_after == 5 * 8
    assert [n.op for n in report.graph.nodes].count("layer_norm") == 5
    actual = graphcomp.run_reference(report.graph, {"x": x})[report.graph.outputs[0].name]
    expected = model.reference({"x": x})[0]  # ONNX Runtime on the original file
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_broken_plugin_warns_and_others_load(tmp_path, monkeypatch, fresh_registry, caplog):
    write_dist_info(tmp_path, "broken-passes", "1.0", {
        "missing-module": "no_such_module_for_graphcomp:Pass",
        "not-a-pass": "json:dumps",
        "taken-name": "graphcomp.passes.dce:EliminateDeadCode",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="graphcomp.pipeline"):
        passes = available_passes()
    assert "dce" in passes
    assert "fuse" in passes
    assert pass_package(passes["dce"]) == "graphcomp"
    messages = [record.getMessage() for record in caplog.records]
    assert any("'missing-module = no_such_module_for_graphcomp:Pass' of package "
               "'broken-passes'" in m and "ModuleNotFoundError" in m for m in messages)
    not_a_pass = [m for m in messages if "'not-a-pass = json:dumps'" in m]
    assert len(not_a_pass) == 1
    assert "neither a Pass subclass" in not_a_pass[0]
    assert len(messages) == 2
    assert parse_pipeline("dce")[0].name == "dce"


def test_failed_plugin_named_as_unknown_pass(tmp_path, monkeypatch, fresh_registry, capsys):
    write_dist_info(tmp_path, "broken-passes", "1.0",
                    {"missing-module": "no_such_module_for_graphcomp:Pass"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OptionError, match=r"unknown pass 'missing-module': the pass plugin "
                                          r"'missing-module = no_such_module_for_graphcomp:Pass' "
                                          r"of package 'broken-passes' failed to load "
                                          r"\(ModuleNotFoundError"):
        parse_pipeline("dce,missing-module")


def test_failing_plugin_pass_names_package(tmp_path, monkeypatch, fresh_registry):
    plugin = tmp_path / "raising_plugin.py"
    plugin.write_text(
        "from graphcomp.pipeline import Pass\n"
        "class Raise(Pass):\n"
        "    name = 'raise-boom'\n"
        "    summary = 'raise ValueError'\n"
        "    def run(self, graph, ctx):\n"
        "        raise ValueError('boom')\n")
    write_dist_info(tmp_path, "boom-passes", "1.0", {"raise-boom": "raising_plugin:Raise"})
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = Value("x", (2, 3)), Value("y", (2, 3))
    graph = Graph("one_relu", [x], [y], [Node("r", "relu", [x], [y])])

    with pytest.raises(PassError, match=r"pass 'raise-boom' \(from package boom-passes\) "
                                        r"failed: ValueError: boom \(passes already run: dce\)"):
        PassManager("dce,raise-boom", verify=False).run(graph)


def test_plugin_name_clash_warns(tmp_path, monkeypatch, fresh_registry, caplog):
    plugin = tmp_path / "clashing_plugin.py"
    plugin.write_text(
        "from graphcomp.pipeline import Pass\n"
        "class Impostor(Pass):\n"
        "    name = 'fuse'\n"
        "    summary = 'another fuse'\n")
    write_dist_info(tmp_path, "clashing-passes", "1.0", {"fuse": "clashing_plugin:Impostor"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="graphcomp.pipeline"):
        passes = available_passes()
    assert passes["fuse"].__module__ == "graphcomp.passes.fuse"
    assert "pass name 'fuse' is already taken" in caplog.text


@pytest.mark.slow
def test_example_package_tests_pass():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_compile_with_plugin_pass(example_installed, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(example_installed), str(EXAMPLE)]))
    out = tmp_path / "rec"
    command = [sys.executable, "-m", "graphcomp.cli", "compile", "zoo:ppocr-rec", "--passes",
               PIPELINE, "--repeat", "1", "-o", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    runs = {row["name"]: row for row in report["passes_run"]}
    assert runs["fuse-layer-norm"]["details"] == {"layer-norm-3d": 5}
    assert report["drift"]["max_abs_error"] <= 1e-4  # against ONNX Runtime on the original
    assert report["verify"]["max_abs_error"] <= 1e-4  # TVM build against the reference
