"""Importance criteria for channel pruning: one score per unit of each channel group.

A higher score means more important; pruning removes the units with the lowest scores. The
criteria, named as the ``prune`` pass's ``criterion`` option takes them:

- ``l1``: for each layer whose weights the unit owns (filter rows of the layers that write
  its channels, input columns of the layers that read them), the L1 norm of that part of the
  weights, summed over the layers.
- ``l2``: the same with the L2 norm of each layer's part.
- ``bn``: the sum of |gamma| of the batch_norm nodes over the unit's channels. A group without
  a batch_norm has no score (None), so this needs the graph before ``fold-bn``.
- ``taylor``: the first-order Taylor estimate of how much the output changes when the unit's
  channels are removed: the sum of |activation * gradient| over the outputs of the layers that
  write them, on calibration feeds. The loss is the sum of squares of the float graph outputs.
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping

import numpy as np
import torch

from graphcomp.dependency import ChannelAnalysis, is_layer
from graphcomp.errors import OptionError
from graphcomp.executor import check_feeds, run_torch
from graphcomp.ir import Constant, Node, Value

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn", "taylor")

GroupScores = list["np.ndarray | None"]


def unit_scores(
    analysis: ChannelAnalysis,
    criterion: str,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> GroupScores:
    """Return the scores of the units of each group, indexed like ``analysis.groups``.

    An entry is None for a group that the criterion cannot score (``bn`` on a group without a
    batch_norm). Raises OptionError for an unknown criterion, ``bn`` on a graph without
    batch_norm nodes, and ``taylor`` without feeds or with a zero gradient.
    """
    if criterion in ("l1", "l2"):
        totals = _norm_totals(analysis, 1 if criterion == "l1" else 2)
        return _split(analysis, totals, None)
    if criterion == "bn":
        totals, scored = _batch_norm_totals(analysis)
        return _split(analysis, totals, scored)
    if criterion == "taylor":
        return _split(analysis, _taylor_totals(analysis, feeds), None)
    raise OptionError(f"unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")


def _split(analysis: ChannelAnalysis, totals: np.ndarray, scored: np.ndarray | None):
    result: GroupScores = []
    for group, offset in zip(analysis.groups, analysis.unit_offsets.tolist()):
        if scored is not None and not scored[group.index]:
            result.append(None)
        else:
            result.append(totals[offset:offset + group.units].copy())
    return result


# --- weight norms -------------------------------------------------------------------------------


def weight_parts(analysis: ChannelAnalysis) -> Iterator[tuple[Value, np.ndarray]]:
    """Yield (value, matrix): row ``i`` of the matrix is the part of a layer's weight that
    position ``i`` of the tracked ``value`` owns, as a filter (output side) or as the weights
    that read it (input side)."""
    axes = analysis.axes
    for node in analysis.graph.nodes:
        if not is_layer(node):
            continue
        for value, matrix in _layer_parts(node):
            if axes.get(value) == _read_axis(node, value):
                yield value, matrix


def _read_axis(node: Node, value: Value) -> int:
    # The dim of ``value`` that the layer's weight indexes: channels of NCHW, features last.
    return 1 if node.op in ("conv2d", "conv_transpose2d") else value.rank - 1


def _layer_parts(node: Node) -> Iterator[tuple[Value, np.ndarray]]:
    x, out = node.inputs[0], node.outputs[0]
    weight = np.asarray(node.inputs[1].data, dtype=np.float64)
    groups = int(node.attrs.get("groups", 1))
    if node.op == "conv2d":  # [O, C / groups, kH, kW]
        out_channels, in_per_group = weight.shape[:2]
        yield out, weight.reshape(out_channels, -1)
        if groups == 1:
            yield x, weight.swapaxes(0, 1).reshape(in_per_group, -1)
        elif in_per_group > 1:  # input k * in_per_group + i reads column i of group k's rows
            grouped = weight.reshape(groups, out_channels // groups, in_per_group, -1)
            yield x, grouped.transpose(0, 2, 1, 3).reshape(groups * in_per_group, -1)
        # Depthwise: the filter rows already cover the input channel of the same unit.
    elif node.op == "conv_transpose2d":  # [C, O / groups, kH, kW]
        in_channels, out_per_group = weight.shape[:2]
        yield x, weight.reshape(in_channels, -1)
        if groups == 1:
            yield out, weight.swapaxes(0, 1).reshape(out_per_group, -1)
        elif in_channels // groups > 1:
            grouped = weight.reshape(groups, in_channels // groups, out_per_group, -1)
            yield out, grouped.transpose(0, 2, 1, 3).reshape(groups * out_per_group, -1)
    elif node.op == "linear":  # [out, in]
        yield out, weight
        yield x, weight.T
    elif node.op == "matmul" and weight.ndim == 2:  # x @ W, W [in, out]
        yield x, weight
        yield out, weight.T
    elif node.op == "embedding":  # table [V, D]: column d makes channel d
        ids, table = node.inputs
        yield out, np.asarray(table.data, dtype=np.float64).T


def _norm_totals(analysis: ChannelAnalysis, order: int) -> np.ndarray:
    totals = np.zeros(analysis.total_units)
    for value, matrix in weight_parts(analysis):
        ids = analysis.unit_ids[value]
        if order == 1:
            totals += np.bincount(ids, np.abs(matrix).sum(axis=1), analysis.total_units)
        else:
            totals += np.sqrt(np.bincount(ids, (matrix ** 2).sum(axis=1), analysis.total_units))
    return totals


# --- batch norm scale ---------------------------------------------------------------------------


def _batch_norm_totals(analysis: ChannelAnalysis) -> tuple[np.ndarray, np.ndarray]:
    graph = analysis.graph
    norms = [n for n in graph.nodes if n.op == "batch_norm"]
    if not norms:
        raise OptionError(
            f"criterion 'bn' ranks channels by the |gamma| of batch_norm nodes, and graph "
            f"'{graph.name}' has none (fold-bn folds them into the convs); run prune before "
            "fold-bn, for example 'prune:criterion=bn,fold-bn', or use criterion=l1"
        )
    totals = np.zeros(analysis.total_units)
    scored = np.zeros(len(analysis.groups), dtype=bool)
    for node in norms:
        x, gamma = node.inputs[0], node.inputs[1]
        if analysis.axes.get(x) != 1 or not isinstance(gamma, Constant):
            continue
        ids = analysis.unit_ids[x]
        totals += np.bincount(ids, np.abs(gamma.data.astype(np.float64).reshape(-1)),
                              analysis.total_units)
        scored[np.unique(analysis.unit_group[ids])] = True
    return totals, scored


# --- first-order Taylor -------------------------------------------------------------------------


def _taylor_totals(analysis: ChannelAnalysis, feeds) -> np.ndarray:
    from graphcomp.backends.torch_export import GraphModule

    graph = analysis.graph
    if feeds is None:
        raise OptionError(
            "criterion 'taylor' needs calibration feeds: run prune through a PassManager given "
            "feeds (compile passes the first batch of its data), or use criterion=l1"
        )
    check_feeds(graph, feeds)
    module = GraphModule(graph)
    # GraphModule runs a copy of the graph; the copy keeps node order, so zip pairs values.
    copy_of = {
        original: copied
        for node, copied_node in zip(graph.nodes, module.graph.nodes)
        for original, copied in zip(node.outputs, copied_node.outputs)
    }
    layer_outputs = [
        node.outputs[0] for node in graph.nodes
        if is_layer(node) and node.outputs[0] in analysis.axes
    ]
    tensors = {
        name: torch.from_numpy(np.require(array, requirements="C"))
        for name, array in feeds.items()
    }
    with torch.enable_grad():
        env = run_torch(module.graph, tensors, keep=True,
                        constant_tensors=module.constant_tensors())
        outputs = [env[v] for v in module.graph.outputs if env[v].is_floating_point()]
        loss = sum((o.double() ** 2).sum() for o in outputs)
        activations = [env[copy_of[v]] for v in layer_outputs]
        gradients = torch.autograd.grad(loss, activations, allow_unused=True)

    totals = np.zeros(analysis.total_units)
    for value, activation, gradient in zip(layer_outputs, activations, gradients):
        if gradient is None:
            continue
        product = (activation.detach().double() * gradient.double()).abs()
        per_position = product.movedim(analysis.axes[value], 0).reshape(
            value.shape[analysis.axes[value]], -1).sum(dim=1).numpy()
        totals += np.bincount(analysis.unit_ids[value], per_position, analysis.total_units)
    # With outputs of constant norm (normalized embeddings) the loss cannot change, so the
    # gradients are rounding noise. NOTE: the 1e-4 bound is a judgment call: on the digits CNN
    # the largest score is 0.8 of the loss, on all-MiniLM-L6-v2 (normalized) 3e-7 of it.
    if totals.max(initial=0.0) <= 1e-4 * float(loss.detach()):
        raise OptionError(
            f"criterion 'taylor': the sum of squared outputs of graph '{graph.name}' does not "
            "change to first order with any channel on the feeds (outputs of constant norm, "
            "such as normalized embeddings, do that); use criterion=l1 or l2"
        )
    return totals
