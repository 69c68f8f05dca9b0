"""Neural-network ops: convolutions, linear layers, normalization, pooling, resize, softmax.

Layout is NCHW throughout. Padding attributes use four numbers, (top, left, bottom, right).
Ops that can carry a fused activation (conv2d, conv_transpose2d, linear) read it from the
``activation`` attribute; see ``elementwise.ACTIVATIONS``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphcomp.ops.elementwise import relax_activation, relax_module, torch_activation
from graphcomp.ops.registry import register_op


def _pair(values, default):
    if values is None:
        return tuple(default)
    return tuple(int(v) for v in values)


def _conv_attrs(node):
    attrs = node.attrs
    strides = _pair(attrs.get("strides"), (1, 1))
    dilations = _pair(attrs.get("dilations"), (1, 1))
    pads = _pair(attrs.get("pads"), (0, 0, 0, 0))
    groups = int(attrs.get("groups", 1))
    return strides, pads, dilations, groups


def _conv_out(size, kernel, stride, pad_before, pad_after, dilation):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _bias_shape(rank: int, channels: int) -> tuple[int, ...]:
    return (1, channels) + (1,) * (rank - 2)


# --- conv2d -----------------------------------------------------------------------------------


def _conv2d_infer(node):
    x, w = node.inputs[0], node.inputs[1]
    strides, pads, dilations, groups = _conv_attrs(node)
    n, c, h, wd = x.shape
    out_c, in_per_group, kh, kw = w.shape
    if c != in_per_group * groups:
        raise ValueError(
            f"conv2d '{node.name}': input has {c} channels but weight {w.shape} with "
            f"groups={groups} expects {in_per_group * groups}"
        )
    oh = _conv_out(h, kh, strides[0], pads[0], pads[2], dilations[0])
    ow = _conv_out(wd, kw, strides[1], pads[1], pads[3], dilations[1])
    return [((n, out_c, oh, ow), x.dtype)]


def _torch_pad_for_conv(x, pads):
    top, left, bottom, right = pads
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv2d_torch(node, x, w, b=None):
    strides, pads, dilations, groups = _conv_attrs(node)
    x, padding = _torch_pad_for_conv(x, pads)
    y = F.conv2d(x, w, b, strides, padding, dilations, groups)
    return torch_activation(y, node.attrs.get("activation"))


def _add_channel_bias(y, b, rank):
    relax = relax_module()
    out_channels = int(b.ty.shape[0])  # TVM 0.27 names the type field ty
    return relax.op.add(y, relax.op.reshape(b, _bias_shape(rank, out_channels)))


def _conv2d_relax(node, x, w, b=None):
    relax = relax_module()
    strides, pads, dilations, groups = _conv_attrs(node)
    y = relax.op.nn.conv2d(
        x, w, strides=strides, padding=pads, dilation=dilations, groups=groups,
        out_dtype=node.outputs[0].dtype,
    )
    if b is not None:
        y = _add_channel_bias(y, b, 4)
    return relax_activation(y, node.attrs.get("activation"), node.outputs[0].dtype)


def _conv2d_macs(node):
    w = node.inputs[1]
    out = node.outputs[0]
    return out.size * w.shape[1] * w.shape[2] * w.shape[3]


register_op(
    "conv2d", infer=_conv2d_infer, torch=_conv2d_torch, relax=_conv2d_relax,
    macs=_conv2d_macs, inputs=(2, 3),
    doc="2-D convolution: x[N,C,H,W], weight[O,C/groups,kH,kW], optional bias[O]; "
        "attrs: strides, pads (top,left,bottom,right), dilations, groups, activation",
)


# --- conv_transpose2d -------------------------------------------------------------------------


def _conv_transpose_attrs(node):
    strides, pads, dilations, groups = _conv_attrs(node)
    output_padding = _pair(node.attrs.get("output_padding"), (0, 0))
    return strides, pads, dilations, groups, output_padding


def _conv_transpose_out(size, kernel, stride, pad_before, pad_after, dilation, extra):
    return (size - 1) * stride - pad_before - pad_after + dilation * (kernel - 1) + extra + 1


def _conv_transpose2d_infer(node):
    x, w = node.inputs[0], node.inputs[1]
    strides, pads, dilations, groups, output_padding = _conv_transpose_attrs(node)
    n, c, h, wd = x.shape
    in_c, out_per_group, kh, kw = w.shape
    if c != in_c:
        raise ValueError(
            f"conv_transpose2d '{node.name}': input has {c} channels, weight {w.shape} "
            f"expects {in_c}"
        )
    oh = _conv_transpose_out(h, kh, strides[0], pads[0], pads[2], dilations[0], output_padding[0])
    ow = _conv_transpose_out(wd, kw, strides[1], pads[1], pads[3], dilations[1], output_padding[1])
    return [((n, out_per_group * groups, oh, ow), x.dtype)]


def _conv_transpose2d_torch(node, x, w, b=None):
    strides, pads, dilations, groups, output_padding = _conv_transpose_attrs(node)
    top, left, bottom, right = pads
    # PyTorch takes symmetric padding only: convolve unpadded, then crop each side.
    y = F.conv_transpose2d(x, w, b, strides, 0, output_padding, groups, dilations)
    height, width = y.shape[2], y.shape[3]
    y = y[:, :, top:height - bottom, left:width - right]
    return torch_activation(y, node.attrs.get("activation"))


def is_pixel_shuffle_transpose(node) -> bool:
    """True when each input pixel writes its own kH x kW output tile: stride equal to the
    kernel, no padding, dilation or output padding, one group."""
    strides, pads, dilations, groups, output_padding = _conv_transpose_attrs(node)
    kernel = tuple(node.inputs[1].shape[2:])
    return (strides == kernel and not any(pads) and dilations == (1, 1) and groups == 1
            and output_padding == (0, 0))


def _pixel_shuffle_transpose_relax(node, x, w, b=None):
    """Lower a non-overlapping transposed conv as one matmul and a rearrangement.

    TVM's conv2d_transpose convolves a zero-dilated input, which for stride 2 multiplies by
    zero three times out of four. Here the weight, as an [O*kH*kW, C] matrix, multiplies the
    input as a [C, H*W] matrix per image (NCHW needs no transpose for that). Bias and
    activation are applied to the product, so that TVM fuses them into the matmul's kernel,
    and a second kernel only moves each [kH, kW] tap to its place in the output tile.
    """
    relax = relax_module()
    n, c, h, width = node.inputs[0].shape
    _, out_c, kh, kw = node.inputs[1].shape
    taps = relax.op.reshape(relax.op.permute_dims(w, [1, 2, 3, 0]), (out_c * kh * kw, c))
    y = relax.op.matmul(taps, relax.op.reshape(x, (n, c, h * width)),
                        out_dtype=node.outputs[0].dtype)
    if b is not None:
        # One bias per output channel, repeated for its kH*kW taps.
        y = relax.op.add(y, relax.op.reshape(relax.op.repeat(b, kh * kw, axis=0),
                                             (1, out_c * kh * kw, 1)))
    y = relax_activation(y, node.attrs.get("activation"), node.outputs[0].dtype)
    y = relax.op.permute_dims(relax.op.reshape(y, (n, out_c, kh, kw, h, width)),
                              [0, 1, 4, 2, 5, 3])
    return relax.op.reshape(y, (n, out_c, h * kh, width * kw))


def _conv_transpose2d_relax(node, x, w, b=None):
    relax = relax_module()
    if is_pixel_shuffle_transpose(node):
        return _pixel_shuffle_transpose_relax(node, x, w, b)
    strides, pads, dilations, groups, output_padding = _conv_transpose_attrs(node)
    y = relax.op.nn.conv2d_transpose(
        x, w, strides=strides, padding=pads, output_padding=output_padding,
        dilation=dilations, groups=groups, out_dtype=node.outputs[0].dtype,
    )
    if b is not None:
        y = _add_channel_bias(y, b, 4)
    return relax_activation(y, node.attrs.get("activation"), node.outputs[0].dtype)


def _conv_transpose2d_macs(node):
    x, w = node.inputs[0], node.inputs[1]
    return x.size * w.shape[1] * w.shape[2] * w.shape[3]


register_op(
    "conv_transpose2d", infer=_conv_transpose2d_infer, torch=_conv_transpose2d_torch,
    relax=_conv_transpose2d_relax, macs=_conv_transpose2d_macs, inputs=(2, 3),
    doc="2-D transposed convolution: weight[C,O/groups,kH,kW]; attrs: strides, pads, "
        "output_padding, dilations, groups, activation",
)


# --- linear and matmul ------------------------------------------------------------------------


def _linear_infer(node):
    x, w = node.inputs[0], node.inputs[1]
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"linear '{node.name}': input features {x.shape[-1]} do not match weight {w.shape}"
        )
    return [(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _linear_torch(node, x, w, b=None):
    return torch_activation(F.linear(x, w, b), node.attrs.get("activation"))


def _linear_relax(node, x, w, b=None):
    relax = relax_module()
    y = relax.op.linear(x, w, b)
    return relax_activation(y, node.attrs.get("activation"), node.outputs[0].dtype)


def _linear_macs(node):
    return node.outputs[0].size * node.inputs[1].shape[1]


register_op(
    "linear", infer=_linear_infer, torch=_linear_torch, relax=_linear_relax,
    macs=_linear_macs, inputs=(2, 3),
    doc="y = x @ weight.T + bias, weight[out,in]; attrs: activation",
)


def _matmul_infer(node):
    a, b = node.inputs
    a_shape, b_shape = a.shape, b.shape
    if len(a_shape) == 1 or len(b_shape) == 1:
        out = np.matmul(np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)).shape
        return [(tuple(out), a.dtype)]
    if a_shape[-1] != b_shape[-2]:
        raise ValueError(f"matmul '{node.name}': shapes {a_shape} and {b_shape} do not agree")
    batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    return [(batch + (a_shape[-2], b_shape[-1]), a.dtype)]


def _matmul_macs(node):
    a = node.inputs[0]
    return node.outputs[0].size * a.shape[-1]


register_op(
    "matmul", infer=_matmul_infer,
    torch=lambda node, a, b: torch.matmul(a, b),
    relax=lambda node, a, b: relax_module().op.matmul(a, b),
    macs=_matmul_macs, inputs=2,
    doc="matrix product with NumPy broadcasting of batch dims",
)


# --- normalization ----------------------------------------------------------------------------


def _batch_norm_torch(node, x, scale, bias, mean, var):
    eps = node.attrs.get("eps", 1e-5)
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)


def _batch_norm_relax(node, x, scale, bias, mean, var):
    relax = relax_module()
    op = relax.op
    eps = node.attrs.get("eps", 1e-5)
    dtype = node.inputs[0].dtype
    shape = _bias_shape(node.inputs[0].rank, node.inputs[0].shape[1])
    factor = op.divide(scale, op.sqrt(op.add(var, relax.const(eps, dtype))))
    shift = op.subtract(bias, op.multiply(mean, factor))
    return op.add(op.multiply(x, op.reshape(factor, shape)), op.reshape(shift, shape))


def _batch_norm_macs(node):
    return node.outputs[0].size


register_op(
    "batch_norm",
    infer=lambda node: [(node.inputs[0].shape, node.inputs[0].dtype)],
    torch=_batch_norm_torch, relax=_batch_norm_relax, macs=_batch_norm_macs, inputs=5,
    doc="inference batch norm over dim 1: inputs x, scale, bias, mean, var; attrs: eps",
)


def _layer_norm_axes(node):
    rank = node.inputs[0].rank
    axis = node.attrs.get("axis", -1) % rank
    return list(range(axis, rank))


def _layer_norm_torch(node, x, scale=None, bias=None):
    axes = _layer_norm_axes(node)
    shape = [x.shape[a] for a in axes]
    return F.layer_norm(x, shape, scale, bias, node.attrs.get("eps", 1e-5))


def _layer_norm_relax(node, x, scale=None, bias=None):
    relax = relax_module()
    axes = _layer_norm_axes(node)
    dtype = node.inputs[0].dtype
    norm_shape = [node.inputs[0].shape[a] for a in axes]
    if scale is None:
        scale = relax.const(np.ones(norm_shape, dtype))
    if bias is None:
        bias = relax.const(np.zeros(norm_shape, dtype))
    return relax.op.nn.layer_norm(x, scale, bias, axes, epsilon=node.attrs.get("eps", 1e-5))


register_op(
    "layer_norm",
    infer=lambda node: [(node.inputs[0].shape, node.inputs[0].dtype)],
    torch=_layer_norm_torch, relax=_layer_norm_relax,
    macs=lambda node: node.outputs[0].size, inputs=(1, 3),
    doc="normalize over dims axis..rank-1: inputs x, optional scale, bias; attrs: axis, eps",
)


def _softmax_torch(node, x):
    return torch.softmax(x, dim=node.attrs.get("axis", -1))


register_op(
    "softmax",
    infer=lambda node: [(node.inputs[0].shape, node.inputs[0].dtype)],
    torch=_softmax_torch,
    relax=lambda node, x: relax_module().op.nn.softmax(x, axis=node.attrs.get("axis", -1)),
    doc="softmax along attrs.axis",
)


# --- pooling ----------------------------------------------------------------------------------


def _pool_attrs(node):
    attrs = node.attrs
    kernel = _pair(attrs["kernel"], (1, 1))
    strides = _pair(attrs.get("strides"), kernel)
    pads = _pair(attrs.get("pads"), (0, 0, 0, 0))
    dilations = _pair(attrs.get("dilations"), (1, 1))
    ceil_mode = bool(attrs.get("ceil_mode", False))
    return kernel, strides, pads, dilations, ceil_mode


def _pool_out(size, kernel, stride, pad_before, pad_after, dilation, ceil_mode):
    span = size + pad_before + pad_after - dilation * (kernel - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_before:
        # A window that starts inside the right padding is dropped (PyTorch and ONNX agree).
        out -= 1
    return out


def _pool_infer(node):
    x = node.inputs[0]
    kernel, strides, pads, dilations, ceil_mode = _pool_attrs(node)
    n, c, h, w = x.shape
    oh = _pool_out(h, kernel[0], strides[0], pads[0], pads[2], dilations[0], ceil_mode)
    ow = _pool_out(w, kernel[1], strides[1], pads[1], pads[3], dilations[1], ceil_mode)
    return [((n, c, oh, ow), x.dtype)]


def _symmetric_pool_padding(node, pads):
    top, left, bottom, right = pads
    if top != bottom or left != right:
        raise NotImplementedError(
            f"pooling node '{node.name}': asymmetric pads {pads} are not supported"
        )
    return top, left


def _max_pool2d_torch(node, x):
    kernel, strides, pads, dilations, ceil_mode = _pool_attrs(node)
    padding = _symmetric_pool_padding(node, pads)
    return F.max_pool2d(x, kernel, strides, padding, dilations, ceil_mode)


def _max_pool2d_relax(node, x):
    kernel, strides, pads, dilations, ceil_mode = _pool_attrs(node)
    return relax_module().op.nn.max_pool2d(
        x, kernel, strides, pads, dilations, ceil_mode=ceil_mode
    )


register_op(
    "max_pool2d", infer=_pool_infer, torch=_max_pool2d_torch, relax=_max_pool2d_relax,
    doc="2-D max pooling; attrs: kernel, strides, pads, dilations, ceil_mode",
)


def _avg_pool2d_torch(node, x):
    kernel, strides, pads, _, ceil_mode = _pool_attrs(node)
    padding = _symmetric_pool_padding(node, pads)
    include_pad = bool(node.attrs.get("count_include_pad", False))
    return F.avg_pool2d(x, kernel, strides, padding, ceil_mode, include_pad)


def _avg_pool2d_relax(node, x):
    kernel, strides, pads, dilations, ceil_mode = _pool_attrs(node)
    include_pad = bool(node.attrs.get("count_include_pad", False))
    return relax_module().op.nn.avg_pool2d(
        x, kernel, strides, pads, dilations, ceil_mode=ceil_mode, count_include_pad=include_pad
    )


register_op(
    "avg_pool2d", infer=_pool_infer, torch=_avg_pool2d_torch, relax=_avg_pool2d_relax,
    macs=lambda node: node.outputs[0].size * int(np.prod(_pair(node.attrs["kernel"], (1, 1)))),
    doc="2-D average pooling; attrs: kernel, strides, pads, ceil_mode, count_include_pad",
)


def _global_avg_pool_infer(node):
    x = node.inputs[0]
    return [(x.shape[:2] + (1,) * (x.rank - 2), x.dtype)]


register_op(
    "global_avg_pool",
    infer=_global_avg_pool_infer,
    torch=lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    relax=lambda node, x: relax_module().op.mean(
        x, axis=list(range(2, node.inputs[0].rank)), keepdims=True
    ),
    macs=lambda node: node.inputs[0].size,
    doc="mean over all spatial dims, keeping them as size 1",
)


def _adaptive_avg_pool2d_infer(node):
    x = node.inputs[0]
    out_h, out_w = _pair(node.attrs["output_size"], (1, 1))
    return [((x.shape[0], x.shape[1], out_h, out_w), x.dtype)]


register_op(
    "adaptive_avg_pool2d",
    infer=_adaptive_avg_pool2d_infer,
    torch=lambda node, x: F.adaptive_avg_pool2d(x, tuple(node.attrs["output_size"])),
    relax=lambda node, x: relax_module().op.nn.adaptive_avg_pool2d(
        x, tuple(node.attrs["output_size"])
    ),
    macs=lambda node: node.inputs[0].size,
    doc="average pooling to a fixed output size; attrs: output_size [H, W]",
)


# --- resize -----------------------------------------------------------------------------------

_RESIZE_MODES = ("nearest", "linear")


def _resize_infer(node):
    x = node.inputs[0]
    out_h, out_w = _pair(node.attrs["size"], (1, 1))
    return [((x.shape[0], x.shape[1], out_h, out_w), x.dtype)]


def _resize_torch(node, x):
    mode = node.attrs.get("mode", "nearest")
    transform = node.attrs.get("coordinate_transformation", "asymmetric")
    size = tuple(node.attrs["size"])
    if mode == "nearest":
        if transform != "asymmetric" or node.attrs.get("nearest_mode", "floor") != "floor":
            raise NotImplementedError(
                f"resize '{node.name}': nearest mode supports only asymmetric coordinates "
                f"with floor rounding, got {transform}/{node.attrs.get('nearest_mode')}"
            )
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear":
        if transform == "align_corners":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        raise NotImplementedError(
            f"resize '{node.name}': linear mode with '{transform}' coordinates is not supported"
        )
    raise NotImplementedError(f"resize '{node.name}': mode '{mode}' is not supported")


def _resize_relax(node, x):
    mode = node.attrs.get("mode", "nearest")
    transform = node.attrs.get("coordinate_transformation", "asymmetric")
    method = "nearest_neighbor" if mode == "nearest" else "linear"
    rounding = "floor" if mode == "nearest" else ""
    return relax_module().op.image.resize2d(
        x, tuple(node.attrs["size"]), layout="NCHW", method=method,
        coordinate_transformation_mode=transform, rounding_method=rounding,
    )


register_op(
    "resize", infer=_resize_infer, torch=_resize_torch, relax=_resize_relax,
    doc="resize H and W to attrs.size; attrs: mode (nearest, linear), "
        "coordinate_transformation (asymmetric, half_pixel, align_corners), nearest_mode",
)
