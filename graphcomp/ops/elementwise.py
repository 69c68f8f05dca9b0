"""Elementwise ops: activations, unary math, broadcasting binary ops, comparisons, cast."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphcomp.ops.registry import register_op


def relax_module():
    """Import tvm.relax on first use (importing TVM costs seconds)."""
    from tvm import relax

    return relax


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*shapes))


def same_as_first(node):
    x = node.inputs[0]
    return [(x.shape, x.dtype)]


def broadcast_infer(node):
    shape = broadcast_shapes(*(v.shape for v in node.inputs))
    return [(shape, node.inputs[0].dtype)]


def compare_infer(node):
    shape = broadcast_shapes(*(v.shape for v in node.inputs))
    return [(shape, "bool")]


def elementwise_macs(node) -> int:
    return 0


# --- activations, shared with ops that fuse them ------------------------------------------------

ACTIVATIONS = ("relu", "relu6", "sigmoid", "hardsigmoid", "hardswish", "gelu", "tanh", "silu")


def torch_activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Apply a fused activation by name; ``None`` leaves ``x`` unchanged."""
    if name is None:
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "relu6":
        return torch.clamp(x, 0.0, 6.0)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "hardsigmoid":
        return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown fused activation '{name}'; known: {', '.join(ACTIVATIONS)}")


def relax_activation(x, name: str | None, dtype: str = "float32"):
    """Apply a fused activation to a Relax expression, as ``torch_activation`` does."""
    if name is None:
        return x
    relax = relax_module()
    op = relax.op
    if name == "relu":
        return op.nn.relu(x)
    if name == "relu6":
        return op.clip(x, 0.0, 6.0)
    if name == "sigmoid":
        return op.sigmoid(x)
    if name == "hardsigmoid":
        return _relax_hardsigmoid(x, 1.0 / 6.0, 0.5, dtype)
    if name == "hardswish":
        return op.multiply(x, _relax_hardsigmoid(x, 1.0 / 6.0, 0.5, dtype))
    if name == "gelu":
        return op.nn.gelu(x)
    if name == "tanh":
        return op.tanh(x)
    if name == "silu":
        return op.nn.silu(x)
    raise ValueError(f"unknown fused activation '{name}'; known: {', '.join(ACTIVATIONS)}")


def _relax_hardsigmoid(x, alpha: float, beta: float, dtype: str):
    relax = relax_module()
    op = relax.op
    scaled = op.add(op.multiply(x, relax.const(alpha, dtype)), relax.const(beta, dtype))
    return op.clip(scaled, 0.0, 1.0)


# --- unary ops --------------------------------------------------------------------------------


def _unary(name, torch_fn, relax_fn, doc):
    register_op(
        name,
        infer=same_as_first,
        torch=lambda node, x: torch_fn(x),
        relax=lambda node, x: relax_fn(relax_module().op, x),
        doc=doc,
    )


_unary("relu", torch.relu, lambda op, x: op.nn.relu(x), "max(x, 0)")
_unary("sigmoid", torch.sigmoid, lambda op, x: op.sigmoid(x), "1 / (1 + exp(-x))")
_unary("tanh", torch.tanh, lambda op, x: op.tanh(x), "hyperbolic tangent")
_unary("erf", torch.erf, lambda op, x: op.erf(x), "Gauss error function")
_unary("sqrt", torch.sqrt, lambda op, x: op.sqrt(x), "square root")
_unary("rsqrt", torch.rsqrt, lambda op, x: op.rsqrt(x), "1 / sqrt(x)")
_unary("exp", torch.exp, lambda op, x: op.exp(x), "e ** x")
_unary("log", torch.log, lambda op, x: op.log(x), "natural logarithm")
_unary("neg", torch.neg, lambda op, x: op.negative(x), "-x")
_unary("abs", torch.abs, lambda op, x: op.abs(x), "|x|")
_unary("reciprocal", torch.reciprocal, lambda op, x: op.divide(_one_like(x), x), "1 / x")
_unary("identity", lambda x: x, lambda op, x: x, "returns its input unchanged")
_unary("silu", F.silu, lambda op, x: op.nn.silu(x), "x * sigmoid(x)")
_unary("hardswish", F.hardswish, lambda op, x: relax_activation(x, "hardswish"),
       "x * clip(x / 6 + 1/2, 0, 1)")
_unary("logical_not", torch.logical_not, lambda op, x: op.logical_not(x), "boolean not")


def _one_like(x):
    relax = relax_module()
    return relax.const(1.0, x.ty.dtype)  # TVM 0.27 names the type field ty


def _gelu_torch(node, x):
    return F.gelu(x, approximate=node.attrs.get("approximate", "none"))


def _gelu_relax(node, x):
    op = relax_module().op
    if node.attrs.get("approximate", "none") == "tanh":
        return op.nn.gelu_tanh(x)
    return op.nn.gelu(x)


register_op("gelu", infer=same_as_first, torch=_gelu_torch, relax=_gelu_relax,
            doc="Gaussian error linear unit; attrs: approximate ('none' or 'tanh')")


def _hardsigmoid_torch(node, x):
    alpha = node.attrs.get("alpha", 1.0 / 6.0)
    beta = node.attrs.get("beta", 0.5)
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _hardsigmoid_relax(node, x):
    alpha = node.attrs.get("alpha", 1.0 / 6.0)
    beta = node.attrs.get("beta", 0.5)
    return _relax_hardsigmoid(x, alpha, beta, node.inputs[0].dtype)


register_op("hardsigmoid", infer=same_as_first, torch=_hardsigmoid_torch,
            relax=_hardsigmoid_relax, doc="clip(alpha * x + beta, 0, 1); attrs: alpha, beta")


def _clip_torch(node, x):
    low, high = node.attrs.get("min"), node.attrs.get("max")
    if low is None and high is None:
        return x  # torch.clamp rejects two missing bounds; ONNX Clip then copies its input.
    return torch.clamp(x, low, high)


def _clip_relax(node, x):
    low = node.attrs.get("min")
    high = node.attrs.get("max")
    low = float("-inf") if low is None else low
    high = float("inf") if high is None else high
    return relax_module().op.clip(x, low, high)


register_op("clip", infer=same_as_first, torch=_clip_torch, relax=_clip_relax,
            doc="clamp to [min, max]; attrs: min, max (None for no bound)")


def _cast_infer(node):
    return [(node.inputs[0].shape, str(np.dtype(node.attrs["dtype"])))]


def _cast_torch(node, x):
    return x.to(TORCH_DTYPES[str(np.dtype(node.attrs["dtype"]))])


def _cast_relax(node, x):
    return relax_module().op.astype(x, str(np.dtype(node.attrs["dtype"])))


register_op("cast", infer=_cast_infer, torch=_cast_torch, relax=_cast_relax,
            doc="convert to another dtype; attrs: dtype (numpy name)")

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


# --- binary ops -------------------------------------------------------------------------------


def _binary(name, torch_fn, relax_name, doc, infer=broadcast_infer):
    register_op(
        name,
        infer=infer,
        torch=lambda node, a, b: torch_fn(a, b),
        relax=lambda node, a, b: getattr(relax_module().op, relax_name)(a, b),
        inputs=2,
        doc=doc,
    )


_binary("add", torch.add, "add", "a + b with broadcasting")
_binary("sub", torch.sub, "subtract", "a - b with broadcasting")
_binary("mul", torch.mul, "multiply", "a * b with broadcasting")
_binary("div", lambda a, b: torch.div(a, b) if a.is_floating_point() else
        torch.div(a, b, rounding_mode="trunc"), "divide",
        "a / b with broadcasting; integer division truncates toward zero, as in ONNX")
_binary("pow", torch.pow, "power", "a ** b with broadcasting")
_binary("maximum", torch.maximum, "maximum", "elementwise max")
_binary("minimum", torch.minimum, "minimum", "elementwise min")
_binary("equal", torch.eq, "equal", "a == b", compare_infer)
_binary("less", torch.lt, "less", "a < b", compare_infer)
_binary("greater", torch.gt, "greater", "a > b", compare_infer)
_binary("greater_equal", torch.ge, "greater_equal", "a >= b", compare_infer)
_binary("logical_and", torch.logical_and, "logical_and", "boolean and", compare_infer)


def _where_infer(node):
    shape = broadcast_shapes(*(v.shape for v in node.inputs))
    return [(shape, node.inputs[1].dtype)]


register_op(
    "where",
    infer=_where_infer,
    torch=lambda node, cond, a, b: torch.where(cond, a, b),
    relax=lambda node, cond, a, b: relax_module().op.where(cond, a, b),
    inputs=3,
    doc="cond ? a : b with broadcasting",
)


# --- more comparisons and boolean ops (PyTorch's ne, le, logical_or, logical_xor) -----------

_binary("not_equal", torch.ne, "not_equal", "a != b", compare_infer)
_binary("less_equal", torch.le, "less_equal", "a <= b", compare_infer)
_binary("logical_or", torch.logical_or, "logical_or", "boolean or", compare_infer)
_binary("logical_xor", torch.logical_xor, "logical_xor", "boolean exclusive or", compare_infer)
