"""Graph statistics (params, MACs, bytes) and a networkx view for analyses."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx
import numpy as np

from graphcomp.ir import Constant, Graph, Node
from graphcomp.ops import get_op


@dataclass(frozen=True)
class GraphStats:
    """Size and cost of a graph: node count, parameter count, MACs per run, weight bytes."""

    nodes: int
    params: int
    macs: int
    bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def node_macs(node: Node) -> int:
    return int(get_op(node.op).macs(node))


def node_params(node: Node) -> int:
    """Elements of floating-point constants read by ``node`` (weights and biases)."""
    return sum(
        v.size for v in node.inputs
        if isinstance(v, Constant) and np.issubdtype(v.data.dtype, np.floating)
    )


def graph_stats(graph: Graph) -> GraphStats:
    constants = graph.constants()
    params = sum(
        c.size for c in constants if np.issubdtype(c.data.dtype, np.floating)
    )
    return GraphStats(
        nodes=len(graph.nodes),
        params=int(params),
        macs=int(sum(node_macs(n) for n in graph.nodes)),
        bytes=int(sum(c.nbytes for c in constants)),
    )


def to_networkx(graph: Graph) -> nx.MultiDiGraph:
    """A networkx view: one graph node per IR node (keyed by name, with ``node`` set to the IR
    node), one edge per value passed from producer to consumer (``value`` is the Value).
    Graph inputs and constants are not nodes; analyses find them through the IR."""
    view = nx.MultiDiGraph(name=graph.name)
    for node in graph.nodes:
        view.add_node(node.name, node=node, op=node.op)
    producers = graph.producers()
    for node in graph.nodes:
        for value in node.inputs:
            parent = producers.get(value)
            if parent is not None:
                view.add_edge(parent.name, node.name, key=value.name, value=value)
    return view
