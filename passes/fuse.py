"""Local fusions: bias adds into layers, activation patterns into ops, activations into layers."""

from __future__ import annotations

import numpy as np

from graphcomp.ir import Constant, Graph, Node
from graphcomp.patterns import (
    Const, Match, Op, Rule, Var, apply_rules, channel_vector, new_constant,
)
from graphcomp.passes.fold_bn import scale_output_channels
from graphcomp.pipeline import Pass, PassContext, PassResult, register_pass

LAYERS = ("conv2d", "conv_transpose2d", "linear")
SIXTH = 1.0 / 6.0


def _plain_layer(node: Node) -> bool:
    """Return True for a layer without a fused activation whose weight and bias are constants."""
    constant_params = all(isinstance(v, Constant) for v in node.inputs[1:])
    return node.attrs.get("activation") is None and constant_params


def _standard_hardsigmoid(node: Node) -> bool:
    alpha = node.attrs.get("alpha", SIXTH)
    beta = node.attrs.get("beta", 0.5)
    return bool(np.isclose(alpha, SIXTH, rtol=1e-6) and np.isclose(beta, 0.5, rtol=1e-6))


def fused_activation(node: Node) -> str | None:
    """Return the name in ``graphcomp.ops.ACTIVATIONS`` that computes what ``node`` computes,
    or None."""
    if node.op in ("relu", "sigmoid", "hardswish", "tanh", "silu"):
        return node.op
    if node.op == "gelu" and node.attrs.get("approximate", "none") == "none":
        return "gelu"
    if node.op == "hardsigmoid" and _standard_hardsigmoid(node):
        return "hardsigmoid"
    if node.op == "clip" and node.attrs.get("min") is not None:
        low, high = float(node.attrs["min"]), node.attrs.get("max")
        if low == 0.0 and high is None:
            return "relu"
        if low == 0.0 and high is not None and float(high) == 6.0:
            return "relu6"
    return None


# --- patterns -----------------------------------------------------------------------------------

X = Var("x")
SCALAR = {"where": lambda c: c.size == 1}
# clip(x + 3, 0, 6), the core of hardswish and hardsigmoid as exporters write them.
RELU6_X_PLUS_3 = Op("clip", Op("add", X, Const(equals=3.0)), min=0.0, max=6.0)
MATMUL = Op("matmul", X, Const("weight", where=lambda c: c.rank == 2), name="producer")
LAYER = Op(LAYERS, name="producer", where=_plain_layer)
ACTIVATION = Op(
    ("relu", "sigmoid", "hardswish", "tanh", "silu", "gelu", "hardsigmoid", "clip"),
    Op(LAYERS, name="producer", where=lambda n: n.attrs.get("activation") is None),
    name="activation",
    where=lambda n: fused_activation(n) is not None,
)


# --- rewrites -----------------------------------------------------------------------------------


def _matmul_to_linear(graph: Graph, match: Match) -> list[Node] | None:
    matmul: Node = match["producer"]
    bias = channel_vector(match["bias"], matmul.outputs[0].shape, axis=-1)
    if bias is None:
        return None
    weight: Constant = match["weight"]
    inputs = [
        match["x"],
        new_constant(graph, f"{matmul.name}.weight", weight.data.T),
        new_constant(graph, f"{matmul.name}.bias", bias.astype(weight.dtype)),
    ]
    return [Node(matmul.name, "linear", inputs, list(match.root.outputs))]


def _add_bias(graph: Graph, match: Match) -> list[Node] | None:
    layer: Node = match["producer"]
    axis = -1 if layer.op == "linear" else 1
    added = channel_vector(match["bias"], layer.outputs[0].shape, axis=axis)
    if added is None:
        return None
    dtype = layer.inputs[1].dtype
    if len(layer.inputs) == 3:
        added = added + layer.inputs[2].data.reshape(-1)
    bias = new_constant(graph, f"{layer.name}.bias", added.astype(dtype))
    inputs = [layer.inputs[0], layer.inputs[1], bias]
    return [Node(layer.name, layer.op, inputs, list(match.root.outputs), dict(layer.attrs))]


def _scale_layer(graph: Graph, match: Match) -> list[Node] | None:
    layer: Node = match["producer"]
    axis = -1 if layer.op == "linear" else 1
    factor = channel_vector(match["scale"], layer.outputs[0].shape, axis=axis)
    if factor is None:
        return None
    factor = factor.astype(np.float64)
    weight_value = layer.inputs[1]
    weight = scale_output_channels(layer, weight_value.data.astype(np.float64), factor)
    inputs = [layer.inputs[0], new_constant(graph, f"{layer.name}.weight",
                                            weight.astype(weight_value.dtype))]
    if len(layer.inputs) == 3:
        bias = layer.inputs[2].data.astype(np.float64).reshape(-1) * factor
        inputs.append(new_constant(graph, f"{layer.name}.bias", bias.astype(weight_value.dtype)))
    return [Node(layer.name, layer.op, inputs, list(match.root.outputs), dict(layer.attrs))]


def _replace_with(op: str, **attrs):
    def rewrite(graph: Graph, match: Match) -> list[Node]:
        return [Node(match.root.name, op, [match["x"]], list(match.root.outputs), dict(attrs))]

    return rewrite


def _decomposed_hardsigmoid(graph: Graph, match: Match) -> list[Node]:
    alpha = float(match["alpha"].data.reshape(-1)[0])
    beta = float(match["beta"].data.reshape(-1)[0])
    return _replace_with("hardsigmoid", alpha=alpha, beta=beta)(graph, match)


def _fuse_activation(graph: Graph, match: Match) -> list[Node]:
    layer: Node = match["producer"]
    attrs = dict(layer.attrs, activation=fused_activation(match["activation"]))
    return [Node(layer.name, layer.op, list(layer.inputs), list(match.root.outputs), attrs)]


RULES = (
    # matmul(x, W) + b -> linear(x, W.T, b)   (W a 2-D constant, b one constant per column)
    Rule("matmul-bias", Op("add", MATMUL, Const("bias")), _matmul_to_linear),
    # layer(x, W, b) + c -> layer(x, W, b + c)   (conv2d, conv_transpose2d, linear; c per channel)
    Rule("bias-add", Op("add", LAYER, Const("bias")), _add_bias),
    # layer(x, W, b) * c -> layer(x, W * c, b * c)   (c per output channel, W a constant)
    Rule("scale-mul", Op("mul", LAYER, Const("scale")), _scale_layer),
    # x * clip(x + 3, 0, 6) / 6 -> hardswish(x)
    Rule("hardswish-div",
         Op("div", Op("mul", X, RELU6_X_PLUS_3), Const(equals=6.0)),
         _replace_with("hardswish")),
    # x * clip(x + 3, 0, 6) * (1/6) -> hardswish(x)
    Rule("hardswish-mul",
         Op("mul", Op("mul", X, RELU6_X_PLUS_3), Const(equals=SIXTH)),
         _replace_with("hardswish")),
    # clip(x + 3, 0, 6) / 6 -> hardsigmoid(x)
    Rule("hardsigmoid-div", Op("div", RELU6_X_PLUS_3, Const(equals=6.0)),
         _replace_with("hardsigmoid", alpha=SIXTH, beta=0.5)),
    # clip(x + 3, 0, 6) * (1/6) -> hardsigmoid(x)
    Rule("hardsigmoid-mul", Op("mul", RELU6_X_PLUS_3, Const(equals=SIXTH)),
         _replace_with("hardsigmoid", alpha=SIXTH, beta=0.5)),
    # clip(x * alpha + beta, 0, 1) -> hardsigmoid(x, alpha, beta)   (alpha, beta scalars)
    Rule("hardsigmoid-affine",
         Op("clip", Op("add", Op("mul", X, Const("alpha", **SCALAR)), Const("beta", **SCALAR)),
            min=0.0, max=1.0),
         _decomposed_hardsigmoid),
    # x * hardsigmoid(x) -> hardswish(x)   (alpha 1/6, beta 1/2)
    Rule("hardswish-hardsigmoid",
         Op("mul", X, Op("hardsigmoid", X, where=_standard_hardsigmoid)),
         _replace_with("hardswish")),
    # x * sigmoid(x) -> silu(x)
    Rule("silu", Op("mul", X, Op("sigmoid", X)), _replace_with("silu")),
    # activation(layer(x, ...)) -> layer(x, ...) {activation}
    Rule("activation", ACTIVATION, _fuse_activation),
)

@register_pass
class Fuse(Pass):
    """act(conv(x, W, b) + c) -> conv(x, W, b + c) {activation=act}, and matmul + bias -> linear

    Applies the rewrites of ``RULES`` until none matches. Each rule has its ``before ->
    after`` formula next to its pattern. The rules cover four kinds of rewrite:

    1. Bias adds and per-channel scales fold into conv2d, conv_transpose2d and linear layers.
       PP-OCRv4 rec, for example, scales and shifts every conv output by learned scalars.
    2. A matmul with a constant 2-D weight followed by a bias add becomes a linear layer.
    3. The hardswish, hardsigmoid and silu patterns that ONNX exporters emit become single
       ops. PP-OCR writes hardswish as Add -> Clip -> Mul -> Div.
    4. An activation after a layer moves into the layer's ``activation`` attribute.

    Backends run a layer with its bias and activation as one kernel, which saves a pass over
    the tensor for each node removed. An intermediate value is fused only when the next node
    of the pattern is its only reader. Run it after ``fold-bn``, because a batch_norm no
    longer folds into a layer that has a fused activation.

    Does not cover yet: matmul without a bias (left as matmul), activations after a
    batch_norm that did not fold, gelu with the tanh approximation and hardsigmoid with
    other slopes than 1/6 as fused activations (they stay separate ops).

    Example::

        before:
          conv: %c = conv2d(%x, @w) -> float32[1,2,4,4]
          add: %b = add(%c, @shift) -> float32[1,2,4,4]
          act: %y = relu(%b) -> float32[1,2,4,4]
        after:
          conv: %y = conv2d(%x, @w, @conv.bias) {activation='relu'} -> float32[1,2,4,4]
    """

    name = "fuse"
    summary = "fuse bias adds, hardswish/hardsigmoid patterns and activations into layers"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        details = dict(apply_rules(graph, RULES, self.name))
        return PassResult(changed=bool(details), details=details)
