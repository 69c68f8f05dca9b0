"""The HTML report of a compile: one self-contained page made from report.json.

The page draws the graph before and after the passes side by side, with nodes colored by what
happened to them, and shows a per-pass table, a per-node table and bar charts of size, latency
and error. Everything is inline (CSS, SVG, a few lines of JavaScript), and a Content Security
Policy forbids every fetch, so the page opens offline and never touches the network.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import networkx as nx

from graphcomp.errors import GraphcompError
from graphcomp.serialize import write_text_atomic

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

# Fill and stroke of a node by status; the browser test looks for these fills in a screenshot.
STATUS_COLORS = {
    "kept": ("#e3e8ec", "#78909c"),
    "changed": ("#ffc940", "#b07d00"),
    "added": ("#4fc36a", "#1f7a35"),
    "removed": ("#f0605a", "#a11d18"),
}
BEFORE_COLOR, AFTER_COLOR = "#8da2b5", "#3b6ea8"

NODE_WIDTH, NODE_HEIGHT = 172, 38
LAYER_GAP, NODE_GAP, MARGIN = 26, 14, 12
BARYCENTER_SWEEPS = 4


class ReportError(GraphcompError):
    """Error for a report.json that is missing, unreadable or not written by graphcomp."""


def write_report(out_dir: Path, output: Path | None = None) -> Path:
    """Render ``out_dir``/report.json into an HTML page, by default ``out_dir``/report.html,
    written atomically; return its path. ``out_dir`` may also name the report.json file."""
    out_dir = Path(out_dir)
    if out_dir.is_file():
        if out_dir.name != REPORT_JSON:
            raise ReportError(f"{out_dir} is a file; give the output folder of 'graphcomp "
                              f"compile' (or its {REPORT_JSON})")
        out_dir = out_dir.parent
    source = out_dir / REPORT_JSON
    try:
        report = json.loads(source.read_text())
    except FileNotFoundError:
        raise ReportError(
            f"{source} not found; give the output folder of 'graphcomp compile'"
        ) from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{source}: cannot read it as JSON ({exc})") from None
    if not isinstance(report, dict) or "graph" not in report:
        raise ReportError(f"{source}: not a graphcomp report (no 'graph' totals)")
    target = Path(output) if output is not None else out_dir / REPORT_HTML
    if target.is_dir():
        raise ReportError(f"cannot write {target}: it is a folder; give a file name such as "
                          f"{target / REPORT_HTML}")
    try:
        write_text_atomic(target, render_report(report))
    except OSError as exc:
        raise ReportError(f"cannot write {target} ({exc.strerror or exc})") from None
    return target


def render_report(report: dict[str, Any]) -> str:
    """Return the whole HTML page for a report.json dict."""
    title = f"graphcomp report: {report.get('model', '?')}"
    sections = [
        _summary_section(report),
        _graphs_section(report),
        _charts_section(report),
        _pass_section(report),
        _node_section(report),
    ]
    return _PAGE.format(
        title=_text(title), style=_STYLE, script=_SCRIPT, body="\n".join(sections),
    )


# --- sections ---------------------------------------------------------------------------------


def _summary_section(report: dict[str, Any]) -> str:
    before, after = report["graph"]["before"], report["graph"]["after"]
    facts = [
        ("model", report.get("model")), ("target", report.get("target")),
        ("passes", report.get("passes") or "none"), ("artifact", report.get("artifact")),
        ("graphcomp", report.get("graphcomp_version")),
        ("data", (report.get("data") or {}).get("source")),
    ]
    rows = "".join(f"<tr><th>{_text(key)}</th><td>{_text(value)}</td></tr>"
                   for key, value in facts if value is not None)
    cells = []
    for key, label in (("nodes", "nodes"), ("params", "params"), ("macs", "MACs"),
                       ("bytes", "weight bytes")):
        cells.append(f"<div class='figure'><span>{label}</span><b>{before[key]:,} &rarr; "
                     f"{after[key]:,}</b><i>{_percent_change(before[key], after[key])}</i></div>")
    return (f"<section id='summary'><h1>{_text(report.get('model', 'model'))}</h1>"
            f"<table class='facts'>{rows}</table><div class='figures'>{''.join(cells)}</div>"
            "</section>")


def _graphs_section(report: dict[str, Any]) -> str:
    nodes = report.get("nodes")
    if not nodes:
        return ("<section id='graphs'><h2>Graphs</h2><p class='note'>This report.json has no "
                "per-node data (it was written by an older graphcomp); compile again to see "
                "the graphs.</p></section>")
    status = {row["node"]: row["status"] for row in nodes["changes"]}
    legend = "".join(
        f"<span class='swatch' style='background:{fill};border-color:{stroke}'></span>{name} "
        f"({sum(1 for s in status.values() if s == name)})"
        for name, (fill, stroke) in STATUS_COLORS.items()
    )
    panes = []
    for side, label in (("before", "before the passes"), ("after", "after the passes")):
        states = nodes[side]
        svg = draw_graph(states, status, f"graph-{side}")
        panes.append(f"<div class='pane'><h3>{len(states)} nodes {label}</h3>"
                     f"<div class='scroll' id='scroll-{side}'>{svg}</div></div>")
    return (f"<section id='graphs'><h2>Graphs</h2><p class='legend'>{legend}"
            "<label><input type='checkbox' id='sync-scroll' checked> scroll together</label>"
            "</p><p class='note'>Hover a node for its op, types, params, MACs and the pass "
            "responsible; a thick border marks a node that produces a graph output.</p>"
            f"<div class='panes'>{''.join(panes)}</div></section>")


def _charts_section(report: dict[str, Any]) -> str:
    before, after = report["graph"]["before"], report["graph"]["after"]
    charts = [
        bar_chart(label, [("before", before[key], BEFORE_COLOR),
                          ("after", after[key], AFTER_COLOR)])
        for key, label in (("params", "params"), ("bytes", "weight bytes"), ("macs", "MACs"))
    ]
    latency = report.get("latency_ms") or {}
    if "skipped" not in latency and latency:
        bars = [(name, value, AFTER_COLOR if name == "graphcomp" else BEFORE_COLOR)
                for name, value in latency.items()]
        charts.append(bar_chart("latency (ms)", bars, decimals=3))
    drift = report.get("drift") or {}
    if "accuracy" in drift:
        charts.append(bar_chart("accuracy (%)", [
            ("original", 100 * drift["reference_accuracy"], BEFORE_COLOR),
            ("compiled", 100 * drift["accuracy"], AFTER_COLOR),
        ], decimals=2))
    errors = [("drift", drift.get("relative_error")),
              ("verify", (report.get("verify") or {}).get("relative_error"))]
    errors += [(record["name"], record.get("max_abs_error"))
               for record in report.get("passes_run", [])]
    charts.append(error_chart("relative error (log scale)", errors))
    charts += _per_pass_charts(report)
    return (f"<section id='charts'><h2>Size, latency and error</h2>"
            f"<div class='charts'>{''.join(charts)}</div></section>")


def _per_pass_charts(report: dict[str, Any]) -> list[str]:
    records = report.get("passes_run") or []
    if not records or "macs" not in records[0]:
        return []
    before = report["graph"]["before"]
    charts = []
    for key, label in (("nodes", "nodes after each pass"), ("params", "params after each pass"),
                       ("macs", "MACs after each pass")):
        field = "nodes_after" if key == "nodes" else key
        bars = [("input", before[key], BEFORE_COLOR)]
        bars += [(record["name"], record[field], AFTER_COLOR) for record in records]
        charts.append(bar_chart(label, bars))
    return charts


def _pass_section(report: dict[str, Any]) -> str:
    records = report.get("passes_run") or []
    header = ("<tr><th>#</th><th>pass</th><th>seconds</th><th>nodes</th><th>params</th>"
              "<th>MACs</th><th>weight bytes</th><th>max error</th><th>removed</th>"
              "<th>added</th><th>changed</th><th>details</th></tr>")
    rows = []
    for number, record in enumerate(records, start=1):
        error = record.get("max_abs_error")
        cells = [
            str(number), _text(record["name"]), f"{record['seconds']:.3f}",
            f"{record['nodes_before']} &rarr; {record['nodes_after']}",
            *(f"{record[key]:,}" if key in record else "-" for key in ("params", "macs", "bytes")),
            "-" if error is None else _text(_format_error(error)),
            *(_name_list(record.get(key)) for key in ("removed", "added", "changed_nodes")),
            _text(", ".join(f"{k}={v}" for k, v in (record.get("details") or {}).items())),
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    body = "".join(rows) or "<tr><td colspan='12'>no passes ran</td></tr>"
    return (f"<section id='passes'><h2>Passes</h2><table class='data' id='pass-table'>"
            f"{header}{body}</table></section>")


def _node_section(report: dict[str, Any]) -> str:
    changes = (report.get("nodes") or {}).get("changes")
    if not changes:
        return ""
    options = "".join(f"<option value='{name}'>{name}</option>" for name in STATUS_COLORS)
    header = ("<tr><th>node</th><th>status</th><th>op</th><th>output</th><th>params</th>"
              "<th>MACs</th><th>pass</th><th>what changed</th></tr>")
    rows = []
    for row in changes:
        fill = STATUS_COLORS[row["status"]][0]
        cells = [
            _text(row["node"]),
            f"<span class='swatch' style='background:{fill}'></span>{row['status']}",
            _text(row["op"]), _text(_pair(row["output"])), _text(_pair(row["params"], ",")),
            _text(_pair(row["macs"], ",")), _text(", ".join(row["passes"])),
            _text("; ".join(row["changes"])),
        ]
        rows.append(f"<tr data-status='{row['status']}'>"
                    + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return (f"<section id='nodes'><h2>Nodes</h2><p>Show <select id='status-filter'>"
            f"<option value=''>all</option>{options}</select></p>"
            f"<table class='data' id='node-table'>{header}{''.join(rows)}</table></section>")


# --- graph drawing ----------------------------------------------------------------------------


def layout_graph(states: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Place each node (by name) at the top-left corner of its box, in layers from top to bottom.

    Steps: 1. layer each node by its longest path from the graph inputs, and move a node that
    reads no other node (only constants) to just above its first reader. 2. Order each layer by
    the barycenter of its neighbors, sweeping down and up a few times to reduce edge crossings.
    3. Put each node under the mean x of its producers, pushed right to keep boxes apart.
    """
    graph = nx.DiGraph()
    graph.add_nodes_from(state["node"] for state in states)
    graph.add_edges_from((source, state["node"]) for state in states
                         for source in state["sources"] if source in graph)
    layer = {}
    for depth, generation in enumerate(nx.topological_generations(graph)):
        layer.update((name, depth) for name in generation)
    for state in states:
        name = state["node"]
        if graph.in_degree(name) == 0 and not state["graph_inputs"] and graph.out_degree(name):
            layer[name] = min(layer[child] for child in graph.successors(name)) - 1
    # A moved node's reader has a producer, so it sits in layer 1 or deeper: no layer is < 0.
    layers: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for state in states:  # graph order is the starting order within a layer
        layers[layer[state["node"]]].append(state["node"])
    _order_layers(graph, layers)
    return _assign_coordinates(graph, layers)


def _order_layers(graph: nx.DiGraph, layers: list[list[str]]) -> None:
    def sort_by_neighbors(row: list[str], neighbors, rank: dict[str, int]) -> None:
        def key(name: str) -> float:
            ranks = [rank[other] for other in neighbors(name) if other in rank]
            return sum(ranks) / len(ranks) if ranks else rank[name]

        row.sort(key=key)
        rank.update((name, index) for index, name in enumerate(row))

    rank = {name: index for row in layers for index, name in enumerate(row)}
    for _ in range(BARYCENTER_SWEEPS):
        for row in layers[1:]:
            sort_by_neighbors(row, graph.predecessors, rank)
        for row in reversed(layers[:-1]):
            sort_by_neighbors(row, graph.successors, rank)


def _assign_coordinates(graph: nx.DiGraph, layers: list[list[str]]):
    step = NODE_WIDTH + NODE_GAP
    positions: dict[str, tuple[float, float]] = {}
    for depth, row in enumerate(layers):
        y = MARGIN + depth * (NODE_HEIGHT + LAYER_GAP)
        next_free = MARGIN
        for index, name in enumerate(row):
            parents = [positions[p][0] for p in graph.predecessors(name) if p in positions]
            preferred = sum(parents) / len(parents) if parents else MARGIN + index * step
            x = max(preferred, next_free)
            positions[name] = (x, y)
            next_free = x + step
    return positions


def draw_graph(states: Sequence[dict[str, Any]], status: dict[str, str], element_id: str) -> str:
    """Return an inline SVG drawing of one graph, nodes filled by their status."""
    positions = layout_graph(states)
    width = max((x for x, _ in positions.values()), default=0) + NODE_WIDTH + MARGIN
    height = max((y for _, y in positions.values()), default=0) + NODE_HEIGHT + MARGIN
    edges, boxes = [], []
    for state in states:
        x, y = positions[state["node"]]
        for source in state["sources"]:
            if source in positions:
                edges.append(_edge_path(positions[source], (x, y)))
        boxes.append(_node_box(state, status.get(state["node"], "kept"), x, y))
    return (f"<svg id='{element_id}' class='graph' xmlns='http://www.w3.org/2000/svg' "
            f"width='{width:.0f}' height='{height:.0f}' viewBox='0 0 {width:.0f} {height:.0f}'>"
            f"<g class='edges'>{''.join(edges)}</g><g class='nodes'>{''.join(boxes)}</g></svg>")


def _edge_path(start: tuple[float, float], end: tuple[float, float]) -> str:
    x1, y1 = start[0] + NODE_WIDTH / 2, start[1] + NODE_HEIGHT
    x2, y2 = end[0] + NODE_WIDTH / 2, end[1]
    bend = max((y2 - y1) / 2, LAYER_GAP / 2)
    return (f"<path d='M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + bend:.0f} {x2:.0f},{y2 - bend:.0f} "
            f"{x2:.0f},{y2:.0f}'/>")


def _node_box(state: dict[str, Any], status: str, x: float, y: float) -> str:
    fill, stroke = STATUS_COLORS[status]
    border = 3 if state["graph_output"] else 1
    tooltip = "\n".join([
        f"{state['node']} ({state['op']}): {status}",
        f"inputs: {' '.join(state['inputs'])}",
        f"output: {state['output']}",
        f"params {state['params']:,}, MACs {state['macs']:,}",
        f"created by: {state['created_by']}",
        *([f"reads graph inputs: {', '.join(state['graph_inputs'])}"]
          if state["graph_inputs"] else []),
    ])
    return (f"<g class='node' data-node='{_text(state['node'])}' data-status='{status}'>"
            f"<title>{_text(tooltip)}</title>"
            f"<rect x='{x:.0f}' y='{y:.0f}' width='{NODE_WIDTH}' height='{NODE_HEIGHT}' rx='5' "
            f"fill='{fill}' stroke='{stroke}' stroke-width='{border}'/>"
            f"<text x='{x + 7:.0f}' y='{y + 15:.0f}' class='op'>{_text(_clip(state['op'], 24))}"
            f"</text><text x='{x + 7:.0f}' y='{y + 30:.0f}' class='name'>"
            f"{_text(_clip(state['node'], 28))}</text></g>")


# --- charts -----------------------------------------------------------------------------------


CHART_WIDTH, BAR_HEIGHT, LABEL_WIDTH, VALUE_WIDTH = 380, 20, 120, 96


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]], decimals: int = 0) -> str:
    """Return an SVG chart of horizontal bars (label, value, color) on a linear scale from 0."""
    largest = max((abs(value) for _, value, _ in bars), default=0) or 1
    span = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    rows = []
    for index, (label, value, color) in enumerate(bars):
        length = span * abs(value) / largest
        rows.append(_chart_row(index, label, length, color, f"{value:,.{decimals}f}"))
    return _chart(title, rows)


def error_chart(title: str, errors: Sequence[tuple[str, float | str | None]]) -> str:
    """Return an SVG chart of errors on a log scale from 1e-10 to 1 (bars are clipped to it)."""
    span = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    rows = []
    shown = [(label, _as_float(value)) for label, value in errors if value is not None]
    for index, (label, value) in enumerate(shown):
        if value > 0 and math.isfinite(value):
            fraction = min(max((math.log10(value) + 10) / 10, 0.0), 1.0)
        else:
            fraction = 1.0 if not value == 0 else 0.0  # infinity or NaN fills the bar
        rows.append(_chart_row(index, label, span * fraction, AFTER_COLOR, _format_error(value)))
    return _chart(title, rows)


def _chart_row(index: int, label: str, length: float, color: str, value_text: str) -> str:
    y = 26 + index * (BAR_HEIGHT + 6)
    return (f"<text x='0' y='{y + 14}' class='label'>{_text(_clip(label, 18))}</text>"
            f"<rect x='{LABEL_WIDTH}' y='{y}' width='{length:.1f}' height='{BAR_HEIGHT}' "
            f"fill='{color}'/><text x='{LABEL_WIDTH + length + 4:.1f}' y='{y + 14}' "
            f"class='value'>{_text(value_text)}</text>")


def _chart(title: str, rows: list[str]) -> str:
    height = 32 + len(rows) * (BAR_HEIGHT + 6)
    return (f"<svg class='chart' xmlns='http://www.w3.org/2000/svg' width='{CHART_WIDTH}' "
            f"height='{height}'><text x='0' y='16' class='title'>{_text(title)}</text>"
            f"{''.join(rows)}</svg>")


# --- text helpers -----------------------------------------------------------------------------


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "\u2026"


def _as_float(value: float | str) -> float:
    # report.json writes NaN and infinity as the strings "nan", "inf" and "-inf".
    return float(value)


def _format_error(value: float | str) -> str:
    value = _as_float(value)
    return "0" if value == 0 else f"{value:.3g}"


def _percent_change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def _pair(values: Sequence[Any], separator: str = "") -> str:
    def show(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:,}" if separator and isinstance(value, int) else str(value)

    old, new = values
    return show(old) if old == new else f"{show(old)} -> {show(new)}"


def _name_list(names: Sequence[str] | None) -> str:
    if not names:
        return "0" if names is not None else "-"
    shown = ", ".join(names[:6]) + (", \u2026" if len(names) > 6 else "")
    return f"{len(names)} <small>{_text(shown)}</small>"


# --- page -------------------------------------------------------------------------------------


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #1d2630; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 24px 0 8px; }
h3 { font-size: 14px; margin: 4px 0; }
table.facts th { text-align: left; padding-right: 12px; color: #52606d; font-weight: 600; }
.figures { display: flex; gap: 12px; margin: 12px 0; flex-wrap: wrap; }
.figure { border: 1px solid #cbd2d9; border-radius: 6px; padding: 8px 12px; min-width: 180px; }
.figure span { display: block; color: #52606d; } .figure i { color: #52606d; margin-left: 6px; }
.panes { display: flex; gap: 12px; }
.pane { flex: 1 1 50%; min-width: 0; }
.scroll { max-height: 75vh; overflow: auto; border: 1px solid #cbd2d9; border-radius: 6px; }
svg.graph .edges path { fill: none; stroke: #8796a5; stroke-width: 1.2; }
svg.graph text.op { font: 600 12px system-ui, sans-serif; fill: #1d2630; }
svg.graph text.name { font: 10px ui-monospace, monospace; fill: #33404d; }
svg.chart text { font: 12px system-ui, sans-serif; fill: #1d2630; }
svg.chart text.title { font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #52606d;
          margin: 0 4px 0 10px; vertical-align: -1px; }
table.data { border-collapse: collapse; font-size: 12px; }
table.data th, table.data td { border: 1px solid #d9e0e6; padding: 3px 6px; text-align: left;
                               vertical-align: top; }
table.data th { background: #f0f3f6; position: sticky; top: 0; }
table.data small { color: #52606d; }
#node-table td:nth-child(2) { white-space: nowrap; }
.note { color: #52606d; }
"""

# Errors are recorded on the root element, so a test can read them from the DOM as well as
# from the browser's console.
_SCRIPT = """
document.getElementById("status-filter")?.addEventListener("change", (event) => {
  const chosen = event.target.value;
  for (const row of document.querySelectorAll("#node-table tr[data-status]")) {
    row.hidden = chosen !== "" && row.dataset.status !== chosen;
  }
});
const panes = [document.getElementById("scroll-before"), document.getElementById("scroll-after")];
let syncing = false;
for (const [index, pane] of panes.entries()) {
  pane?.addEventListener("scroll", () => {
    const other = panes[1 - index];
    if (syncing || !other || !document.getElementById("sync-scroll").checked) return;
    syncing = true;
    const ratio = pane.scrollTop / Math.max(pane.scrollHeight - pane.clientHeight, 1);
    other.scrollTop = ratio * (other.scrollHeight - other.clientHeight);
    requestAnimationFrame(() => { syncing = false; });
  });
}
document.documentElement.dataset.ready = "1";
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<script>
window.addEventListener("error", (event) => {{
  document.documentElement.dataset.scriptError = String(event.message);
}});
</script>
<style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""
