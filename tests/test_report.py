"""The HTML report: its content, its graph layout, and the page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from graphcomp.analysis import graph_stats
from graphcomp.cli import main
from graphcomp.inspect import PipelineTrace, pass_rows, trace_report
from graphcomp.models_io import load_model
from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager
from graphcomp.report import (
    NODE_HEIGHT, NODE_WIDTH, STATUS_COLORS, layout_graph, render_report, write_report,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)


def traced_report(spec: str, pipeline: str) -> dict:
    """A report.json-like dict from a real pipeline run: the fields report.html reads, except
    the build's verify, drift and latency figures."""
    graph = load_model(spec).graph
    trace = PipelineTrace(graph)
    report = PassManager(pipeline, verify=False, after_pass=trace.after_pass).run(graph)
    return {
        "model": spec, "target": "cpu", "passes": pipeline,
        "graph": {"before": graph_stats(graph).to_dict(),
                  "after": graph_stats(report.graph).to_dict()},
        "passes_run": pass_rows(trace),
        "nodes": trace_report(trace),
    }


@pytest.fixture(scope="module")
def digits_report():
    return traced_report("zoo:digits-cnn", "fold-bn,lowrank:rank=4:exclude=conv*,dce")


@pytest.fixture(scope="module")
def det_report():
    return traced_report("zoo:ppocr-det", DEFAULT_PIPELINE)


def node_statuses(page: str, svg_id: str) -> list[str]:
    svg = re.search(rf"<svg id='{svg_id}'.*?</svg>", page, re.S).group(0)
    return re.findall(r"<g class='node' data-node='[^']*' data-status='(\w+)'>", svg)


def test_page_draws_every_node(digits_report):
    page = render_report(digits_report)

    changes = {row["node"]: row["status"] for row in digits_report["nodes"]["changes"]}
    before = [changes[state["node"]] for state in digits_report["nodes"]["before"]]
    after = [changes[state["node"]] for state in digits_report["nodes"]["after"]]
    assert node_statuses(page, "graph-before") == before
    assert node_statuses(page, "graph-after") == after
    assert "added" in after
    assert "removed" in before
    assert "added" not in before
    assert "removed" not in after


def test_page_is_self_contained(digits_report):
    page = render_report(digits_report)

    assert "default-src 'none'" in page
    # The only URL is the SVG namespace, which is a name and is never fetched.
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s'\"<>]*", page))
    assert urls == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(?:link|img|iframe)\b|\bsrc=", page)


def test_page_tables_list_passes_and_nodes(digits_report):
    page = render_report(digits_report)

    pass_table = re.search(r"<table class='data' id='pass-table'>.*?</table>", page, re.S)
    node_table = re.search(r"<table class='data' id='node-table'>.*?</table>", page, re.S)
    assert pass_table.group(0).count("<tr>") == 1 + len(digits_report["passes_run"])
    assert node_table.group(0).count("<tr data-status=") == len(
        digits_report["nodes"]["changes"])
    assert "lowrank" in pass_table.group(0)


def test_page_escapes_names(digits_report):
    report = json.loads(json.dumps(digits_report))
    report["model"] = "<script>alert(1)</script>"
    report["nodes"]["before"][0]["node"] = "a'<b>"

    page = render_report(report)

    assert "<script>alert(1)" not in page
    assert "a'<b>" not in page


def test_page_without_node_data_explains(digits_report):
    report = {key: value for key, value in digits_report.items() if key != "nodes"}

    page = render_report(report)

    assert "no per-node data" in page
    assert "id='graph-before'" not in page


def test_layout_keeps_boxes_apart_on_ppocr_det(det_report):
    states = det_report["nodes"]["before"]
    assert len(states) > 300

    positions = layout_graph(states)

    assert set(positions) == {state["node"] for state in states}
    boxes = sorted(positions.values())
    for (x1, y1), (x2, y2) in zip(boxes, boxes[1:]):
        if y1 == y2:
            assert x2 - x1 >= NODE_WIDTH
    by_row: dict[float, list[float]] = {}
    for x, y in positions.values():
        by_row.setdefault(y, []).append(x)
    for xs in by_row.values():
        xs.sort()
        assert all(b - a >= NODE_WIDTH for a, b in zip(xs, xs[1:]))
    for state in states:
        for source in state["sources"]:
            assert positions[source][1] + NODE_HEIGHT <= positions[state["node"]][1]


def test_report_command_writes_page(tmp_path, digits_report, capsys):
    (tmp_path / "report.json").write_text(json.dumps(digits_report))

    code = main(["report", str(tmp_path), "-o", str(tmp_path / "page.html")])

    assert code == 0
    page = (tmp_path / "page.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "id='graph-after'" in page
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "cannot read it as JSON"),
    ('{"model": "x"}', "not a graphcomp report"),
])
def test_report_command_rejects_bad_input(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "report.json").write_text(content)

    code = main(["report", str(tmp_path)])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_report_command_accepts_report_json_path(tmp_path, digits_report, capsys):
    (tmp_path / "report.json").write_text(json.dumps(digits_report))

    code = main(["report", str(tmp_path / "report.json")])

    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_report_command_rejects_other_file(tmp_path, capsys):
    (tmp_path / "graph.txt").write_text("")

    code = main(["report", str(tmp_path / "graph.txt")])

    assert code == 2
    assert "graph.txt is a file; give the output folder" in capsys.readouterr().err


# --- in a real browser ------------------------------------------------------------------------


def run_chromium(url: str, *arguments: str) -> subprocess.CompletedProcess:
    """Run headless chromium on ``url`` with a fresh profile and no network services."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            *arguments, url,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def console_messages(stderr: str) -> list[str]:
    # chromium logs every console message (log, warning, error, uncaught exception) as
    # "INFO:CONSOLE..." on stderr; its own dbus and GPU warnings have other tags.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def check_page_in_chromium(page: Path, report: dict, tmp_path: Path) -> None:
    url = page.resolve().as_uri()

    loaded = run_chromium(url, "--dump-dom")

    assert console_messages(loaded.stderr) == []
    dom = loaded.stdout
    assert 'data-ready="1"' in dom
    assert "data-script-error" not in dom
    for element in ('id="graph-before"', 'id="graph-after"', 'id="pass-table"',
                    'id="node-table"'):
        assert element in dom
    nodes = report["nodes"]
    assert dom.count('class="node"') == len(nodes["before"]) + len(nodes["after"])

    screenshot = tmp_path / "page.png"
    shot = run_chromium(url, "--window-size=1400,1200", f"--screenshot={screenshot}")

    assert console_messages(shot.stderr) == []
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1400, 1200)
    colors = {color for _, color in image.getcolors(maxcolors=1 << 20)}
    assert len(colors) > 50, "the screenshot looks blank"
    present = {row["status"] for row in nodes["changes"]}
    for status in present:
        fill = STATUS_COLORS[status][0]
        rgb = tuple(int(fill[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in colors, f"no {status} node ({fill}) visible in the screenshot"


@needs_chromium
def test_chromium_check_catches_script_error(tmp_path, digits_report):
    page = tmp_path / "broken.html"
    page.write_text(render_report(digits_report).replace(
        'document.documentElement.dataset.ready = "1";', "undefinedFunction();"))

    with pytest.raises(AssertionError, match="Uncaught ReferenceError"):
        check_page_in_chromium(page, digits_report, tmp_path)


@needs_chromium
def test_traced_page_in_chromium(tmp_path, digits_report):
    page = tmp_path / "report.html"
    page.write_text(render_report(digits_report))

    check_page_in_chromium(page, digits_report, tmp_path)


@needs_chromium
@pytest.mark.slow
def test_compiled_page_in_chromium(tmp_path):
    out, dump = tmp_path / "digits", tmp_path / "dump"
    code = main(["compile", "zoo:digits-cnn", "--passes",
                 "fold-bn,lowrank:rank=4:exclude=conv*,dce", "-o", str(out),
                 "--dump-dir", str(dump)])
    assert code == 0
    dumps = sorted(path.name for path in dump.iterdir())
    assert dumps == ["00-input.txt", "01-fold-bn.txt", "02-lowrank.txt", "03-dce.txt"]
    assert (dump / "03-dce.txt").read_text() == (out / "graph.txt").read_text()
    report = json.loads((out / "report.json").read_text())
    assert {row["status"] for row in report["nodes"]["changes"]} >= {"removed", "added"}
    assert "macs" in report["passes_run"][0]
    assert "latency_ms" in report

    check_page_in_chromium(out / "report.html", report, tmp_path)

    # The page that 'graphcomp report' writes from the same report.json is the same page.
    assert write_report(out, tmp_path / "again.html").read_text() == (
        out / "report.html").read_text()
