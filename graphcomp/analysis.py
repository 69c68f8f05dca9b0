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


# Input positions of integer constants that are weights or biases: the int8 weight and int32
# bias of quantized layers, and the int8 tensor of a dequantize (weight-only and embedding
# tables). Scales are float and count anyway; zero points and integer shapes or indices do not.
_INTEGER_PARAM_INPUTS = {
    "qconv2d": (1, 3), "qconv_transpose2d": (1, 3), "qlinear": (1, 3),
    "dynamic_qlinear": (1, 3), "dequantize": (0,),
}


def _param_constants(node: Node) -> list[Constant]:
    integer_positions = _INTEGER_PARAM_INPUTS.get(node.op, ())
    return [
        value for position, value in enumerate(node.inputs)
        if isinstance(value, Constant)
        and (np.issubdtype(value.data.dtype, np.floating) or position in integer_positions)
    ]


def node_params(node: Node) -> int:
    """Elements of the weights and biases read by ``node``: its floating-point constants and
    the integer weights and biases of quantized layers."""
    return sum(value.size for value in _param_constants(node))


def graph_stats(graph: Graph) -> GraphStats:
    constants = graph.constants()
    # Keyed by identity, so that a constant read by several nodes counts once. A float
    # constant returned as a graph output, read by no node, counts too.
    param_sizes = {id(c): c.size for node in graph.nodes for c in _param_constants(node)}
    param_sizes.update({id(c): c.size for c in constants
                        if np.issubdtype(c.data.dtype, np.floating)})
    return GraphStats(
        nodes=len(graph.nodes),
        params=int(sum(param_sizes.values())),
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
