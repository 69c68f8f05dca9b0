"""Per-node tables and before/after comparisons of graphs, for ``graphcomp inspect``."""

from __future__ import annotations

from typing import Any

from graphcomp.analysis import graph_stats, node_macs, node_params
from graphcomp.ir import Constant, Graph, Node


def node_rows(graph: Graph) -> list[dict[str, Any]]:
    """Return one row per node: name, op, input and output types, params, MACs, the pass that made it."""
    rows = []
    for node in graph.nodes:
        rows.append({
            "node": node.name,
            "op": node.op,
            "inputs": [
                ("@" if isinstance(v, Constant) else "%") + v.type_str() for v in node.inputs
            ],
            "output": " ".join(v.type_str() for v in node.outputs),
            "params": node_params(node),
            "macs": node_macs(node),
            "created_by": node.created_by,
        })
    return rows


def totals(graph: Graph) -> dict[str, int]:
    return graph_stats(graph).to_dict()


def _signature(node: Node) -> tuple:
    return (node.op, tuple(v.type_str() for v in node.inputs),
            tuple(v.type_str() for v in node.outputs), repr(sorted(node.attrs.items())))


def compare_graphs(before: Graph, after: Graph) -> dict[str, Any]:
    """List which nodes (by name) a pipeline removed, added or changed, and the totals before and
    after as (before, after) pairs."""
    old = {node.name: node for node in before.nodes}
    new = {node.name: node for node in after.nodes}
    removed = [name for name in old if name not in new]
    added = [
        {"node": name, "op": new[name].op, "created_by": new[name].created_by}
        for name in new if name not in old
    ]
    changed = [
        {"node": name, "op": new[name].op}
        for name in new if name in old and _signature(old[name]) != _signature(new[name])
    ]
    old_totals, new_totals = totals(before), totals(after)
    return {
        "removed": removed,
        "added": added,
        "changed": changed,
        "totals": {key: (old_totals[key], new_totals[key]) for key in old_totals},
    }
