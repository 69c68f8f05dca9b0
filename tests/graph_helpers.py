"""Helpers shared by several test modules: a graph builder and the references that the pass
tests compare against (the masked reference of pruning, full-rank low-rank chains)."""

from __future__ import annotations

import numpy as np

from graphcomp.backends.torch_export import to_torch
from graphcomp.dependency import analyze_channels
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.passes.lowrank import (
    DecomposeLowRank, _Target, emit_chain, factorize, find_layers, fit_cp,
)
from graphcomp.passes.prune import masked_reference, remove_units
from graphcomp.patterns import Match, replace_match
from graphcomp.pipeline import PassContext, available_passes
from graphcomp.shapes import infer_node
from graphcomp.verifier import verify_graph


class Builder:
    """Builds a graph node by node, inferring each output's shape."""

    def __init__(self, seed: int = 0):
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self.rng = np.random.default_rng(seed)

    def input(self, name: str, shape, dtype: str = "float32") -> Value:
        value = Value(name, tuple(shape), dtype)
        self.inputs.append(value)
        return value

    def const(self, name: str, data) -> Constant:
        return Constant(name, np.asarray(data))

    def random(self, name: str, shape, low: float = -1.0, high: float = 1.0) -> Constant:
        return Constant(name, self.rng.uniform(low, high, shape).astype(np.float32))

    def add(self, op: str, inputs, name: str, out: str | None = None, **attrs) -> Value:
        output = Value(out or name, ())
        node = Node(name, op, list(inputs), [output], attrs)
        (shape, dtype), = infer_node(node)
        output.shape, output.dtype = tuple(shape), dtype
        self.nodes.append(node)
        return output

    def graph(self, *outputs: Value) -> Graph:
        graph = Graph("test", self.inputs, list(outputs), self.nodes)
        verify_graph(graph)
        return graph


def run_prune(graph: Graph, feeds=None, **options) -> tuple[Graph, dict]:
    """Run the prune pass on a copy of ``graph``; return the copy and the pass details."""
    result = graph.copy()
    outcome = available_passes()["prune"](**options).run(result, PassContext(feeds=feeds))
    verify_graph(result)
    return result, outcome.details


def torch_params(graph: Graph) -> int:
    """Parameters as PyTorch counts them (weights, biases, batch-norm scale and shift)."""
    return sum(p.numel() for p in to_torch(graph).parameters())


def kept_rows(pruned: np.ndarray, original: np.ndarray) -> list[int]:
    """Indices of the rows of ``original`` that ``pruned`` kept, matched exactly, in order."""
    flat = original.reshape(original.shape[0], -1)
    kept = []
    for row in pruned.reshape(pruned.shape[0], -1):
        kept.append(int(np.flatnonzero((flat == row).all(axis=1))[0]))
    return kept


def prune_with_reference(graph: Graph, choose) -> tuple[Graph, Graph]:
    """Remove the units that ``choose(analysis)`` returns from a copy of ``graph``; return the
    pruned copy and its masked reference."""
    work = graph.copy()
    analysis = analyze_channels(work)
    removed = choose(analysis)
    reference = masked_reference(work, analysis, removed)
    remove_units(work, analysis, removed)
    verify_graph(work)
    return work, reference


def run_lowrank(graph: Graph, **options):
    """Run the lowrank pass on a copy of ``graph``; return the copy and the PassResult."""
    result_graph = graph.copy()
    result = DecomposeLowRank(**options).run(result_graph, PassContext())
    verify_graph(result_graph)
    return result_graph, result


def decompose_without_mac_check(graph: Graph, method: str, criterion: str, value,
                                skip_grouped: bool = False) -> Graph:
    """Replace every layer of a copy of ``graph`` by its chain, even when the chain has more
    MACs (full rank never saves MACs, so the pass itself would leave the layer alone).
    Matrices (linear, matmul, 1x1 convs) get SVD for any ``method``, as in the pass.
    ``skip_grouped`` leaves grouped and depthwise convs alone, as the pass does."""
    result = graph.copy()
    target = _Target(criterion, value)
    for layer in find_layers(result):
        if skip_grouped and layer.is_conv and int(layer.node.attrs.get("groups", 1)) != 1:
            continue
        layer_method = "svd" if layer.is_matrix else method
        if layer_method == "cp":
            factors, _ = fit_cp(layer, target, max_rank=10**9)
        else:
            factors = factorize(layer, layer_method, target)
        nodes = emit_chain(result, layer, factors.cast(layer.node.inputs[1].dtype), "lowrank")
        assert replace_match(result, Match(layer.node, [layer.node]), nodes)
    verify_graph(result)
    return result
