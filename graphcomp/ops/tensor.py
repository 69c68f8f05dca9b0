"""Data-movement and reduction ops: concat, split, reshape, transpose, slice, gather, reduce.

Every shape-like argument is a static attribute: frontends fold shape computations into
attributes before building the graph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from graphcomp.ops.elementwise import relax_module
from graphcomp.ops.registry import register_op


def _axis(node, rank: int, key: str = "axis", default: int = 0) -> int:
    return int(node.attrs.get(key, default)) % rank


# --- concat and split -------------------------------------------------------------------------


def _concat_infer(node):
    first = node.inputs[0]
    axis = _axis(node, first.rank)
    total = 0
    for value in node.inputs:
        rest = value.shape[:axis] + value.shape[axis + 1:]
        if rest != first.shape[:axis] + first.shape[axis + 1:]:
            raise ValueError(
                f"concat '{node.name}': input shapes {[v.shape for v in node.inputs]} differ "
                f"outside axis {axis}"
            )
        total += value.shape[axis]
    return [(first.shape[:axis] + (total,) + first.shape[axis + 1:], first.dtype)]


register_op(
    "concat", infer=_concat_infer,
    torch=lambda node, *xs: torch.cat(xs, dim=node.attrs.get("axis", 0)),
    relax=lambda node, *xs: relax_module().op.concat(list(xs), axis=node.attrs.get("axis", 0)),
    inputs=(1, 1 << 16),
    doc="join inputs along attrs.axis",
)


def _split_infer(node):
    x = node.inputs[0]
    axis = _axis(node, x.rank)
    sizes = [int(s) for s in node.attrs["sizes"]]
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split '{node.name}': sizes {sizes} do not sum to {x.shape[axis]}")
    return [(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in sizes]


def _split_relax(node, x):
    sizes = [int(s) for s in node.attrs["sizes"]]
    indices = list(np.cumsum(sizes)[:-1])
    return relax_module().op.split(x, [int(i) for i in indices], axis=node.attrs.get("axis", 0))


register_op(
    "split", infer=_split_infer,
    torch=lambda node, x: tuple(
        torch.split(x, list(node.attrs["sizes"]), node.attrs.get("axis", 0))
    ),
    relax=_split_relax,
    doc="split along attrs.axis into pieces of attrs.sizes; one output per piece",
)


# --- reshape, flatten, transpose, expand -------------------------------------------------------


def _reshape_infer(node):
    x = node.inputs[0]
    shape = tuple(int(d) for d in node.attrs["shape"])
    if int(np.prod(shape)) != x.size:
        raise ValueError(f"reshape '{node.name}': cannot reshape {x.shape} to {shape}")
    return [(shape, x.dtype)]


register_op(
    "reshape", infer=_reshape_infer,
    torch=lambda node, x: x.reshape(tuple(node.attrs["shape"])),
    relax=lambda node, x: relax_module().op.reshape(x, tuple(node.attrs["shape"])),
    doc="reshape to the static attrs.shape (no -1 or 0 entries)",
)


def _flatten_infer(node):
    x = node.inputs[0]
    axis = _axis(node, x.rank + 1, default=1)
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    return [((outer, x.size // max(outer, 1)), x.dtype)]


def _flatten_torch(node, x):
    return x.reshape(_flatten_infer(node)[0][0])


register_op(
    "flatten", infer=_flatten_infer, torch=_flatten_torch,
    relax=lambda node, x: relax_module().op.reshape(x, node.outputs[0].shape),
    doc="reshape to 2-D, joining dims before and from attrs.axis (default 1)",
)


def _transpose_infer(node):
    x = node.inputs[0]
    perm = [int(p) for p in node.attrs["perm"]]
    if sorted(perm) != list(range(x.rank)):
        raise ValueError(f"transpose '{node.name}': perm {perm} is not a permutation of {x.rank}")
    return [(tuple(x.shape[p] for p in perm), x.dtype)]


register_op(
    "transpose", infer=_transpose_infer,
    torch=lambda node, x: x.permute(*node.attrs["perm"]),
    relax=lambda node, x: relax_module().op.permute_dims(x, list(node.attrs["perm"])),
    doc="permute dims by attrs.perm",
)


def _expand_infer(node):
    x = node.inputs[0]
    shape = tuple(np.broadcast_shapes(x.shape, tuple(node.attrs["shape"])))
    return [(shape, x.dtype)]


register_op(
    "expand", infer=_expand_infer,
    torch=lambda node, x: x.expand(node.outputs[0].shape),
    relax=lambda node, x: relax_module().op.broadcast_to(x, node.outputs[0].shape),
    doc="broadcast to attrs.shape",
)


# --- pad, slice, gather -----------------------------------------------------------------------


def _pad_infer(node):
    x = node.inputs[0]
    pads = [int(p) for p in node.attrs["pads"]]  # ONNX order: all befores, then all afters
    rank = x.rank
    shape = tuple(x.shape[i] + pads[i] + pads[i + rank] for i in range(rank))
    return [(shape, x.dtype)]


def _pad_torch(node, x):
    pads = [int(p) for p in node.attrs["pads"]]
    rank = x.dim()
    torch_pads: list[int] = []
    for i in reversed(range(rank)):
        torch_pads += [pads[i], pads[i + rank]]
    mode = node.attrs.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, value=float(node.attrs.get("value", 0.0)))
    # PyTorch's reflect and replicate modes pad only the dims after batch and channel.
    spatial = 2 * (rank - 2)
    if rank < 3 or any(torch_pads[spatial:]):
        raise NotImplementedError(
            f"pad '{node.name}': mode '{mode}' pads only the dims after batch and channel of a "
            f"rank-3 to rank-5 input, got pads {pads}"
        )
    return F.pad(x, torch_pads[:spatial], mode=mode)


def _pad_relax(node, x):
    pads = [int(p) for p in node.attrs["pads"]]
    rank = node.inputs[0].rank
    pad_width = []
    for i in range(rank):
        pad_width += [pads[i], pads[i + rank]]
    mode = node.attrs.get("mode", "constant")
    return relax_module().op.nn.pad(
        x, pad_width, pad_mode=mode, pad_value=float(node.attrs.get("value", 0.0))
    )


register_op(
    "pad", infer=_pad_infer, torch=_pad_torch, relax=_pad_relax,
    doc="pad each dim; attrs: pads (all befores then all afters), "
        "mode (constant, reflect, replicate), value",
)


def _slice_params(node):
    x = node.inputs[0]
    attrs = node.attrs
    axes = [int(a) % x.rank for a in attrs.get("axes", range(len(attrs["starts"])))]
    steps = [int(s) for s in attrs.get("steps", [1] * len(axes))]
    starts, ends = [], []
    for axis, start, end, step in zip(axes, attrs["starts"], attrs["ends"], steps):
        begin, stop, _ = slice(int(start), int(end), step).indices(x.shape[axis])
        starts.append(begin)
        ends.append(stop)
    return axes, starts, ends, steps


def _slice_infer(node):
    x = node.inputs[0]
    shape = list(x.shape)
    for axis, start, end, step in zip(*_slice_params(node)):
        shape[axis] = len(range(start, end, step))
    return [(tuple(shape), x.dtype)]


def _slice_torch(node, x):
    index = [slice(None)] * x.dim()
    for axis, start, end, step in zip(*_slice_params(node)):
        if step < 0:
            raise NotImplementedError(f"slice '{node.name}': negative steps are not supported")
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _slice_relax(node, x):
    axes, starts, ends, steps = _slice_params(node)
    return relax_module().op.strided_slice(x, axes, starts, ends, steps)


register_op(
    "slice", infer=_slice_infer, torch=_slice_torch, relax=_slice_relax,
    doc="static strided slice; attrs: starts, ends, axes, steps (Python slice semantics)",
)


def _gather_infer(node):
    data, indices = node.inputs
    axis = _axis(node, data.rank)
    shape = data.shape[:axis] + indices.shape + data.shape[axis + 1:]
    return [(shape, data.dtype)]


def _gather_torch(node, data, indices):
    axis = _axis(node, data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    flat = torch.index_select(data, axis, indices.reshape(-1).long())
    return flat.reshape(_gather_infer(node)[0][0])


def _gather_relax(node, data, indices):
    axis = _axis(node, node.inputs[0].rank)
    return relax_module().op.take(data, indices, axis=axis, mode="wrap")


register_op(
    "gather", infer=_gather_infer, torch=_gather_torch, relax=_gather_relax, inputs=2,
    doc="take entries of data along attrs.axis at integer indices (negative counts from end)",
)


def _embedding_infer(node):
    ids, table = node.inputs
    return [(ids.shape + table.shape[1:], table.dtype)]


register_op(
    "embedding", infer=_embedding_infer,
    torch=lambda node, ids, table: F.embedding(ids.long(), table),
    relax=lambda node, ids, table: relax_module().op.take(table, ids, axis=0, mode="clip"),
    inputs=2,
    doc="look up rows of table[V, D] at ids; inputs: ids, table",
)


# --- reductions -------------------------------------------------------------------------------


def _reduce_axes(node) -> list[int]:
    rank = node.inputs[0].rank
    axes = node.attrs.get("axes")
    if axes is None:
        return list(range(rank))
    return sorted(int(a) % rank for a in axes)


def _reduce_infer(node):
    x = node.inputs[0]
    axes = _reduce_axes(node)
    keep = bool(node.attrs.get("keepdims", True))
    shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else [
        d for i, d in enumerate(x.shape) if i not in axes
    ]
    return [(tuple(shape), x.dtype)]


def _register_reduce(name, torch_fn, relax_name):
    register_op(
        name, infer=_reduce_infer,
        torch=lambda node, x: torch_fn(
            x, _reduce_axes(node), bool(node.attrs.get("keepdims", True))
        ),
        relax=lambda node, x: getattr(relax_module().op, relax_name)(
            x, axis=_reduce_axes(node), keepdims=bool(node.attrs.get("keepdims", True))
        ),
        macs=lambda node: node.inputs[0].size,
        doc=f"{relax_name} over attrs.axes (all when absent); attrs: keepdims",
    )


_register_reduce("reduce_mean", lambda x, axes, keep: x.mean(dim=axes, keepdim=keep), "mean")
_register_reduce("reduce_sum", lambda x, axes, keep: x.sum(dim=axes, keepdim=keep), "sum")
_register_reduce("reduce_max", lambda x, axes, keep: x.amax(dim=axes, keepdim=keep), "max")
