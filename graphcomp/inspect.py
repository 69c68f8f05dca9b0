"""Per-node tables and before/after comparisons of graphs, for ``graphcomp inspect`` and the
HTML report.

Nodes are matched across graphs by name. A node is *kept* when its op, attributes, input and
output types and constant data are unchanged, even if it now reads another producer of the
same type. It is *changed* otherwise, *removed* when its name is gone and *added* when the name
is new. ``PipelineTrace`` records the graph after each pass, so that every removal, addition
and change is attributed to the pass that made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from graphcomp.analysis import graph_stats, node_macs, node_params
from graphcomp.ir import Constant, Graph, Node
from graphcomp.serialize import format_attr

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


# --- per-pass tracing -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    """The computation of one node at one point of a pipeline, and the origin of its inputs.

    ``sources`` names the nodes whose outputs it reads, ``graph_inputs`` the graph inputs it
    reads, and ``weights`` is a digest of its constant inputs' data.
    """

    node: str
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: tuple[tuple[str, str], ...]
    weights: str
    params: int
    macs: int
    created_by: str
    sources: tuple[str, ...]
    graph_inputs: tuple[str, ...]
    graph_output: bool

    def computes_like(self, other: NodeState) -> bool:
        """True when both states compute the same function of their inputs."""
        return (self.op, self.inputs, self.output, self.attrs, self.weights) == (
            other.op, other.inputs, other.output, other.attrs, other.weights)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["attrs"] = dict(self.attrs)
        for key in ("inputs", "sources", "graph_inputs"):
            row[key] = list(row[key])
        return row


class _WeightDigests:
    """Digests of constant arrays, each computed once: passes share unchanged arrays between
    graph copies, so the same array object keeps its digest from pass to pass.

    NOTE: every array seen stays alive until the digests are dropped, so a trace of a pipeline
    that rewrites large weights in several passes keeps each version in memory.
    """

    def __init__(self) -> None:
        # The array is kept alongside its digest so that its id cannot be reused by another.
        self._by_id: dict[int, tuple[np.ndarray, str]] = {}

    def digest(self, data: np.ndarray) -> str:
        entry = self._by_id.get(id(data))
        if entry is None or entry[0] is not data:
            array = np.ascontiguousarray(data)
            hasher = hashlib.blake2b(digest_size=8)
            hasher.update(f"{array.dtype}{array.shape}".encode())
            hasher.update(array.tobytes())
            entry = (data, hasher.hexdigest())
            self._by_id[id(data)] = entry
        return entry[1]


def node_states(graph: Graph, digests: _WeightDigests | None = None) -> dict[str, NodeState]:
    """Return the state of every node of ``graph`` by name, in graph order."""
    digests = digests or _WeightDigests()
    producers = graph.producers()
    input_names = {id(value): value.name for value in graph.inputs}
    output_ids = {id(value) for value in graph.outputs}
    states = {}
    for node in graph.nodes:
        constants = [v for v in node.inputs if isinstance(v, Constant)]
        sources = [producers[v].name for v in node.inputs if v in producers]
        states[node.name] = NodeState(
            node=node.name,
            op=node.op,
            inputs=tuple(("@" if isinstance(v, Constant) else "%") + v.type_str()
                         for v in node.inputs),
            output=" ".join(v.type_str() for v in node.outputs),
            attrs=tuple((key, format_attr(value)) for key, value in sorted(node.attrs.items())
                        if value is not None),
            weights=",".join(digests.digest(c.data) for c in constants),
            params=node_params(node),
            macs=node_macs(node),
            created_by=node.created_by,
            sources=tuple(dict.fromkeys(sources)),
            graph_inputs=tuple(dict.fromkeys(
                input_names[id(v)] for v in node.inputs if id(v) in input_names)),
            graph_output=any(id(v) in output_ids for v in node.outputs),
        )
    return states


@dataclass
class PassStep:
    """The graph after one pass: its node states and totals, and the pass's record (a
    ``PassRecord`` as a dict; None for the input graph)."""

    name: str
    states: dict[str, NodeState]
    totals: dict[str, int]
    record: dict[str, Any] | None


class PipelineTrace:
    """Records the graph before a pipeline and after each pass.

    Give ``trace.after_pass`` to ``PassManager(after_pass=...)``; ``steps[0]`` is the input
    graph and ``steps[i]`` the graph after the i-th pass.
    """

    def __init__(self, graph: Graph):
        self._digests = _WeightDigests()
        self.steps = [PassStep("input", node_states(graph, self._digests), totals(graph), None)]

    def after_pass(self, record, graph: Graph) -> None:
        self.add_step(record.name, graph, asdict(record))

    def add_step(self, name: str, graph: Graph, record: dict[str, Any] | None = None) -> None:
        """Record ``graph`` after a step that is not a pass (such as fine-tuning) when
        ``record`` is None; pass_rows leaves such steps out."""
        self.steps.append(PassStep(name, node_states(graph, self._digests), totals(graph),
                                   record))

    @property
    def before(self) -> dict[str, NodeState]:
        return self.steps[0].states

    @property
    def after(self) -> dict[str, NodeState]:
        return self.steps[-1].states


def node_changes(trace: PipelineTrace) -> list[dict[str, Any]]:
    """Return one row per node of the input or the final graph: its status, what changed, and
    the passes responsible.

    ``passes`` names the pass that removed or added the node, or every pass that changed it.
    Rows follow the input graph's order, then the added nodes in the final graph's order.
    """
    before, after = trace.before, trace.after
    rows = []
    for name in [*before, *(name for name in after if name not in before)]:
        old, new = before.get(name), after.get(name)
        if new is None:
            status = "removed"
        elif old is None:
            status = "added"
        elif old.computes_like(new):
            status = "kept"
        else:
            status = "changed"
        rows.append({
            "node": name,
            "status": status,
            "op": new.op if new is not None else old.op,
            "output": [state.output if state else None for state in (old, new)],
            "params": [state.params if state else None for state in (old, new)],
            "macs": [state.macs if state else None for state in (old, new)],
            "changes": describe_changes(old, new),
            "passes": _responsible_passes(trace, name, status),
            "created_by": new.created_by if new is not None else None,
        })
    return rows


def describe_changes(old: NodeState | None, new: NodeState | None) -> list[str]:
    """Describe in short phrases how ``new`` differs from ``old`` (empty when nothing did)."""
    if old is None or new is None:
        return []
    changes = []
    if old.op != new.op:
        changes.append(f"op: {old.op} -> {new.op}")
    if old.output != new.output:
        changes.append(f"output: {old.output} -> {new.output}")
    # Only constant inputs are listed: a data input's type changes with its producer's output,
    # which that producer's row already shows.
    old_constants = tuple(item for item in old.inputs if item.startswith("@"))
    new_constants = tuple(item for item in new.inputs if item.startswith("@"))
    if old_constants != new_constants:
        changes.append(f"constants: {_list_difference(old_constants, new_constants)}")
    old_attrs, new_attrs = dict(old.attrs), dict(new.attrs)
    for key in sorted(old_attrs.keys() | new_attrs.keys()):
        if old_attrs.get(key) != new_attrs.get(key):
            changes.append(f"{key}: {old_attrs.get(key, '-')} -> {new_attrs.get(key, '-')}")
    if old.weights != new.weights and old_constants == new_constants:
        changes.append("weight values")
    if old.params != new.params:
        changes.append(f"params: {old.params:,} -> {new.params:,}")
    if old.macs != new.macs:
        changes.append(f"MACs: {old.macs:,} -> {new.macs:,}")
    if old.sources != new.sources or old.graph_inputs != new.graph_inputs:
        changes.append("rewired")
    return changes


def _list_difference(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    """Write the items that were dropped (-) and added (+), counted as multisets; the two
    whole lists when only their order differs."""
    dropped, added = list(old), []
    for item in new:
        if item in dropped:
            dropped.remove(item)
        else:
            added.append(item)
    if not dropped and not added:
        return f"{' '.join(old)} -> {' '.join(new)}"
    return " ".join([*(f"-{item}" for item in dropped), *(f"+{item}" for item in added)])


def _responsible_passes(trace: PipelineTrace, name: str, status: str) -> list[str]:
    """Name the passes that removed, added or changed node ``name``.

    A node removed and later re-added under the same name counts from its last removal or
    addition, so that the final status is the one explained.
    """
    responsible = []
    for previous, step in zip(trace.steps, trace.steps[1:]):
        old, new = previous.states.get(name), step.states.get(name)
        if status == "removed" and old is not None and new is None:
            responsible = [step.name]
        elif status == "added" and old is None and new is not None:
            responsible = [step.name]
        elif status == "changed" and old is not None and new is not None \
                and not old.computes_like(new):
            responsible.append(step.name)
    return list(dict.fromkeys(responsible))


def pass_rows(trace: PipelineTrace) -> list[dict[str, Any]]:
    """Return one row per pass: its record (time, node counts, max error) with the totals of
    the graph after it and the nodes it removed, added and changed."""
    rows = []
    for previous, step in zip(trace.steps, trace.steps[1:]):
        if step.record is None:
            continue
        old, new = previous.states, step.states
        row = dict(step.record)
        row.update({key: step.totals[key] for key in ("params", "macs", "bytes")})
        row["removed"] = [name for name in old if name not in new]
        row["added"] = [name for name in new if name not in old]
        row["changed_nodes"] = [
            name for name in new if name in old and not old[name].computes_like(new[name])
        ]
        rows.append(row)
    return rows


def trace_report(trace: PipelineTrace) -> dict[str, Any]:
    """Return the trace as JSON-ready data: both graphs node by node (with their edges) and
    the per-node comparison."""
    return {
        "before": [state.to_dict() for state in trace.before.values()],
        "after": [state.to_dict() for state in trace.after.values()],
        "changes": node_changes(trace),
    }
