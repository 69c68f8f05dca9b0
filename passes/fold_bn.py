"""Folding of inference batch norm into the conv or linear layer before it."""

from __future__ import annotations

import numpy as np

from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.patterns import (
    Const, Match, Op, Pattern, Rule, Var, apply_rules, channel_vector, new_constant,
    replace_match,
)
from graphcomp.pipeline import Pass, PassContext, PassResult, register_pass


def _has_constant_params(node: Node) -> bool:
    weights = node.inputs[1:]
    return (
        node.attrs.get("activation") is None
        and all(isinstance(v, Constant) for v in weights)
        and np.issubdtype(np.dtype(node.inputs[1].dtype), np.floating)
    )


def _features_last(node: Node) -> bool:
    # batch_norm normalizes dim 1, which is a linear layer's feature dim only for 2-D outputs.
    return _has_constant_params(node) and node.outputs[0].rank == 2


CONV = Op(("conv2d", "conv_transpose2d"), name="producer", where=_has_constant_params)
LINEAR = Op("linear", name="producer", where=_features_last)
MATMUL = Op("matmul", Var("x", where=lambda v: v.rank == 2),
            Const("weight", where=lambda c: c.rank == 2), name="producer", where=_features_last)


def _batch_norm(producer: Pattern) -> Op:
    return Op("batch_norm", producer, Const("scale"), Const("bias"), Const("mean"), Const("var"),
              name="bn")


def _plus_shift(producer: Pattern) -> Op:
    return Op("add", producer, Const("shift"))


class _ChannelChain(Pattern):
    """``producer`` followed by any number of adds and muls of a constant, such as
    ``(conv(x) * m + c) * m2``. The rewrite checks that each constant is one number per
    channel."""

    def __init__(self, producer: Pattern):
        self.producer = producer
        self.step = Op(("add", "mul"), self, Const())

    def iter_matches(self, value, index, match):
        yield from self.producer.iter_matches(value, index, match)
        yield from self.step.iter_matches(value, index, match)


def _after_channel_ops(producer: Pattern) -> Op:
    return Op(("add", "mul"), _ChannelChain(producer), Const())


def _fold(graph: Graph, match: Match) -> list[Node] | None:
    """Build the producer with the batch norm folded into its weight and bias."""
    producer: Node = match["producer"]
    bn: Node = match["bn"]
    out_shape = producer.outputs[0].shape
    channels = out_shape[1]
    factor, shift = batch_norm_affine(bn, channels)
    if factor is None:
        return None
    between = _channel_affine(match, producer, bn, out_shape)
    if between is None:
        return None
    multiplier, bias = between
    if producer.op != "matmul" and len(producer.inputs) == 3:
        bias = bias + producer.inputs[2].data.astype(np.float64).reshape(-1) * multiplier

    weight = producer.inputs[1].data.astype(np.float64)
    dtype = producer.inputs[1].dtype
    op = producer.op
    attrs = dict(producer.attrs)
    weight_factor = factor * multiplier
    if op == "matmul":  # matmul(x, W) becomes linear(x, W.T), whose weight is [out, in].
        weight = (weight * weight_factor[None, :]).T
        op, attrs = "linear", {}
    else:
        weight = scale_output_channels(producer, weight, weight_factor)

    inputs: list[Value] = [
        producer.inputs[0],
        new_constant(graph, f"{producer.name}.weight", weight.astype(dtype)),
        new_constant(graph, f"{producer.name}.bias", (bias * factor + shift).astype(dtype)),
    ]
    return [Node(producer.name, op, inputs, list(bn.outputs), attrs)]


def _channel_affine(match: Match, producer: Node, bn: Node, out_shape):
    """Return (multiplier, added) in float64 such that the batch norm reads
    ``producer_output * multiplier + added`` per channel. They compose the per-channel
    constant adds and muls that the match has between the two, and are None when a constant
    is not one number per channel."""
    channels = out_shape[1]
    multiplier, added = np.ones(channels), np.zeros(channels)
    written_by = {node.outputs[0]: node for node in match.nodes}
    chain = []
    value = bn.inputs[0]
    while value is not producer.outputs[0]:
        node = written_by[value]
        chain.append(node)
        value = next(v for v in node.inputs if not isinstance(v, Constant))
    for node in reversed(chain):  # from the producer towards the batch norm
        const = next(v for v in node.inputs if isinstance(v, Constant))
        vector = channel_vector(const, out_shape, axis=1)
        if vector is None:
            return None
        vector = vector.astype(np.float64)
        if node.op == "mul":
            multiplier, added = multiplier * vector, added * vector
        else:
            added = added + vector
    return multiplier, added


def batch_norm_affine(bn: Node, channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return (factor, shift) in float64 with ``batch_norm(x) = x * factor + shift`` per
    channel, or (None, None) unless the four parameters are constants of ``channels`` values."""
    params = bn.inputs[1:]
    if not all(isinstance(v, Constant) and v.size == channels for v in params):
        return None, None
    scale, beta, mean, var = (v.data.astype(np.float64).reshape(-1) for v in params)
    factor = scale / np.sqrt(var + float(bn.attrs.get("eps", 1e-5)))
    return factor, beta - mean * factor


def scale_output_channels(layer: Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Return ``weight`` of a conv2d, conv_transpose2d or linear ``layer`` with each output
    channel multiplied by its entry of ``factor``."""
    if layer.op == "conv2d":  # weight [C_out, C_in / groups, kH, kW]
        return weight * factor.reshape(-1, 1, 1, 1)
    if layer.op == "linear":  # weight [out, in]
        return weight * factor[:, None]
    if layer.op == "conv_transpose2d":
        return scale_transposed_conv_weight(weight, factor, int(layer.attrs.get("groups", 1)))
    raise ValueError(f"node '{layer.name}': cannot scale the output channels of op {layer.op}")


def scale_transposed_conv_weight(weight: np.ndarray, factor: np.ndarray, groups: int):
    """Multiply each output channel of a conv_transpose2d weight by its factor.

    The weight is [C_in, C_out / groups, kH, kW]: output channel ``g * (C_out / groups) + j``
    is column ``j`` of the rows of group ``g``. Scaling axis 1 by a [C_out] vector is wrong for
    groups > 1, because axis 1 only has C_out / groups entries.
    """
    in_channels, out_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
    per_group = factor.reshape(groups, 1, out_per_group, 1, 1)
    return (grouped * per_group).reshape(weight.shape)


RULES = (
    # bn(conv(x, W, b)) -> conv(x, W * s, (b - mean) * s + beta), s = scale / sqrt(var + eps)
    Rule("conv", _batch_norm(CONV), _fold),
    # bn(conv(x, W, b) + c) -> conv(x, W * s, (b + c - mean) * s + beta), c per channel
    Rule("conv-add", _batch_norm(_plus_shift(CONV)), _fold),
    # bn(conv(x, W, b) * m + c) -> conv(x, W * m * s, (b * m + c - mean) * s + beta), where
    # m and c compose any chain of per-channel constant adds and muls, e.g. ((y + c1) * m1) * m2
    Rule("conv-affine", _batch_norm(_after_channel_ops(CONV)), _fold),
    # bn(linear(x, W, b)) -> linear(x, W * s[:, None], (b - mean) * s + beta), x 2-D
    Rule("linear", _batch_norm(LINEAR), _fold),
    # bn(linear(x, W, b) + c) -> linear(x, W * s[:, None], (b + c - mean) * s + beta)
    Rule("linear-add", _batch_norm(_plus_shift(LINEAR)), _fold),
    # bn(matmul(x, W)) -> linear(x, (W * s).T, beta - mean * s), W a 2-D constant
    Rule("matmul", _batch_norm(MATMUL), _fold),
    # bn(matmul(x, W) + c) -> linear(x, (W * s).T, (c - mean) * s + beta)
    Rule("matmul-add", _batch_norm(_plus_shift(MATMUL)), _fold),
)


@register_pass
class FoldBatchNorm(Pass):
    """bn(conv(x, W, b)) -> conv(x, W * s, (b - mean) * s + beta), s = scale / sqrt(var + eps)

    Folds an inference batch_norm into the conv2d, conv_transpose2d (any groups), linear, or
    matmul with a constant 2-D weight that produces its input, also across an add of a
    per-channel constant between them (how exporters write a conv bias). For convs it also
    folds across any chain of per-channel constant adds and muls. A matmul becomes a linear
    layer. This saves a full pass over the activation per batch_norm and lets
    ``fuse`` attach the following activation to the conv. Folding needs constant weights and
    batch norm parameters, a producer output that only the batch_norm (or the adds and muls)
    reads, and no fused activation on the producer. Run ``fold-constants`` first when weights are computed.

    With ``decompose``, every batch_norm left (no foldable producer) becomes
    ``x * s + (beta - mean * s)`` with per-channel constants, which backends run without a
    batch_norm kernel. It is off by default because it adds a node.

    Does not cover yet: folding into a conv that follows the batch_norm, 1-D and 3-D convs,
    and a linear layer whose output has more than two dims (batch_norm then normalizes
    another dim than the features).

    Example::

        before:
          conv: %c = conv2d(%x, @w) -> float32[1,2,4,4]
          bn: %y = batch_norm(%c, @scale, @beta, @mean, @var) {eps=1e-05} -> float32[1,2,4,4]
        after:
          conv: %y = conv2d(%x, @conv.weight, @conv.bias) -> float32[1,2,4,4]
    """

    name = "fold-bn"
    summary = "fold batch_norm into the conv2d, conv_transpose2d or linear before it"
    options = {"decompose": bool}
    defaults = {"decompose": False}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        details: dict[str, int] = dict(apply_rules(graph, RULES, self.name))
        if self.config["decompose"]:
            details["decomposed"] = self._decompose_rest(graph)
        return PassResult(changed=sum(details.values()) > 0, details=details)

    def _decompose_rest(self, graph: Graph) -> int:
        count = 0
        for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
            x = bn.inputs[0]
            factor, shift = batch_norm_affine(bn, x.shape[1] if x.rank >= 2 else -1)
            if factor is None:
                continue
            shape = (1, x.shape[1]) + (1,) * (x.rank - 2)
            scale = new_constant(graph, f"{bn.name}.factor", factor.astype(x.dtype).reshape(shape))
            offset = new_constant(graph, f"{bn.name}.shift", shift.astype(x.dtype).reshape(shape))
            scaled = Value(graph.unique_name(f"{bn.name}.scaled"), x.shape, x.dtype)
            nodes = [
                Node(graph.unique_name(f"{bn.name}.mul"), "mul", [x, scale], [scaled],
                     created_by=self.name),
                Node(graph.unique_name(f"{bn.name}.add"), "add", [scaled, offset],
                     list(bn.outputs), created_by=self.name),
            ]
            if replace_match(graph, Match(bn, [bn]), nodes):
                count += 1
        return count
