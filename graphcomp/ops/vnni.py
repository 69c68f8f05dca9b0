"""int8 convolutions and linear layers in the layouts of x86 AVX-512 VNNI dot products.

One VNNI instruction (vpdpbusd) adds to each of 16 int32 lanes the sum of four products of a
uint8 and an int8. TVM's MetaSchedule maps a reduction onto it (the tensor intrinsic
``dot_16x4_vnni``) when the innermost loops of the reduction read 4 consecutive uint8 inputs
and a contiguous [16, 4] block of int8 weights, and write 16 consecutive int32 sums. Plain
layouts have neither: a weight [O, C, kH, kW] is contiguous along kW, and an NCHW input is
contiguous along W. So on a target with VNNI:

- weights are packed once, with numpy, when the graph lowers. A conv weight becomes
  [O/16, C/4, kH, kW, 16, 4] and a linear weight [O/16, C/4, 16, 4]. O is rounded up to a
  multiple of 16 and C to one of 4, with zero weights;
- a convolution first copies its input into [N, C/4, H, W, 4], with the padding (the zero
  point) in place, in a kernel of its own. It then computes int32 sums for 16 output channels
  at a time and writes them back in NCHW;
- a linear layer reads its [..., C] input as it is (C a multiple of 4).

Layers with groups, short sums (MIN_REDUCTION, MIN_TRANSPOSED_CHANNELS) or a 1x1 output keep
the plain layout. A transposed conv is packed only when its stride equals its kernel: it is
then a [O*kH*kW, C] matrix times each input pixel.

The sums are exact integers in either layout, so results equal the plain lowering bit for bit.
The functions return int32 accumulators in the plain layout; the caller requantizes them,
and TVM fuses that epilogue into the same kernel.
"""

from __future__ import annotations

import numpy as np

from graphcomp.ops.elementwise import relax_module

OUTPUT_BLOCK = 16  # int32 lanes of one vpdpbusd
INPUT_BLOCK = 4  # uint8 x int8 products per lane

# Layers with shorter sums per output (C * kH * kW) keep the plain layout. In one tuning run
# of PP-OCRv4 det (2-core AMD EPYC, 16 trials per kernel), packed 1x1 convs with 12 or 16 input
# channels took 1.2x to 2.3x longer (2.99 against 1.32 ms at 16 -> 32 channels, 320 x 320),
# because writing NCHW from 16-channel blocks costs more than their short sums save. From 32
# input channels on, packed convs took 1.4x to 10x less time.
MIN_REDUCTION = 32
# A transposed conv with stride equal to its kernel writes kH * kW outputs per input pixel, so
# its output blocks fill faster. PP-OCRv4 det's two, with 24 input channels, went from 2.8 and
# 3.3 ms to 1.1 and 1.2 ms packed.
MIN_TRANSPOSED_CHANNELS = 16

# Relax's OpPatternKind: like TVM's own convolutions, the packed functions fuse with the
# elementwise ops after them.
_OUT_ELEMWISE_FUSABLE = 4
_OPAQUE = 8


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


def pack_conv_weight(weight: np.ndarray) -> np.ndarray:
    """[O, C, kH, kW] int8 -> [ceil(O/16), ceil(C/4), kH, kW, 16, 4], padded with zeros."""
    out_channels, channels, kernel_h, kernel_w = weight.shape
    out_blocks = _blocks(out_channels, OUTPUT_BLOCK)
    in_blocks = _blocks(channels, INPUT_BLOCK)
    padded = np.zeros((out_blocks * OUTPUT_BLOCK, in_blocks * INPUT_BLOCK, kernel_h, kernel_w),
                      np.int8)
    padded[:out_channels, :channels] = weight
    blocked = padded.reshape(out_blocks, OUTPUT_BLOCK, in_blocks, INPUT_BLOCK, kernel_h, kernel_w)
    return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 1, 3))


def pack_linear_weight(weight: np.ndarray) -> np.ndarray:
    """[O, C] int8 -> [ceil(O/16), ceil(C/4), 16, 4], padded with zeros."""
    packed = pack_conv_weight(weight[:, :, None, None])
    return np.ascontiguousarray(packed[:, :, 0, 0])


def conv2d(node, x, packed_weight, settings):
    """Return the int32 convolution of ``x`` (uint8 NCHW) padded with ``x_zero_point`` and
    ``packed_weight`` (from pack_conv_weight), in NCHW. ``settings`` is (strides, pads,
    dilations, groups) with groups 1."""
    from tvm import te

    relax = relax_module()
    (stride_h, stride_w), pads, (dilation_h, dilation_w), _ = settings
    batch, channels = node.inputs[0].shape[:2]
    out_channels, _, kernel_h, kernel_w = node.inputs[1].shape
    out_shape = node.outputs[0].shape

    def convolve(packed, kernel):
        block = te.reduce_axis((0, _blocks(channels, INPUT_BLOCK)), name="rc")
        row = te.reduce_axis((0, kernel_h), name="ry")
        column = te.reduce_axis((0, kernel_w), name="rx")
        lane = te.reduce_axis((0, INPUT_BLOCK), name="rl")
        sums = te.compute(
            (batch, _blocks(out_channels, OUTPUT_BLOCK), *out_shape[2:], OUTPUT_BLOCK),
            lambda n, f_block, y, x_, f_lane: te.sum(
                packed[n, block, y * stride_h + row * dilation_h,
                       x_ * stride_w + column * dilation_w, lane].astype("int32")
                * kernel[f_block, block, row, column, f_lane, lane].astype("int32"),
                axis=[block, row, column, lane]),
            name="conv2d_nchw16c",
        )
        return te.compute(
            out_shape,
            lambda n, f, y, x_: sums[n, f // OUTPUT_BLOCK, y, x_, f % OUTPUT_BLOCK],
            name="unpack_nchw",
        )

    builder = relax.BlockBuilder.current()
    packed = _packed_input(builder, node, x, pads)
    return _fusable(builder, builder.call_te(convolve, packed, packed_weight,
                                             primfunc_name_hint="qconv2d_vnni"))


def pack_transposed_weight(weight: np.ndarray) -> np.ndarray:
    """[C, O, kH, kW] int8 -> the [O*kH*kW, C] matrix packed by pack_linear_weight."""
    channels, out_channels, kernel_h, kernel_w = weight.shape
    rows = weight.transpose(1, 2, 3, 0).reshape(out_channels * kernel_h * kernel_w, channels)
    return pack_linear_weight(rows)


def conv_transpose2d(node, x, packed_weight, correction: np.ndarray | None):
    """Return the int32 transposed convolution of ``x`` (uint8 NCHW) with stride equal to the
    kernel (each input pixel writes its own kH x kW tile), in NCHW. ``packed_weight`` comes
    from pack_transposed_weight. ``correction`` (int32, one per row o*kH*kW + i*kW + j of that
    matrix) is subtracted from each output that the row computes."""
    from tvm import te

    relax = relax_module()
    batch, channels, height, width = node.inputs[0].shape
    _, out_channels, kernel_h, kernel_w = node.inputs[1].shape
    rows = out_channels * kernel_h * kernel_w
    out_shape = node.outputs[0].shape

    def multiply(packed, kernel, *terms):
        block = te.reduce_axis((0, _blocks(channels, INPUT_BLOCK)), name="rc")
        lane = te.reduce_axis((0, INPUT_BLOCK), name="rl")
        sums = te.compute(
            (batch, _blocks(rows, OUTPUT_BLOCK), height, width, OUTPUT_BLOCK),
            lambda n, r_block, y, x_, r_lane: te.sum(
                packed[n, block, y, x_, lane].astype("int32")
                * kernel[r_block, block, r_lane, lane].astype("int32"),
                axis=[block, lane]),
            name="tiles_nchw16c",
        )

        def element(n, o, y, x_):
            row = (o * kernel_h + y % kernel_h) * kernel_w + x_ % kernel_w
            value = sums[n, row // OUTPUT_BLOCK, y // kernel_h, x_ // kernel_w,
                         row % OUTPUT_BLOCK]
            return value - terms[0][row] if terms else value

        return te.compute(out_shape, element, name="unpack_tiles")

    builder = relax.BlockBuilder.current()
    packed = _packed_input(builder, node, x, (0, 0, 0, 0))
    terms = [] if correction is None else [relax.const(correction, "int32")]
    return _fusable(builder, builder.call_te(multiply, packed, packed_weight, *terms,
                                             primfunc_name_hint="qconv_transpose2d_vnni"))


def _packed_input(builder, node, x, pads):
    """Emit the copy of ``x`` (uint8 NCHW) into [N, C/4, H, W, 4], padded by ``pads`` (top,
    left, bottom, right) with ``x_zero_point``, and return its variable."""
    from tvm import te, tirx

    relax = relax_module()
    top, left, bottom, right = pads
    batch, channels, height, width = node.inputs[0].shape
    zero_point = tirx.const(int(node.attrs.get("x_zero_point", 0)), "uint8")
    shape = (batch, _blocks(channels, INPUT_BLOCK), height + top + bottom,
             width + left + right, INPUT_BLOCK)

    def element(n, block, y, x_, lane):
        channel = block * INPUT_BLOCK + lane
        inside = te.all(channel < channels, y >= top, y < height + top,
                        x_ >= left, x_ < width + left)
        return te.if_then_else(inside, data[n, channel, y - top, x_ - left], zero_point)

    data = te.placeholder(node.inputs[0].shape, "uint8", name="x")
    packed = te.compute(shape, element, name="pack_nchw4c")
    function = _scheduled_pack(te.create_prim_func([data, packed]))
    return builder.emit(relax.call_tir(builder.add_func(function, "pack_nchw4c"),
                                       [_bound(builder, x)], relax.TensorType(shape, "uint8")))


def linear(node, x, packed_weight):
    """Return the int32 product ``x @ weight.T`` of ``x`` (uint8 [..., C]) and
    ``packed_weight`` (from pack_linear_weight), as [..., O]."""
    from tvm import te

    relax = relax_module()
    *leading, channels = node.inputs[0].shape
    out_channels = node.inputs[1].shape[0]

    def multiply(data, kernel):
        block = te.reduce_axis((0, channels // INPUT_BLOCK), name="rc")
        lane = te.reduce_axis((0, INPUT_BLOCK), name="rl")
        sums = te.compute(
            (*leading, _blocks(out_channels, OUTPUT_BLOCK), OUTPUT_BLOCK),
            lambda *i: te.sum(
                data[(*i[:-2], block * INPUT_BLOCK + lane)].astype("int32")
                * kernel[i[-2], block, i[-1], lane].astype("int32"),
                axis=[block, lane]),
            name="dense_n16",
        )
        return te.compute(
            (*leading, out_channels),
            lambda *i: sums[(*i[:-1], i[-1] // OUTPUT_BLOCK, i[-1] % OUTPUT_BLOCK)],
            name="unpack",
        )

    builder = relax.BlockBuilder.current()
    return _fusable(builder, builder.call_te(multiply, _bound(builder, x), packed_weight,
                                             primfunc_name_hint="qlinear_vnni"))


def _scheduled_pack(function):
    """Schedule the input copy once: rows in parallel, the 4 channels of each element unrolled.

    In a few trials MetaSchedule finds no good schedule for it: its vectorized candidates
    gather 4 rows a byte at a time, 9 ms for a [1, 96, 160, 160] input against 0.1 ms. Tuning
    a copy is wasted time too, so the function is marked scheduled, which tuning skips.
    """
    from tvm.s_tir import Schedule

    schedule = Schedule(function)
    block = schedule.get_sblock("pack_nchw4c")
    n, channel_block, row, _, lane = schedule.get_loops(block)
    schedule.parallel(schedule.fuse(n, channel_block, row))
    schedule.unroll(lane)
    # Relax names the function when it adds it to the module.
    scheduled = schedule.mod["main"].without_attr("global_symbol")
    scheduled = scheduled.with_attr("tirx.is_scheduled", True)
    return scheduled.with_attr("op_pattern", _OPAQUE)


def _bound(builder, expr):
    """call_te takes variables: bind an expression (such as a cast) to one first."""
    return expr if isinstance(expr, relax_module().Var) else builder.emit(expr)


def _fusable(builder, call):
    """Mark the TIR function that ``call`` calls as fusable with elementwise ops after it."""
    function = call.args[0]
    builder.update_func(function, builder.get()[function].with_attr("op_pattern",
                                                                    _OUT_ELEMWISE_FUSABLE))
    return call
