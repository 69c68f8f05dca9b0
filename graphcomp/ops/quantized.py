"""Quantized ops: quantize, dequantize, int8 convolution, transposed convolution and linear
layers, and the int8 product of two activations.

The PyTorch reference, the Relax lowering and the ONNX export compute the same integers. A TVM
build of quantize, dequantize, qconv2d, qconv_transpose2d, qlinear or qmatmul equals the
reference executor bit for bit.
dynamic_qlinear's float output agrees to float32 rounding, because TVM may fuse its multiply
and add. The arithmetic:

- ``quantize(x, scale, zero_point)``: ``q = saturate(round(x / scale) + zero_point)`` in
  float32, rounding half to even as ONNX QuantizeLinear does. The zero point's dtype (int8 or
  uint8) is the output dtype. A scalar scale quantizes per tensor, a 1-D scale per channel
  along ``attrs.axis`` (default 1).
- ``dequantize(q, scale, zero_point)``: ``x = float32(int32(q) - int32(zero_point)) * scale``.
- ``qconv2d`` and ``qlinear``: int8 (or uint8) activations with a per-tensor zero point,
  int8 weights quantized symmetrically per output channel (weight zero point 0) and an
  optional int32 bias at scale ``x_scale * w_scale[c]``::

      acc[c] = sum((x - x_zero_point) * w[c]) + bias[c]                       (int32)
      m[c]   = x_scale * w_scale[c] / y_scale                                 (float32)
      y[c]   = saturate(round(float32(acc[c]) * m[c]) + y_zero_point)

  A fused relu raises the lower saturation bound to ``y_zero_point``. This is the float
  requantization of ONNX Runtime's QLinearConv on x86 (checked with version 1.32), so its
  results agree bit for bit too.
  Convolution padding is ``x_zero_point``, the quantized form of 0.0.
  ``qconv_transpose2d`` computes the same with a transposed convolution, its weight
  [C, O, kH, kW] quantized per output channel along axis 1.
- ``qmatmul(a, b)``: both operands are activations quantized per tensor, as in attention::

      acc = (a - a_zero_point) @ (b - b_zero_point)                           (int32)
      y   = saturate(round(float32(acc) * m) + y_zero_point),  m = a_scale * b_scale / y_scale
- ``dynamic_qlinear``: a float linear layer whose input is quantized at run time to uint8 as
  ONNX DynamicQuantizeLinear does (range widened to include 0, scale ``(max - min) / 255``),
  multiplied with int8 per-channel weights in int32, and scaled back:
  ``y = float32(acc) * (x_scale * w_scale) + bias``. The range is that of the whole input,
  or with ``attrs.per_row`` that of each row (each token of a transformer), which follows
  inputs whose rows differ in scale more closely.

The Relax lowerings keep the integer arithmetic integer: relax conv2d and linear on int8
inputs with ``out_dtype="int32"``. TVM pads with ``x_zero_point`` (inside the convolution's
TIR function) and subtracts ``x_zero_point * sum(w[c])`` from the accumulator instead of
shifting every input element.
When the weight, bias and scales are graph constants (as the quantize pass makes them), the
lowerings compute the per-channel terms that depend on them alone (the requantization
multiplier, ``bias - x_zero_point * sum(w[c])``, parameters reshaped for broadcasting) with
numpy in the same float32 or int32 arithmetic, and embed them as constants of ``C`` elements.
Computed in Relax, each would be a kernel of its own that runs on every inference, because
weights are parameters of ``main`` and TVM's FoldConstant cannot fold them. What remains per
layer is one TVM kernel after FuseOps: the convolution with the requantization and the float
ops up to the next quantize in its epilogue.
On x86 CPUs with AVX-512 VNNI, qconv2d (groups 1), qconv_transpose2d with stride equal to its
kernel, qlinear with uint8 inputs and dynamic_qlinear take their weights packed for the
vpdpbusd dot product instead (vnni.py); their sums, and so their results, are the same.

NOTE: the accumulator is int32 in TVM and ONNX Runtime, so a layer whose sums leave the int32
range wraps there, while the reference computes exact sums. With 8-bit inputs that takes more
than 65,000 products per output, far beyond common layers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphcomp.ir import Constant
from graphcomp.ops.elementwise import (
    TORCH_DTYPES, relax_activation, relax_module, torch_activation,
)
from graphcomp.ops import vnni
from graphcomp.ops.lowering import packed_input
from graphcomp.ops.nn import is_pixel_shuffle_transpose
from graphcomp.ops.registry import get_op, register_op

# Saturation bounds of the quantized dtypes.
QUANTIZED_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}
# Activations that qconv2d and qlinear fuse (relu is a saturation bound in the int8 domain).
QUANTIZED_ACTIVATIONS = (None, "relu")
# float32 represents every integer up to this magnitude exactly.
FLOAT32_EXACT_INTEGERS = 2**24


# --- shared checks and arithmetic -------------------------------------------------------------


def _check_quantized(node, value, role: str) -> None:
    if value.dtype not in QUANTIZED_RANGES:
        raise ValueError(
            f"{node.op} '{node.name}': {role} '{value.name}' is {value.dtype}, expected int8 or "
            "uint8"
        )


def _check_dtype(node, value, role: str, dtype: str) -> None:
    if value.dtype != dtype:
        raise ValueError(
            f"{node.op} '{node.name}': {role} '{value.name}' is {value.dtype}, expected {dtype}"
        )


def _param_axis(node, rank: int) -> int:
    axis = int(node.attrs.get("axis", 1))
    if not -rank <= axis < rank:
        raise ValueError(f"{node.op} '{node.name}': axis {axis} is out of range for rank {rank}")
    return axis % rank


def _check_params(node) -> None:
    """Check the scale and zero point inputs (1 and 2) of quantize and dequantize."""
    data, scale, zero_point = node.inputs
    _check_dtype(node, scale, "scale", "float32")
    if zero_point.dtype != data.dtype and node.op == "dequantize":
        raise ValueError(
            f"dequantize '{node.name}': zero point is {zero_point.dtype} but the input is "
            f"{data.dtype}; they must match"
        )
    if scale.shape != zero_point.shape or scale.rank > 1:
        raise ValueError(
            f"{node.op} '{node.name}': scale {scale.shape} and zero point {zero_point.shape} "
            "must both be scalars (per tensor) or both 1-D (per channel)"
        )
    if scale.rank == 1:
        axis = _param_axis(node, data.rank)
        if scale.shape[0] != data.shape[axis]:
            raise ValueError(
                f"{node.op} '{node.name}': {scale.shape[0]} scales for axis {axis} of size "
                f"{data.shape[axis]}"
            )


def _param_shape(node) -> tuple[int, ...]:
    """Return the shape that broadcasts a scale or zero point against the data (input 0)."""
    data, scale = node.inputs[0], node.inputs[1]
    if scale.rank == 0:
        return ()
    axis = _param_axis(node, data.rank)
    return tuple(data.shape[axis] if dim == axis else 1 for dim in range(data.rank))


def _check_layer_attrs(node) -> None:
    """Check the quantization attributes of qconv2d and qlinear."""
    attrs = node.attrs
    low, high = QUANTIZED_RANGES[node.inputs[0].dtype]
    for key in ("x_scale", "y_scale"):
        scale = attrs.get(key)
        if not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{node.op} '{node.name}': {key} must be a finite number > 0, "
                             f"got {scale!r}")
    for key in ("x_zero_point", "y_zero_point"):
        zero_point = attrs.get(key, 0)
        if not isinstance(zero_point, int) or not low <= zero_point <= high:
            raise ValueError(f"{node.op} '{node.name}': {key} must be an integer in "
                             f"[{low}, {high}] for {node.inputs[0].dtype}, got {zero_point!r}")
    if attrs.get("activation") not in QUANTIZED_ACTIVATIONS:
        raise ValueError(f"{node.op} '{node.name}': fused activation "
                         f"{attrs.get('activation')!r} is not supported; only relu is")


def _check_layer_params(node, out_channels: int) -> None:
    """Check weight (input 1), weight scale (2) and bias (3) of qconv2d and qlinear."""
    _check_quantized(node, node.inputs[0], "input")
    _check_dtype(node, node.inputs[1], "weight", "int8")
    w_scale = node.inputs[2]
    _check_dtype(node, w_scale, "weight scale", "float32")
    if w_scale.shape != (out_channels,):
        raise ValueError(f"{node.op} '{node.name}': weight scale has shape {w_scale.shape}, "
                         f"expected ({out_channels},), one scale per output channel")
    if len(node.inputs) == 4:
        bias = node.inputs[3]
        _check_dtype(node, bias, "bias", "int32")
        if bias.shape != (out_channels,):
            raise ValueError(f"{node.op} '{node.name}': bias has shape {bias.shape}, expected "
                             f"({out_channels},)")
    _check_layer_attrs(node)


def _output_bounds(node) -> tuple[int, int]:
    low, high = QUANTIZED_RANGES[node.outputs[0].dtype]
    if node.attrs.get("activation") == "relu":
        low = int(node.attrs.get("y_zero_point", 0))
    return low, high


def _exact_dtype(terms: int, x_bound: float, w_bound: float) -> torch.dtype:
    """float32 when no partial sum of ``terms`` products can exceed 2**24, else float64.

    Sums of integer products are exact in either dtype within that limit, whatever order the
    convolution or matmul kernel adds them in.
    """
    if terms * x_bound * w_bound < FLOAT32_EXACT_INTEGERS:
        return torch.float32
    return torch.float64


def _multiplier_torch(node, w_scale: torch.Tensor) -> torch.Tensor:
    x_scale = torch.tensor(float(node.attrs["x_scale"]), dtype=torch.float32)
    y_scale = torch.tensor(float(node.attrs["y_scale"]), dtype=torch.float32)
    return x_scale * w_scale / y_scale


def _requantize_torch(node, acc: torch.Tensor, bias, multiplier: torch.Tensor, shape):
    """Return ``acc + bias`` (exact integers in a float tensor) requantized to the output."""
    total = acc.to(torch.float64)
    if bias is not None:
        total = total + bias.to(torch.float64).reshape(shape)
    # float64 -> float32 rounds to nearest even, as TVM's int32 -> float32 conversion does.
    scaled = total.to(torch.float32) * multiplier.reshape(shape)
    low, high = _output_bounds(node)
    shifted = torch.round(scaled) + float(node.attrs.get("y_zero_point", 0))
    return torch.clamp(shifted, low, high).to(TORCH_DTYPES[node.outputs[0].dtype])


def _constant_data(value) -> np.ndarray | None:
    """Return the data of a graph constant, or None for a value known only at run time."""
    return value.data if isinstance(value, Constant) else None


def _multiplier_relax(node, w_scale, shape):
    """Return ``x_scale * w_scale / y_scale`` in float32, reshaped to ``shape``."""
    relax = relax_module()
    op = relax.op
    w_scale_data = _constant_data(node.inputs[2])
    if w_scale_data is not None:
        # The same float32 operations, in the same order, as _multiplier_torch.
        multiplier = (np.float32(node.attrs["x_scale"]) * w_scale_data.astype(np.float32)
                      / np.float32(node.attrs["y_scale"]))
        return relax.const(multiplier.reshape(shape), "float32")
    x_scale = relax.const(float(node.attrs["x_scale"]), "float32")
    y_scale = relax.const(float(node.attrs["y_scale"]), "float32")
    return op.reshape(op.divide(op.multiply(x_scale, w_scale), y_scale), shape)


def _requantize_relax(node, acc, offset, multiplier):
    """Requantize the int32 accumulator. ``offset`` (an int32 per-channel term, or None) and
    ``multiplier`` already have the shape that broadcasts against ``acc``."""
    relax = relax_module()
    op = relax.op
    if offset is not None:
        acc = op.add(acc, offset)
    scaled = op.multiply(op.astype(acc, "float32"), multiplier)
    zero_point = relax.const(float(node.attrs.get("y_zero_point", 0)), "float32")
    low, high = _output_bounds(node)
    shifted = op.clip(op.add(op.round(scaled), zero_point), float(low), float(high))
    return op.astype(shifted, node.outputs[0].dtype)


def _zero_point_offset_relax(node, weight, bias, reduce_axes: list[int], shape):
    """Return ``bias - x_zero_point * sum(weight[c])`` as int32, reshaped to ``shape``, or
    None when it is zero."""
    relax = relax_module()
    op = relax.op
    zero_point = int(node.attrs.get("x_zero_point", 0))
    if zero_point == 0 and bias is None:
        return None
    weight_data = _constant_data(node.inputs[1])
    bias_data = _constant_data(node.inputs[3]) if bias is not None else None
    if weight_data is not None and (bias is None or bias_data is not None):
        offset = np.zeros(weight_data.shape[0], np.int64)
        if bias_data is not None:
            offset += bias_data.astype(np.int64)
        offset -= zero_point * weight_data.astype(np.int64).sum(axis=tuple(reduce_axes))
        # astype wraps outside the int32 range, as TVM's int32 arithmetic does.
        return relax.const(offset.astype(np.int32).reshape(shape), "int32")
    offset = bias
    if zero_point != 0:
        weight_sums = op.sum(op.astype(weight, "int32"), axis=reduce_axes)
        correction = op.multiply(weight_sums, relax.const(zero_point, "int32"))
        offset = op.negative(correction) if bias is None else op.subtract(bias, correction)
    return op.reshape(offset, shape)


# --- quantize and dequantize ------------------------------------------------------------------


def _quantize_infer(node):
    x, _, zero_point = node.inputs
    _check_dtype(node, x, "input", "float32")
    _check_quantized(node, zero_point, "zero point")
    _check_params(node)
    return [(x.shape, zero_point.dtype)]


def _quantize_torch(node, x, scale, zero_point):
    shape = _param_shape(node)
    low, high = QUANTIZED_RANGES[node.outputs[0].dtype]
    rounded = torch.round(x / scale.reshape(shape))
    shifted = rounded + zero_point.to(torch.float32).reshape(shape)
    return torch.clamp(shifted, low, high).to(TORCH_DTYPES[node.outputs[0].dtype])


def _param_relax(node, index: int, expr, dtype: str):
    """Return quantize's or dequantize's scale or zero point (input ``index``) as ``dtype``,
    shaped to broadcast against the data: a constant when the graph has it as one."""
    relax = relax_module()
    op = relax.op
    shape = _param_shape(node)
    data = _constant_data(node.inputs[index])
    if data is not None:
        return relax.const(data.astype(dtype).reshape(shape), dtype)
    if node.inputs[index].dtype != dtype:
        expr = op.astype(expr, dtype)
    return op.reshape(expr, shape)


def _quantize_relax(node, x, scale, zero_point):
    op = relax_module().op
    low, high = QUANTIZED_RANGES[node.outputs[0].dtype]
    rounded = op.round(op.divide(x, _param_relax(node, 1, scale, "float32")))
    shifted = op.add(rounded, _param_relax(node, 2, zero_point, "float32"))
    return op.astype(op.clip(shifted, float(low), float(high)), node.outputs[0].dtype)


register_op(
    "quantize", infer=_quantize_infer, torch=_quantize_torch, relax=_quantize_relax, inputs=3,
    macs=lambda node: node.outputs[0].size,
    doc="q = saturate(round_half_even(x / scale) + zero_point); inputs x (float32), scale "
        "(float32, scalar or [C]), zero_point (int8 or uint8, its dtype is the output dtype); "
        "attrs: axis (default 1) for per-channel parameters",
)


def _dequantize_infer(node):
    q = node.inputs[0]
    if q.dtype not in (*QUANTIZED_RANGES, "int32"):
        raise ValueError(f"dequantize '{node.name}': input '{q.name}' is {q.dtype}, expected "
                         "int8, uint8 or int32")
    _check_params(node)
    return [(q.shape, "float32")]


def _dequantize_torch(node, q, scale, zero_point):
    shape = _param_shape(node)
    centered = q.to(torch.int32) - zero_point.to(torch.int32).reshape(shape)
    return centered.to(torch.float32) * scale.reshape(shape)


def _dequantize_relax(node, q, scale, zero_point):
    op = relax_module().op
    if node.inputs[0].dtype != "int32":
        q = op.astype(q, "int32")
    centered = op.subtract(q, _param_relax(node, 2, zero_point, "int32"))
    return op.multiply(op.astype(centered, "float32"), _param_relax(node, 1, scale, "float32"))


register_op(
    "dequantize", infer=_dequantize_infer, torch=_dequantize_torch, relax=_dequantize_relax,
    inputs=3, macs=lambda node: node.outputs[0].size,
    doc="x = float32(q - zero_point) * scale; inputs q (int8, uint8 or int32), scale "
        "(float32, scalar or [C]), zero_point (q's dtype); attrs: axis (default 1)",
)


# --- qconv2d ----------------------------------------------------------------------------------


def _conv_settings(node):
    attrs = node.attrs
    strides = tuple(int(v) for v in attrs.get("strides", (1, 1)))
    pads = tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0)))
    dilations = tuple(int(v) for v in attrs.get("dilations", (1, 1)))
    return strides, pads, dilations, int(attrs.get("groups", 1))


def _qconv2d_infer(node):
    # conv2d's shape inference reads only inputs 0 and 1 and the conv attributes.
    [(shape, dtype)] = get_op("conv2d").infer(node)
    out_channels = node.inputs[1].shape[0]
    groups = int(node.attrs.get("groups", 1))
    if out_channels % groups:
        raise ValueError(f"qconv2d '{node.name}': {out_channels} output channels do not "
                         f"divide into {groups} groups")
    _check_layer_params(node, out_channels)
    return [(shape, dtype)]


def _qconv2d_torch(node, x, weight, w_scale, bias=None):
    strides, pads, dilations, groups = _conv_settings(node)
    top, left, bottom, right = pads
    centered = x.to(torch.int32) - int(node.attrs.get("x_zero_point", 0))
    terms = weight.shape[1] * weight.shape[2] * weight.shape[3]
    dtype = _exact_dtype(terms, float(centered.abs().max()), float(weight.abs().max()))
    # Padding with zeros after centering is padding with x_zero_point before it.
    padded = F.pad(centered.to(dtype), (left, right, top, bottom))
    acc = F.conv2d(padded, weight.to(dtype), None, strides, 0, dilations, groups)
    multiplier = _multiplier_torch(node, w_scale)
    return _requantize_torch(node, acc, bias, multiplier, (1, -1, 1, 1))


def _zero_point_padded_conv2d_relax(node, x, weight):
    """Return the int32 convolution of ``x`` padded with ``x_zero_point``, as one TIR function
    with the padding inside, as TVM's own conv2d has it. A separate pad op would stay a kernel
    of its own, because FuseOps fuses a convolution with the elementwise ops after it but not
    with an injective op (pad) before or after it."""
    from tvm import te, topi

    relax = relax_module()
    (stride_h, stride_w), pads, (dilation_h, dilation_w), groups = _conv_settings(node)
    zero_point = int(node.attrs.get("x_zero_point", 0))
    top, left, bottom, right = pads
    out_channels, group_channels, kernel_h, kernel_w = node.inputs[1].shape
    group_outputs = out_channels // groups

    def compute(data, kernel):
        # One pad stage and one reduction, the structure of TVM's float conv2d. topi.nn.conv
        # would add a second (identity) pad stage after this one.
        padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right],
                             pad_value=zero_point, name="pad_zero_point")
        channel = te.reduce_axis((0, group_channels), name="rc")
        row = te.reduce_axis((0, kernel_h), name="ry")
        column = te.reduce_axis((0, kernel_w), name="rx")
        return te.compute(
            node.outputs[0].shape,
            lambda n, f, y, x: te.sum(
                padded[n, f // group_outputs * group_channels + channel,
                       y * stride_h + row * dilation_h,
                       x * stride_w + column * dilation_w].astype("int32")
                * kernel[f, channel, row, column].astype("int32"),
                axis=[channel, row, column]),
            name="conv2d_nchw",
        )

    builder = relax.BlockBuilder.current()
    if builder is None:  # not inside lower_to_relax: the same, with Relax ops
        padded = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right],
                                 pad_value=float(zero_point))
        return relax.op.nn.conv2d(padded, weight, strides=strides, dilation=dilations,
                                  groups=groups, out_dtype="int32")
    return builder.call_te(compute, x, weight, primfunc_name_hint="qconv2d_zero_point_pad")


def _layer_constants(node) -> bool:
    """Return whether the weight, its scales and the bias (if any) of an int8 layer are
    constants."""
    return all(isinstance(v, Constant) for v in node.inputs[1:])


def _qconv2d_pack(node, features) -> dict[int, np.ndarray]:
    _, channels, kernel_h, kernel_w = node.inputs[1].shape
    out_h, out_w = node.outputs[0].shape[2:]
    if (features.vnni and node.inputs[0].dtype == "uint8" and _layer_constants(node)
            and int(node.attrs.get("groups", 1)) == 1 and out_h * out_w > 1
            and channels * kernel_h * kernel_w >= vnni.MIN_REDUCTION):
        return {1: vnni.pack_conv_weight(node.inputs[1].data)}
    return {}


def _qconv2d_relax(node, x, weight, w_scale, bias=None):
    op = relax_module().op
    settings = _conv_settings(node)
    strides, pads, dilations, groups = settings
    if packed_input(node, 1) is not None:
        acc = vnni.conv2d(node, x, weight, settings)
    elif any(pads) and int(node.attrs.get("x_zero_point", 0)) != 0:
        acc = _zero_point_padded_conv2d_relax(node, x, weight)
    else:
        # TVM's conv2d pads with 0, which is the quantized 0.0 when x_zero_point is 0.
        acc = op.nn.conv2d(x, weight, strides=strides, padding=pads, dilation=dilations,
                           groups=groups, out_dtype="int32")
    shape = (1, node.inputs[1].shape[0], 1, 1)
    offset = _zero_point_offset_relax(node, weight, bias, [1, 2, 3], shape)
    multiplier = _multiplier_relax(node, w_scale, shape)
    return _requantize_relax(node, acc, offset, multiplier)


register_op(
    "qconv2d", infer=_qconv2d_infer, torch=_qconv2d_torch, relax=_qconv2d_relax,
    macs=lambda node: get_op("conv2d").macs(node), inputs=(3, 4), pack=_qconv2d_pack,
    doc="int8 2-D convolution with int32 accumulation and requantization: inputs x (int8 or "
        "uint8), weight (int8 [O,C/groups,kH,kW], symmetric), w_scale (float32 [O]), optional "
        "bias (int32 [O]); attrs: x_scale, x_zero_point, y_scale, y_zero_point, activation "
        "(None or relu) and conv2d's strides, pads, dilations, groups",
)


# --- qlinear ----------------------------------------------------------------------------------


def _qlinear_infer(node):
    [(shape, dtype)] = get_op("linear").infer(node)
    _check_layer_params(node, node.inputs[1].shape[0])
    return [(shape, dtype)]


def _qlinear_torch(node, x, weight, w_scale, bias=None):
    centered = x.to(torch.int32) - int(node.attrs.get("x_zero_point", 0))
    dtype = _exact_dtype(weight.shape[1], float(centered.abs().max()), float(weight.abs().max()))
    acc = torch.matmul(centered.to(dtype), weight.to(dtype).T)
    multiplier = _multiplier_torch(node, w_scale)
    return _requantize_torch(node, acc, bias, multiplier, (-1,))


def _linear_pack(node, features) -> dict[int, np.ndarray]:
    """Pack the weight of a qlinear (uint8 input) or dynamic_qlinear for VNNI when its input
    rows are whole blocks of 4 uint8 values, and long enough (vnni.MIN_REDUCTION)."""
    x, weight = node.inputs[:2]
    uint8_input = x.dtype == "uint8" or node.op == "dynamic_qlinear"
    if (features.vnni and uint8_input and _layer_constants(node)
            and x.shape[-1] % vnni.INPUT_BLOCK == 0 and x.shape[-1] >= vnni.MIN_REDUCTION):
        return {1: vnni.pack_linear_weight(weight.data)}
    return {}


def _qlinear_relax(node, x, weight, w_scale, bias=None):
    op = relax_module().op
    if packed_input(node, 1) is not None:
        acc = vnni.linear(node, x, weight)
    else:
        acc = op.linear(x, weight, out_dtype="int32")
    shape = (node.inputs[1].shape[0],)
    offset = _zero_point_offset_relax(node, weight, bias, [1], shape)
    multiplier = _multiplier_relax(node, w_scale, shape)
    return _requantize_relax(node, acc, offset, multiplier)


register_op(
    "qlinear", infer=_qlinear_infer, torch=_qlinear_torch, relax=_qlinear_relax,
    macs=lambda node: get_op("linear").macs(node), inputs=(3, 4), pack=_linear_pack,
    doc="int8 linear layer y = requantize(x @ weight.T + bias): inputs x (int8 or uint8 "
        "[..., in]), weight (int8 [out,in], symmetric), w_scale (float32 [out]), optional bias "
        "(int32 [out]); attrs: x_scale, x_zero_point, y_scale, y_zero_point, activation",
)


# --- dynamic_qlinear --------------------------------------------------------------------------


def _dynamic_qlinear_infer(node):
    [(shape, _)] = get_op("linear").infer(node)
    x, weight, w_scale = node.inputs[:3]
    _check_dtype(node, x, "input", "float32")
    _check_dtype(node, weight, "weight", "int8")
    _check_dtype(node, w_scale, "weight scale", "float32")
    out_features = weight.shape[0]
    for value in node.inputs[2:]:
        if value.shape != (out_features,):
            raise ValueError(f"dynamic_qlinear '{node.name}': '{value.name}' has shape "
                             f"{value.shape}, expected ({out_features},)")
    if len(node.inputs) == 4:
        _check_dtype(node, node.inputs[3], "bias", "float32")
    return [(shape, "float32")]


def dynamic_input_params(x: torch.Tensor,
                         per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the float32 scale and zero point (a float that is an integer in 0..255) that
    ONNX DynamicQuantizeLinear gives ``x``, or each row of ``x`` (shape [..., 1]) with
    ``per_row``. An all-zero range gets scale 1 instead of 0."""
    zero = torch.zeros((), dtype=torch.float32)
    if per_row:
        low = torch.minimum(x.amin(dim=-1, keepdim=True), zero)
        high = torch.maximum(x.amax(dim=-1, keepdim=True), zero)
    else:
        low = torch.minimum(x.min(), zero)
        high = torch.maximum(x.max(), zero)
    scale = (high - low) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(zero - low / scale), 0, 255)
    return scale, zero_point


def _dynamic_qlinear_torch(node, x, weight, w_scale, bias=None):
    scale, zero_point = dynamic_input_params(x, bool(node.attrs.get("per_row", False)))
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    centered = q - zero_point
    dtype = _exact_dtype(weight.shape[1], 255.0, float(weight.abs().max()))
    acc = torch.matmul(centered.to(dtype), weight.to(dtype).T)
    y = acc.to(torch.float32) * (scale * w_scale)
    if bias is not None:
        y = y + bias
    return torch_activation(y, node.attrs.get("activation"))


def _dynamic_qlinear_relax(node, x, weight, w_scale, bias=None):
    relax = relax_module()
    op = relax.op
    zero = relax.const(0.0, "float32")
    axis = [-1] if node.attrs.get("per_row", False) else None
    low = op.minimum(op.min(x, axis=axis, keepdims=True), zero)
    high = op.maximum(op.max(x, axis=axis, keepdims=True), zero)
    scale = op.divide(op.subtract(high, low), relax.const(255.0, "float32"))
    scale = op.where(op.equal(scale, zero), relax.const(1.0, "float32"), scale)
    zero_point = op.clip(op.round(op.subtract(zero, op.divide(low, scale))), 0.0, 255.0)
    q = op.clip(op.add(op.round(op.divide(x, scale)), zero_point), 0.0, 255.0)
    if packed_input(node, 1) is not None:
        acc = vnni.linear(node, op.astype(q, "uint8"), weight)
        zero_point_int32 = op.astype(zero_point, "int32")
    else:
        # Shift uint8 values by -128 into int8, on both q and its zero point: differences stay.
        shift = relax.const(128.0, "float32")
        q_int8 = op.astype(op.subtract(q, shift), "int8")
        zero_point_int32 = op.astype(op.subtract(zero_point, shift), "int32")
        acc = op.linear(q_int8, weight, out_dtype="int32")
    weight_data = _constant_data(node.inputs[1])
    if weight_data is not None:
        weight_sums = relax.const(weight_data.astype(np.int32).sum(axis=1, dtype=np.int32),
                                  "int32")
    else:
        weight_sums = op.sum(op.astype(weight, "int32"), axis=[1])
    acc = op.subtract(acc, op.multiply(weight_sums, zero_point_int32))
    y = op.multiply(op.astype(acc, "float32"), op.multiply(scale, w_scale))
    if bias is not None:
        y = op.add(y, bias)
    return relax_activation(y, node.attrs.get("activation"), "float32")


register_op(
    "dynamic_qlinear", infer=_dynamic_qlinear_infer, torch=_dynamic_qlinear_torch,
    relax=_dynamic_qlinear_relax, macs=lambda node: get_op("linear").macs(node), inputs=(3, 4),
    pack=_linear_pack,
    doc="linear layer with int8 weights whose float32 input is quantized to uint8 per run "
        "(ONNX DynamicQuantizeLinear): inputs x (float32 [..., in]), weight (int8 [out,in]), "
        "w_scale (float32 [out]), optional bias (float32 [out]); attrs: activation, per_row "
        "(one range per row of x instead of one for all of x)",
)


# --- qconv_transpose2d ------------------------------------------------------------------------


def _qconv_transpose2d_infer(node):
    # conv_transpose2d's shape inference reads only inputs 0 and 1 and the conv attributes.
    [(shape, dtype)] = get_op("conv_transpose2d").infer(node)
    if int(node.attrs.get("groups", 1)) != 1:
        raise ValueError(f"qconv_transpose2d '{node.name}': groups must be 1, got "
                         f"{node.attrs['groups']}; grouped transposed convolutions stay float")
    _check_layer_params(node, node.inputs[1].shape[1])
    return [(shape, dtype)]


def _conv_transpose_settings(node):
    strides, pads, dilations, _ = _conv_settings(node)
    output_padding = tuple(int(v) for v in node.attrs.get("output_padding", (0, 0)))
    return strides, pads, dilations, output_padding


def _qconv_transpose2d_torch(node, x, weight, w_scale, bias=None):
    strides, pads, dilations, output_padding = _conv_transpose_settings(node)
    top, left, bottom, right = pads
    centered = x.to(torch.int32) - int(node.attrs.get("x_zero_point", 0))
    # Each output sums at most C * kH * kW products.
    terms = weight.shape[0] * weight.shape[2] * weight.shape[3]
    dtype = _exact_dtype(terms, float(centered.abs().max()), float(weight.abs().max()))
    acc = F.conv_transpose2d(centered.to(dtype), weight.to(dtype), None, strides, 0,
                             output_padding, 1, dilations)
    acc = acc[:, :, top:acc.shape[2] - bottom, left:acc.shape[3] - right]
    multiplier = _multiplier_torch(node, w_scale)
    return _requantize_torch(node, acc, bias, multiplier, (1, -1, 1, 1))


def _qconv_transpose2d_pack(node, features) -> dict[int, np.ndarray]:
    channels = node.inputs[1].shape[0]
    if (features.vnni and node.inputs[0].dtype == "uint8" and _layer_constants(node)
            and is_pixel_shuffle_transpose(node) and channels >= vnni.MIN_TRANSPOSED_CHANNELS):
        return {1: vnni.pack_transposed_weight(node.inputs[1].data)}
    return {}


def _qconv_transpose2d_relax(node, x, weight, w_scale, bias=None):
    relax = relax_module()
    op = relax.op
    strides, pads, dilations, output_padding = _conv_transpose_settings(node)
    settings = {"strides": strides, "padding": pads, "output_padding": output_padding,
                "dilation": dilations, "out_dtype": "int32"}
    zero_point = int(node.attrs.get("x_zero_point", 0))
    packed = packed_input(node, 1) is not None
    if packed:
        # Each output takes one input pixel times one row of the [O*kH*kW, C] weight matrix,
        # so its zero-point term is x_zero_point times that row's sum.
        rows = node.inputs[1].data.astype(np.int64).sum(axis=0).reshape(-1)
        correction = (zero_point * rows).astype(np.int32) if zero_point else None
        acc = vnni.conv_transpose2d(node, x, weight, correction)
    else:
        acc = op.nn.conv2d_transpose(x, weight, **settings)
    if zero_point != 0 and not packed:
        # sum((x - z) * w) = sum(x * w) - z * sum(w over the taps that reach each output).
        # How many taps reach an output varies with its position (stride, borders), so the
        # second term is a transposed convolution of ones with the weights summed over input
        # channels: one channel in, which costs 1/C of the main convolution.
        _, _, height, width = node.inputs[0].shape
        ones = op.ones((1, 1, height, width), "int32")
        weight_data = _constant_data(node.inputs[1])
        if weight_data is not None:
            weight_sums = relax.const(
                weight_data.astype(np.int32).sum(axis=0, keepdims=True, dtype=np.int32), "int32")
        else:
            weight_sums = op.sum(op.astype(weight, "int32"), axis=[0], keepdims=True)
        # NOTE: this conv of ones depends on the weights and shapes alone, but it still runs
        # on every inference. As a constant it would take O * H_out * W_out int32s.
        taps = op.nn.conv2d_transpose(ones, weight_sums, **settings)
        acc = op.subtract(acc, op.multiply(taps, relax.const(zero_point, "int32")))
    shape = (1, node.inputs[1].shape[1], 1, 1)
    if bias is not None:
        bias_data = _constant_data(node.inputs[3])
        bias = (relax.const(bias_data.reshape(shape), "int32") if bias_data is not None
                else op.reshape(bias, shape))
    multiplier = _multiplier_relax(node, w_scale, shape)
    return _requantize_relax(node, acc, bias, multiplier)


register_op(
    "qconv_transpose2d", infer=_qconv_transpose2d_infer, torch=_qconv_transpose2d_torch,
    relax=_qconv_transpose2d_relax, macs=lambda node: get_op("conv_transpose2d").macs(node),
    inputs=(3, 4), pack=_qconv_transpose2d_pack,
    doc="int8 2-D transposed convolution with int32 accumulation and requantization: inputs x "
        "(int8 or uint8), weight (int8 [C,O,kH,kW], symmetric per output channel, axis 1), "
        "w_scale (float32 [O]), optional bias (int32 [O]); attrs: x_scale, x_zero_point, "
        "y_scale, y_zero_point, activation (None or relu) and conv_transpose2d's strides, "
        "pads, output_padding, dilations (groups 1 only)",
)


# --- qmatmul ----------------------------------------------------------------------------------


def matmul_multiplier(attrs) -> float:
    """Return ``a_scale * b_scale / y_scale`` computed in float32, in that order."""
    product = np.float32(attrs["a_scale"]) * np.float32(attrs["b_scale"])
    return float(np.float32(product / np.float32(attrs["y_scale"])))


def _check_qmatmul_attrs(node) -> None:
    attrs = node.attrs
    for key in ("a_scale", "b_scale", "y_scale"):
        scale = attrs.get(key)
        if not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"qmatmul '{node.name}': {key} must be a finite number > 0, got "
                             f"{scale!r}")
    dtypes = {"a": node.inputs[0].dtype, "b": node.inputs[1].dtype, "y": node.inputs[0].dtype}
    for prefix, dtype in dtypes.items():
        low, high = QUANTIZED_RANGES[dtype]
        zero_point = attrs.get(f"{prefix}_zero_point", 0)
        if not isinstance(zero_point, int) or not low <= zero_point <= high:
            raise ValueError(f"qmatmul '{node.name}': {prefix}_zero_point must be an integer in "
                             f"[{low}, {high}] for {dtype}, got {zero_point!r}")
    if attrs.get("activation") is not None:
        raise ValueError(f"qmatmul '{node.name}': a fused activation is not supported")


def _qmatmul_infer(node):
    a, b = node.inputs
    _check_quantized(node, a, "input a")
    _check_quantized(node, b, "input b")
    if a.rank < 2 or b.rank < 2:
        raise ValueError(f"qmatmul '{node.name}': inputs must have rank 2 or more, got "
                         f"{a.shape} and {b.shape}")
    _check_qmatmul_attrs(node)
    [(shape, _)] = get_op("matmul").infer(node)
    return [(shape, a.dtype)]


def _qmatmul_torch(node, a, b):
    attrs = node.attrs
    a_centered = a.to(torch.int32) - int(attrs.get("a_zero_point", 0))
    b_centered = b.to(torch.int32) - int(attrs.get("b_zero_point", 0))
    dtype = _exact_dtype(a.shape[-1], float(a_centered.abs().max()),
                         float(b_centered.abs().max()))
    acc = torch.matmul(a_centered.to(dtype), b_centered.to(dtype))
    multiplier = torch.tensor(matmul_multiplier(attrs), dtype=torch.float32)
    return _requantize_torch(node, acc, None, multiplier, ())


def _qmatmul_relax(node, a, b):
    relax = relax_module()
    op = relax.op
    attrs = node.attrs
    a_zero_point = int(attrs.get("a_zero_point", 0))
    b_zero_point = int(attrs.get("b_zero_point", 0))
    # sum((a - za)(b - zb)) = sum(a b) - za sum(b over k) - zb sum(a over k) + K za zb
    acc = op.matmul(a, b, out_dtype="int32")
    if a_zero_point:
        b_sums = op.sum(op.astype(b, "int32"), axis=[-2], keepdims=True)
        acc = op.subtract(acc, op.multiply(b_sums, relax.const(a_zero_point, "int32")))
    if b_zero_point:
        a_sums = op.sum(op.astype(a, "int32"), axis=[-1], keepdims=True)
        acc = op.subtract(acc, op.multiply(a_sums, relax.const(b_zero_point, "int32")))
    if a_zero_point and b_zero_point:
        both = node.inputs[0].shape[-1] * a_zero_point * b_zero_point
        acc = op.add(acc, relax.const(both, "int32"))
    multiplier = relax.const(matmul_multiplier(attrs), "float32")
    return _requantize_relax(node, acc, None, multiplier)


register_op(
    "qmatmul", infer=_qmatmul_infer, torch=_qmatmul_torch, relax=_qmatmul_relax,
    macs=lambda node: get_op("matmul").macs(node), inputs=2,
    doc="int8 product of two activations, as in attention (Q K^T, P V): inputs a and b (int8 "
        "or uint8, rank >= 2, quantized per tensor; batch dims broadcast); int32 accumulation "
        "of (a - a_zero_point)(b - b_zero_point), requantized with the float32 multiplier "
        "a_scale * b_scale / y_scale to a's dtype; attrs: a_scale, a_zero_point, b_scale, "
        "b_zero_point, y_scale, y_zero_point",
)
