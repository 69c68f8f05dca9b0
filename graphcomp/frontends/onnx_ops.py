"""The ONNX op conversion table: one converter per ONNX op type, each emitting registry ops.

A converter takes the conversion context and one ONNX node. It reads the node's inputs as
graphcomp values, emits one or more graphcomp nodes through ``ConversionContext.emit`` and
binds the node's ONNX outputs to graphcomp values. Shape-like inputs (Reshape's shape, Slice's
starts, ...) must be constants by then: the frontend fixes input shapes and folds shape
computations before conversion. A converter raises ``NodeNotSupported`` for an attribute value
or input that graphcomp cannot represent exactly. The frontend collects those for all nodes and
reports them together.

Attribute conventions follow the registry ops (``graphcomp/ops``): pads are (top, left,
bottom, right), which is also the ONNX order for 2-D ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphcomp.errors import ShapeError
from graphcomp.ir import Constant, Node, Value
from graphcomp.ops import TORCH_DTYPES
from graphcomp.shapes import infer_node


class NodeNotSupported(Exception):
    """A node uses an attribute value or input kind that graphcomp cannot import.

    Internal to the frontend, which turns all of them into one UnsupportedOpError.
    """


@dataclass
class OnnxNode:
    """One ONNX node with its decoded attributes and its unique graphcomp node name."""

    proto: onnx.NodeProto
    name: str
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, proto: onnx.NodeProto, name: str, opset: int) -> "OnnxNode":
        attrs = {}
        for attribute in proto.attribute:
            value = helper.get_attribute_value(attribute)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8") for v in value]
            attrs[attribute.name] = value
        return cls(proto, name, opset, attrs)

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def has_input(self, index: int) -> bool:
        return index < len(self.proto.input) and self.proto.input[index] != ""


class ConversionContext:
    """The values converted so far and the nodes emitted, in order."""

    def __init__(self, values: dict[str, Value], graph_outputs: set[str], used_names: set[str]):
        self.values = dict(values)
        self.graph_outputs = set(graph_outputs)
        self.nodes: list[Node] = []
        self._used_names = set(used_names)

    # --- reading inputs ------------------------------------------------------------------------

    def input(self, node: OnnxNode, index: int) -> Value | None:
        """Return the graphcomp value of input ``index``, or None when the input is omitted."""
        if not node.has_input(index):
            return None
        return self.values[node.inputs[index]]

    def required_input(self, node: OnnxNode, index: int) -> Value:
        value = self.input(node, index)
        if value is None:
            raise NodeNotSupported(f"{node.op_type} without its input {index}")
        return value

    def constant(self, node: OnnxNode, index: int, what: str) -> np.ndarray | None:
        """Return the data of input ``index`` (None when omitted). Raise unless it is constant."""
        value = self.input(node, index)
        if value is None:
            return None
        if not isinstance(value, Constant):
            raise NodeNotSupported(
                f"{node.op_type} with a non-constant {what}: input '{value.name}' is computed "
                "at run time, but graphcomp needs it as a constant to give every tensor a "
                "static shape"
            )
        return value.data

    # --- emitting nodes ------------------------------------------------------------------------

    def fresh_name(self, base: str) -> str:
        """Reserve and return a name starting with ``base`` that no node or value uses yet."""
        name = base
        counter = 1
        while name in self._used_names:
            name = f"{base}_{counter}"
            counter += 1
        self._used_names.add(name)
        return name

    def add_constant(self, node: OnnxNode, role: str, data: np.ndarray) -> Constant:
        return Constant(self.fresh_name(f"{node.name}/{role}"), np.ascontiguousarray(data))

    def emit(
        self,
        node: OnnxNode,
        op: str,
        inputs: list[Value],
        attrs: dict[str, Any] | None = None,
        outputs: list[str] | None = None,
        role: str | None = None,
    ) -> list[Value]:
        """Append a graphcomp node and return its outputs with inferred shapes and dtypes.

        ``outputs`` names the outputs after ONNX tensors and binds them; without it the node
        gets one output with a generated name. The node takes the ONNX node's name, or
        ``<name>/<role>`` for a helper node of a multi-node conversion.
        """
        name = node.name if role is None else self.fresh_name(f"{node.name}/{role}")
        if outputs is None:
            out_values = [Value(self.fresh_name(f"{name}:0"), ())]
        else:
            out_values = [Value(out_name, ()) for out_name in outputs]
        new_node = Node(name, op, list(inputs), out_values, dict(attrs or {}))
        for value, (shape, dtype) in zip(out_values, infer_node(new_node)):
            value.shape = tuple(int(d) for d in shape)
            value.dtype = dtype
        self.nodes.append(new_node)
        if outputs is not None:
            for value in out_values:
                self.values[value.name] = value
        return out_values

    def emit_final(self, node: OnnxNode, op: str, inputs: list[Value],
                   attrs: dict[str, Any] | None = None) -> Value:
        """Emit the node that produces the ONNX node's single output."""
        return self.emit(node, op, inputs, attrs, outputs=[node.outputs[0]])[0]

    def bind(self, node: OnnxNode, value: Value) -> None:
        """Make the ONNX node's output refer to ``value`` without emitting a node.

        A graph output keeps its ONNX name, so for a graph output an identity node is emitted.
        """
        output = node.outputs[0]
        if output in self.graph_outputs and value.name != output:
            self.emit_final(node, "identity", [value])
        else:
            self.values[output] = value


Converter = Callable[[ConversionContext, OnnxNode], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*op_types: str) -> Callable[[Converter], Converter]:
    """Register a converter for the given ONNX op types (default domain)."""

    def register(function: Converter) -> Converter:
        for op_type in op_types:
            CONVERTERS[op_type] = function
        return function

    return register


# --- helpers ---------------------------------------------------------------------------------


def numpy_dtype(onnx_type: int) -> str:
    """Return the numpy dtype name of an ONNX TensorProto data type."""
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)))


def scalar_of(data: np.ndarray, node: OnnxNode, what: str) -> float | int:
    if data.size != 1:
        raise NodeNotSupported(f"{node.op_type} with a {what} of shape {list(data.shape)}")
    return data.reshape(-1)[0].item()


def normalize_axis(axis: int, rank: int, node: OnnxNode) -> int:
    if not -rank <= axis < rank:
        raise NodeNotSupported(f"{node.op_type} with axis {axis} for a rank-{rank} input")
    return axis % rank


def ints_from_attr_or_input(
    ctx: ConversionContext, node: OnnxNode, attr: str, index: int, since_opset: int
) -> list[int] | None:
    """Read an int list that moved from an attribute to an input at ``since_opset``."""
    if node.opset < since_opset:
        values = node.attr(attr)
        return None if values is None else [int(v) for v in values]
    data = ctx.constant(node, index, attr)
    return None if data is None else [int(v) for v in data.reshape(-1)]


# --- elementwise -------------------------------------------------------------------------------

UNARY_OPS = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sqrt": "sqrt",
    "Exp": "exp", "Log": "log", "Neg": "neg", "Abs": "abs", "Reciprocal": "reciprocal",
    "Not": "logical_not", "HardSwish": "hardswish",
}

BINARY_OPS = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Equal": "equal",
    "Less": "less", "Greater": "greater", "GreaterOrEqual": "greater_equal", "And": "logical_and",
}


@converts(*UNARY_OPS)
def convert_unary(ctx: ConversionContext, node: OnnxNode) -> None:
    ctx.emit_final(node, UNARY_OPS[node.op_type], [ctx.required_input(node, 0)])


@converts(*BINARY_OPS)
def convert_binary(ctx: ConversionContext, node: OnnxNode) -> None:
    a = ctx.required_input(node, 0)
    b = ctx.required_input(node, 1)
    if node.op_type == "Div" and not np.issubdtype(np.dtype(a.dtype), np.floating):
        # The registry's div is true division; ONNX divides integers with truncation.
        raise NodeNotSupported(f"Div on {a.dtype} tensors, only floating-point Div is supported")
    ctx.emit_final(node, BINARY_OPS[node.op_type], [a, b])


@converts("LessOrEqual")
def convert_less_or_equal(ctx: ConversionContext, node: OnnxNode) -> None:
    # a <= b -> b >= a
    a = ctx.required_input(node, 0)
    b = ctx.required_input(node, 1)
    ctx.emit_final(node, "greater_equal", [b, a])


@converts("Max", "Min", "Sum")
def convert_variadic(ctx: ConversionContext, node: OnnxNode) -> None:
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add"}[node.op_type]
    values = [ctx.values[name] for name in node.inputs if name]
    if len(values) == 1:
        ctx.bind(node, values[0])
        return
    result = values[0]
    for i, value in enumerate(values[1:-1]):
        result = ctx.emit(node, op, [result, value], role=f"{op}{i}")[0]
    ctx.emit_final(node, op, [result, values[-1]])


@converts("Pow")
def convert_pow(ctx: ConversionContext, node: OnnxNode) -> None:
    base = ctx.required_input(node, 0)
    exponent = ctx.required_input(node, 1)
    if exponent.dtype != base.dtype:
        # ONNX allows an exponent of another type; the registry's pow takes one dtype.
        if isinstance(exponent, Constant):
            exponent = ctx.add_constant(node, "exponent", exponent.data.astype(base.dtype))
        else:
            exponent = ctx.emit(node, "cast", [exponent], {"dtype": base.dtype}, role="cast")[0]
    ctx.emit_final(node, "pow", [base, exponent])


@converts("HardSigmoid")
def convert_hard_sigmoid(ctx: ConversionContext, node: OnnxNode) -> None:
    attrs = {"alpha": float(node.attr("alpha", 0.2)), "beta": float(node.attr("beta", 0.5))}
    ctx.emit_final(node, "hardsigmoid", [ctx.required_input(node, 0)], attrs)


@converts("Gelu")
def convert_gelu(ctx: ConversionContext, node: OnnxNode) -> None:
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NodeNotSupported(f"Gelu with approximate='{approximate}'")
    ctx.emit_final(node, "gelu", [ctx.required_input(node, 0)], {"approximate": approximate})


@converts("Clip")
def convert_clip(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    else:
        low_data = ctx.constant(node, 1, "min")
        high_data = ctx.constant(node, 2, "max")
        low = None if low_data is None else scalar_of(low_data, node, "min")
        high = None if high_data is None else scalar_of(high_data, node, "max")
    cast = float if np.issubdtype(np.dtype(x.dtype), np.floating) else int
    attrs = {
        "min": None if low is None else cast(low),
        "max": None if high is None else cast(high),
    }
    ctx.emit_final(node, "clip", [x], attrs)


@converts("Cast")
def convert_cast(ctx: ConversionContext, node: OnnxNode) -> None:
    dtype = numpy_dtype(int(node.attr("to")))
    if dtype not in TORCH_DTYPES:
        raise NodeNotSupported(f"Cast to {dtype}, supported dtypes are {', '.join(TORCH_DTYPES)}")
    ctx.emit_final(node, "cast", [ctx.required_input(node, 0)], {"dtype": dtype})


@converts("Identity")
def convert_identity(ctx: ConversionContext, node: OnnxNode) -> None:
    ctx.bind(node, ctx.required_input(node, 0))


@converts("Dropout")
def convert_dropout(ctx: ConversionContext, node: OnnxNode) -> None:
    # Inference-mode Dropout returns its input; the mask output has no inference meaning.
    if len(node.outputs) > 1 and node.outputs[1]:
        raise NodeNotSupported("Dropout with its mask output used")
    ctx.bind(node, ctx.required_input(node, 0))


@converts("Where")
def convert_where(ctx: ConversionContext, node: OnnxNode) -> None:
    inputs = [ctx.required_input(node, i) for i in range(3)]
    ctx.emit_final(node, "where", inputs)


# --- softmax, normalization -------------------------------------------------------------------


@converts("Softmax")
def convert_softmax(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    default_axis = 1 if node.opset < 13 else -1
    axis = normalize_axis(int(node.attr("axis", default_axis)), x.rank, node)
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    if node.opset >= 13 or inner == 1:
        ctx.emit_final(node, "softmax", [x], {"axis": axis})
        return
    # Before opset 13, Softmax flattens the input to 2-D at `axis` and normalizes each row.
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    flat = ctx.emit(node, "reshape", [x], {"shape": [rows, x.size // max(rows, 1)]},
                    role="to_2d")[0]
    normalized = ctx.emit(node, "softmax", [flat], {"axis": 1}, role="softmax_2d")[0]
    ctx.emit_final(node, "reshape", [normalized], {"shape": list(x.shape)})


@converts("BatchNormalization")
def convert_batch_norm(ctx: ConversionContext, node: OnnxNode) -> None:
    if int(node.attr("training_mode", 0)) != 0:
        raise NodeNotSupported("BatchNormalization with training_mode=1")
    if int(node.attr("spatial", 1)) != 1:
        raise NodeNotSupported("BatchNormalization with spatial=0")
    if any(node.outputs[1:]):
        raise NodeNotSupported("BatchNormalization with its running mean or variance outputs")
    inputs = [ctx.required_input(node, i) for i in range(5)]
    ctx.emit_final(node, "batch_norm", inputs, {"eps": float(node.attr("epsilon", 1e-5))})


@converts("LayerNormalization")
def convert_layer_norm(ctx: ConversionContext, node: OnnxNode) -> None:
    if any(node.outputs[1:]):
        raise NodeNotSupported("LayerNormalization with its Mean or InvStdDev outputs")
    x = ctx.required_input(node, 0)
    axis = normalize_axis(int(node.attr("axis", -1)), x.rank, node)
    normalized_shape = x.shape[axis:]
    inputs = [x]
    for index, role in ((1, "scale"), (2, "bias")):
        value = ctx.required_input(node, index) if role == "scale" else ctx.input(node, index)
        if value is None:
            break
        if value.shape != normalized_shape:
            if not isinstance(value, Constant):
                raise NodeNotSupported(
                    f"LayerNormalization with a non-constant {role} of shape {list(value.shape)}"
                )
            data = np.broadcast_to(value.data, normalized_shape)
            value = ctx.add_constant(node, role, data.copy())
        inputs.append(value)
    attrs = {"axis": axis, "eps": float(node.attr("epsilon", 1e-5))}
    ctx.emit_final(node, "layer_norm", inputs, attrs)


# --- data movement ---------------------------------------------------------------------------


@converts("Concat")
def convert_concat(ctx: ConversionContext, node: OnnxNode) -> None:
    inputs = [ctx.values[name] for name in node.inputs if name]
    axis = normalize_axis(int(node.attr("axis")), inputs[0].rank, node)
    ctx.emit_final(node, "concat", inputs, {"axis": axis})


@converts("Split")
def convert_split(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    axis = normalize_axis(int(node.attr("axis", 0)), x.rank, node)
    sizes = ints_from_attr_or_input(ctx, node, "split", 1, since_opset=13)
    count = len(node.outputs)
    if sizes is None:
        # Equal pieces; from opset 18 the last piece may be smaller (ceil division).
        piece = -(-x.shape[axis] // count)
        sizes = [min(piece, x.shape[axis] - i * piece) for i in range(count)]
    if len(sizes) != count or any(s < 0 for s in sizes) or sum(sizes) != x.shape[axis]:
        raise NodeNotSupported(
            f"Split with sizes {sizes} for {count} outputs of a dim of size {x.shape[axis]}"
        )
    if not all(node.outputs):
        raise NodeNotSupported("Split with an omitted output")
    ctx.emit(node, "split", [x], {"axis": axis, "sizes": sizes}, outputs=node.outputs)


@converts("Transpose")
def convert_transpose(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    perm = node.attr("perm")
    perm = list(reversed(range(x.rank))) if perm is None else [int(p) for p in perm]
    ctx.emit_final(node, "transpose", [x], {"perm": perm})


@converts("Gather")
def convert_gather(ctx: ConversionContext, node: OnnxNode) -> None:
    data = ctx.required_input(node, 0)
    indices = ctx.required_input(node, 1)
    axis = normalize_axis(int(node.attr("axis", 0)), data.rank, node)
    ctx.emit_final(node, "gather", [data, indices], {"axis": axis})


@converts("Expand")
def convert_expand(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    shape = [int(d) for d in ctx.constant(node, 1, "shape").reshape(-1)]
    ctx.emit_final(node, "expand", [x], {"shape": shape})


@converts("Slice")
def convert_slice(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    starts = ints_from_attr_or_input(ctx, node, "starts", 1, since_opset=10)
    ends = ints_from_attr_or_input(ctx, node, "ends", 2, since_opset=10)
    axes = ints_from_attr_or_input(ctx, node, "axes", 3, since_opset=10)
    steps = None if node.opset < 10 else ints_from_attr_or_input(ctx, node, "steps", 4, 10)
    if starts is None or ends is None:
        raise NodeNotSupported("Slice without starts or ends")
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    clean_starts, clean_ends, clean_axes = [], [], []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step <= 0:
            raise NodeNotSupported(f"Slice with step {step}, only positive steps are supported")
        axis = normalize_axis(axis, x.rank, node)
        # Python slice clamping equals ONNX clamping for positive steps, INT64 limits included.
        begin, stop, _ = slice(start, end, step).indices(x.shape[axis])
        clean_starts.append(begin)
        clean_ends.append(max(begin, stop))
        clean_axes.append(axis)
    attrs = {"starts": clean_starts, "ends": clean_ends, "axes": clean_axes, "steps": steps}
    ctx.emit_final(node, "slice", [x], attrs)


# --- padding ---------------------------------------------------------------------------------

PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


@converts("Pad")
def convert_pad(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    mode = node.attr("mode", "constant")
    if mode not in PAD_MODES:
        supported = ", ".join(PAD_MODES)
        raise NodeNotSupported(f"Pad with mode '{mode}', supported modes are {supported}")
    if node.opset < 11:
        pads = [int(p) for p in node.attr("pads")]
        value = float(node.attr("value", 0.0))
    else:
        pads = [int(p) for p in ctx.constant(node, 1, "pads").reshape(-1)]
        value_data = ctx.constant(node, 2, "constant_value")
        value = 0.0 if value_data is None else float(scalar_of(value_data, node, "value"))
        axes_data = ctx.constant(node, 3, "axes")
        if axes_data is not None:
            pads = _pads_for_all_axes(pads, [int(a) for a in axes_data], x.rank, node)
    if len(pads) != 2 * x.rank:
        raise NodeNotSupported(f"Pad with {len(pads)} pads for a rank-{x.rank} input")
    if any(p < 0 for p in pads):
        raise NodeNotSupported(f"Pad with negative pads {pads}")
    if mode != "constant" and (x.rank < 3 or x.rank > 5 or any(
            pads[i] or pads[i + x.rank] for i in range(2))):
        raise NodeNotSupported(
            f"Pad with mode '{mode}' on the batch or channel dims or on a rank-{x.rank} input, "
            "only the dims after them of rank-3 to rank-5 inputs are supported"
        )
    attrs = {"pads": pads, "mode": PAD_MODES[mode], "value": value}
    ctx.emit_final(node, "pad", [x], attrs)


def _pads_for_all_axes(pads: list[int], axes: list[int], rank: int, node: OnnxNode) -> list[int]:
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        axis = normalize_axis(axis, rank, node)
        full[axis] = pads[i]
        full[axis + rank] = pads[i + len(axes)]
    return full


# --- reshape family ----------------------------------------------------------------------------


def resolve_reshape(
    in_shape: tuple[int, ...], requested: list[int], allow_zero: bool, node: OnnxNode
) -> list[int]:
    """Turn an ONNX Reshape target (0 copies the input dim, -1 is inferred) into a static shape."""
    shape = list(requested)
    if not allow_zero:
        for i, dim in enumerate(requested):
            if dim == 0:
                if i >= len(in_shape):
                    raise NodeNotSupported(f"Reshape copying dim {i} of a {in_shape} input")
                shape[i] = in_shape[i]
    size = int(np.prod(in_shape, dtype=np.int64))
    unknown = [i for i, dim in enumerate(shape) if dim == -1]
    known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
    if len(unknown) > 1 or any(d < -1 for d in shape):
        raise NodeNotSupported(
            f"Reshape to {requested}, which has more than one -1 or another negative dim"
        )
    if unknown:
        if known == 0 or size % known:
            raise _reshape_size_error(in_shape, requested, node)
        shape[unknown[0]] = size // known
    if int(np.prod(shape, dtype=np.int64)) != size:
        raise _reshape_size_error(in_shape, requested, node)
    return shape


def _reshape_size_error(
    in_shape: tuple[int, ...], requested: list[int], node: OnnxNode
) -> ShapeError:
    # A well-formed model reshapes consistently for the input shapes it was made for, so a
    # mismatch points at the input shapes rather than at a missing feature.
    size = int(np.prod(in_shape, dtype=np.int64))
    return ShapeError(
        f"node '{node.name}' (op Reshape) cannot reshape a tensor of shape {list(in_shape)} "
        f"({size} elements) to {requested}"
    )


@converts("Reshape")
def convert_reshape(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    requested = [int(d) for d in ctx.constant(node, 1, "shape").reshape(-1)]
    shape = resolve_reshape(x.shape, requested, bool(node.attr("allowzero", 0)), node)
    ctx.emit_final(node, "reshape", [x], {"shape": shape})


@converts("Flatten")
def convert_flatten(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    axis = int(node.attr("axis", 1))
    if not -x.rank <= axis <= x.rank:
        raise NodeNotSupported(f"Flatten with axis {axis} for a rank-{x.rank} input")
    ctx.emit_final(node, "flatten", [x], {"axis": axis + x.rank if axis < 0 else axis})


@converts("Squeeze")
def convert_squeeze(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    axes = ints_from_attr_or_input(ctx, node, "axes", 1, since_opset=13)
    if axes is None:
        axes = [i for i, dim in enumerate(x.shape) if dim == 1]
    axes = {normalize_axis(a, x.rank, node) for a in axes}
    if any(x.shape[a] != 1 for a in axes):
        raise NodeNotSupported(f"Squeeze of axes {sorted(axes)} of shape {list(x.shape)}")
    shape = [dim for i, dim in enumerate(x.shape) if i not in axes]
    ctx.emit_final(node, "reshape", [x], {"shape": shape})


@converts("Unsqueeze")
def convert_unsqueeze(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    axes = ints_from_attr_or_input(ctx, node, "axes", 1, since_opset=13)
    if not axes:
        raise NodeNotSupported("Unsqueeze without axes")
    out_rank = x.rank + len(axes)
    axes_set = {normalize_axis(a, out_rank, node) for a in axes}
    dims = iter(x.shape)
    shape = [1 if i in axes_set else next(dims) for i in range(out_rank)]
    ctx.emit_final(node, "reshape", [x], {"shape": shape})


# --- ops whose outputs are known at import time -------------------------------------------------


@converts("Shape")
def convert_shape(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    start = int(node.attr("start", 0))
    end = node.attr("end")
    dims = x.shape[start:] if end is None else x.shape[start:int(end)]
    ctx.values[node.outputs[0]] = Constant(node.outputs[0], np.array(dims, dtype=np.int64))


@converts("Size")
def convert_size(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    ctx.values[node.outputs[0]] = Constant(node.outputs[0], np.array(x.size, dtype=np.int64))


@converts("ConstantOfShape")
def convert_constant_of_shape(ctx: ConversionContext, node: OnnxNode) -> None:
    shape = [int(d) for d in ctx.constant(node, 0, "shape").reshape(-1)]
    fill = node.attr("value")
    fill = np.zeros(1, np.float32) if fill is None else numpy_helper.to_array(fill)
    data = np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)
    ctx.values[node.outputs[0]] = Constant(node.outputs[0], data)


@converts("Constant")
def convert_constant(ctx: ConversionContext, node: OnnxNode) -> None:
    # The frontend turns every numeric Constant node into an initializer before folding.
    kinds = ", ".join(sorted(node.attrs))
    raise NodeNotSupported(f"Constant holding {kinds}, only numeric dense constants are supported")


# --- reductions --------------------------------------------------------------------------------

REDUCE_OPS = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max"}


@converts(*REDUCE_OPS)
def convert_reduce(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    axes_input_since = 13 if node.op_type == "ReduceSum" else 18
    axes = ints_from_attr_or_input(ctx, node, "axes", 1, since_opset=axes_input_since)
    if not axes:
        if int(node.attr("noop_with_empty_axes", 0)):
            ctx.bind(node, x)
            return
        axes = list(range(x.rank))
    axes = sorted({normalize_axis(a, x.rank, node) for a in axes})
    attrs = {"axes": axes, "keepdims": bool(node.attr("keepdims", 1))}
    ctx.emit_final(node, REDUCE_OPS[node.op_type], [x], attrs)


@converts("GlobalAveragePool")
def convert_global_average_pool(ctx: ConversionContext, node: OnnxNode) -> None:
    ctx.emit_final(node, "global_avg_pool", [ctx.required_input(node, 0)])


@converts("GlobalMaxPool")
def convert_global_max_pool(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    attrs = {"axes": list(range(2, x.rank)), "keepdims": True}
    ctx.emit_final(node, "reduce_max", [x], attrs)


# --- matrix products ---------------------------------------------------------------------------


@converts("MatMul")
def convert_matmul(ctx: ConversionContext, node: OnnxNode) -> None:
    a = ctx.required_input(node, 0)
    b = ctx.required_input(node, 1)
    ctx.emit_final(node, "matmul", [a, b])


@converts("Gemm")
def convert_gemm(ctx: ConversionContext, node: OnnxNode) -> None:
    """Convert Gemm, y = alpha * op(A) @ op(B) + beta * C.

    A constant B becomes linear's weight [N, K], scaled by alpha. A constant C that broadcasts
    along the rows becomes its bias, scaled by beta. Other cases use matmul, mul and add.
    """
    a = ctx.required_input(node, 0)
    b = ctx.required_input(node, 1)
    c = ctx.input(node, 2)
    alpha = float(node.attr("alpha", 1.0))
    beta = float(node.attr("beta", 1.0))
    if int(node.attr("transA", 0)):
        a = ctx.emit(node, "transpose", [a], {"perm": [1, 0]}, role="transpose_a")[0]
    trans_b = bool(int(node.attr("transB", 0)))
    if c is not None and beta == 0.0:
        c = None
    if isinstance(b, Constant):
        _gemm_as_linear(ctx, node, a, b, c, alpha, beta, trans_b)
    else:
        _gemm_as_matmul(ctx, node, a, b, c, alpha, beta, trans_b)


def _gemm_as_linear(ctx, node, a, b, c, alpha, beta, trans_b) -> None:
    weight = b.data if trans_b else b.data.T
    if alpha != 1.0:
        weight = (weight * alpha).astype(b.dtype)
    weight_value = b if trans_b and alpha == 1.0 else ctx.add_constant(node, "weight", weight)
    out_features = weight.shape[0]
    bias = None
    if isinstance(c, Constant) and c.size in (1, out_features) and c.rank <= 2 and (
            c.rank < 2 or c.shape[0] == 1):
        data = np.broadcast_to((c.data * beta).astype(c.dtype).reshape(-1), (out_features,))
        bias = c if beta == 1.0 and c.shape == (out_features,) else ctx.add_constant(
            node, "bias", data.copy())
        c = None
    inputs = [a, weight_value] + ([bias] if bias is not None else [])
    if c is None:
        ctx.emit_final(node, "linear", inputs)
        return
    product = ctx.emit(node, "linear", inputs, role="linear")[0]
    _gemm_add_c(ctx, node, product, c, beta)


def _gemm_as_matmul(ctx, node, a, b, c, alpha, beta, trans_b) -> None:
    if trans_b:
        b = ctx.emit(node, "transpose", [b], {"perm": [1, 0]}, role="transpose_b")[0]
    if alpha == 1.0 and c is None:
        ctx.emit_final(node, "matmul", [a, b])
        return
    product = ctx.emit(node, "matmul", [a, b], role="matmul")[0]
    if alpha != 1.0:
        scale = ctx.add_constant(node, "alpha", np.array(alpha, dtype=product.dtype))
        if c is None:
            ctx.emit_final(node, "mul", [product, scale])
            return
        product = ctx.emit(node, "mul", [product, scale], role="alpha")[0]
    _gemm_add_c(ctx, node, product, c, beta)


def _gemm_add_c(ctx, node, product: Value, c: Value, beta: float) -> None:
    if beta != 1.0:
        if isinstance(c, Constant):
            c = ctx.add_constant(node, "beta_c", (c.data * beta).astype(c.dtype))
        else:
            scale = ctx.add_constant(node, "beta", np.array(beta, dtype=c.dtype))
            c = ctx.emit(node, "mul", [c, scale], role="beta")[0]
    ctx.emit_final(node, "add", [product, c])


# --- convolution and pooling -------------------------------------------------------------------


def spatial_ints(node: OnnxNode, key: str, default: int) -> list[int]:
    values = node.attr(key)
    if values is None:
        return [default, default]
    if len(values) != 2:
        raise NodeNotSupported(f"{node.op_type} with {key}={list(values)}, only 2-D is supported")
    return [int(v) for v in values]


def auto_pads(
    node: OnnxNode, in_sizes: tuple[int, ...], kernel: list[int], strides: list[int],
    dilations: list[int],
) -> list[int]:
    """Compute the (top, left, bottom, right) pads of a Conv or pooling node from auto_pad."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = node.attr("pads")
        pads = [0, 0, 0, 0] if pads is None else [int(p) for p in pads]
        if len(pads) != 4:
            raise NodeNotSupported(f"{node.op_type} with pads {pads}, only 2-D is supported")
        return pads
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NodeNotSupported(f"{node.op_type} with auto_pad '{auto_pad}'")
    begins, ends = [], []
    for size, k, stride, dilation in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the extra padding at the end, SAME_LOWER at the beginning.
        begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return begins + ends


@converts("Conv")
def convert_conv(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    weight = ctx.required_input(node, 1)
    bias = ctx.input(node, 2)
    if weight.rank != 4 or x.rank != 4:
        raise NodeNotSupported(
            f"Conv with a {weight.rank - 2}-D kernel, only 2-D convolutions on NCHW inputs "
            "are supported"
        )
    kernel = list(weight.shape[2:])
    if node.attr("kernel_shape") is not None and list(node.attr("kernel_shape")) != kernel:
        raise NodeNotSupported(f"Conv with kernel_shape {node.attr('kernel_shape')} "
                               f"for a weight of shape {list(weight.shape)}")
    strides = spatial_ints(node, "strides", 1)
    dilations = spatial_ints(node, "dilations", 1)
    attrs = {
        "strides": strides,
        "pads": auto_pads(node, x.shape[2:], kernel, strides, dilations),
        "dilations": dilations,
        "groups": int(node.attr("group", 1)),
    }
    inputs = [x, weight] + ([bias] if bias is not None else [])
    ctx.emit_final(node, "conv2d", inputs, attrs)


def conv_transpose_pads(node: OnnxNode, in_sizes, kernel, strides, dilations, output_padding):
    """Pads of a ConvTranspose; output_shape or SAME auto_pad fix them from the output size."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    output_shape = node.attr("output_shape")
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return auto_pads(node, in_sizes, kernel, strides, dilations)
    if output_shape is not None:
        targets = [int(d) for d in output_shape][-2:]
    else:
        targets = [size * stride for size, stride in zip(in_sizes, strides)]
    begins, ends = [], []
    for i in range(2):
        span = (kernel[i] - 1) * dilations[i] + 1
        total = strides[i] * (in_sizes[i] - 1) + output_padding[i] + span - targets[i]
        if total < 0:
            raise NodeNotSupported(
                f"ConvTranspose with output size {targets} larger than the full output"
            )
        # ONNX: SAME_UPPER puts the extra padding at the end, otherwise at the beginning.
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return begins + ends


@converts("ConvTranspose")
def convert_conv_transpose(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    weight = ctx.required_input(node, 1)
    bias = ctx.input(node, 2)
    if weight.rank != 4 or x.rank != 4:
        raise NodeNotSupported(
            f"ConvTranspose with a {weight.rank - 2}-D kernel, only 2-D is supported"
        )
    kernel = list(weight.shape[2:])
    strides = spatial_ints(node, "strides", 1)
    dilations = spatial_ints(node, "dilations", 1)
    output_padding = spatial_ints(node, "output_padding", 0)
    pads = conv_transpose_pads(node, x.shape[2:], kernel, strides, dilations, output_padding)
    attrs = {
        "strides": strides,
        "pads": pads,
        "dilations": dilations,
        "groups": int(node.attr("group", 1)),
        "output_padding": output_padding,
    }
    inputs = [x, weight] + ([bias] if bias is not None else [])
    ctx.emit_final(node, "conv_transpose2d", inputs, attrs)


def _pool_attributes(node: OnnxNode, x: Value) -> tuple[dict[str, Any], list[int]]:
    """Read a MaxPool or AveragePool node's registry attrs (without pads) and its pads."""
    kernel = spatial_ints(node, "kernel_shape", 1)
    strides = spatial_ints(node, "strides", 1)
    dilations = spatial_ints(node, "dilations", 1)
    if node.op_type == "AveragePool" and dilations != [1, 1]:
        raise NodeNotSupported(f"AveragePool with dilations {dilations}")
    attrs: dict[str, Any] = {
        "kernel": kernel, "strides": strides, "dilations": dilations,
        "ceil_mode": bool(node.attr("ceil_mode", 0)),
    }
    if node.op_type == "AveragePool":
        attrs["count_include_pad"] = bool(node.attr("count_include_pad", 0))
    return attrs, auto_pads(node, x.shape[2:], kernel, strides, dilations)


@converts("MaxPool", "AveragePool")
def convert_pool(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    is_max = node.op_type == "MaxPool"
    if x.rank != 4:
        raise NodeNotSupported(
            f"{node.op_type} on a rank-{x.rank} input, only 2-D pooling is supported"
        )
    if is_max and len(node.outputs) > 1 and node.outputs[1]:
        raise NodeNotSupported("MaxPool with its Indices output")
    attrs, pads = _pool_attributes(node, x)
    op = "max_pool2d" if is_max else "avg_pool2d"
    spans = [(k - 1) * d + 1 for k, d in zip(attrs["kernel"], attrs["dilations"])]

    # PyTorch pools take symmetric pads of at most half the window; others go to a Pad node.
    if pads[:2] == pads[2:] and all(p <= span // 2 for p, span in zip(pads, spans)):
        ctx.emit_final(node, op, [x], {**attrs, "pads": pads})
        return
    if attrs["ceil_mode"] or not (is_max or attrs["count_include_pad"]):
        raise NodeNotSupported(
            f"{node.op_type} with pads {pads}, which are asymmetric or wider than half the "
            "window, together with ceil_mode=1 or count_include_pad=0"
        )
    fill = float("-inf") if is_max else 0.0
    pad_attrs = {"pads": [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]],
                 "mode": "constant", "value": fill}
    padded = ctx.emit(node, "pad", [x], pad_attrs, role="pad")[0]
    ctx.emit_final(node, op, [padded], {**attrs, "pads": [0, 0, 0, 0]})


# --- resize ------------------------------------------------------------------------------------


def _resize_targets(ctx: ConversionContext, node: OnnxNode, x: Value) -> tuple[list[int], bool]:
    """Compute the static output shape of a Resize or Upsample, and whether each output size
    equals input size times scale exactly, which makes size-based coordinates match ONNX's."""
    if node.op_type == "Upsample" and node.opset < 9:
        scales, sizes = node.attr("scales"), None
    elif node.op_type == "Upsample" or node.opset < 11:
        scales, sizes = ctx.constant(node, 1, "scales"), None
    else:
        scales, sizes = ctx.constant(node, 2, "scales"), ctx.constant(node, 3, "sizes")
    axes = node.attr("axes")
    axes = list(range(x.rank)) if axes is None else [normalize_axis(a, x.rank, node) for a in axes]
    out_shape = list(x.shape)
    if sizes is not None and sizes.size:
        if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise NodeNotSupported(
                f"Resize with keep_aspect_ratio_policy '{node.attr('keep_aspect_ratio_policy')}'"
            )
        for axis, size in zip(axes, sizes.reshape(-1)):
            out_shape[axis] = int(size)
        return out_shape, True
    if scales is None or np.size(scales) == 0:
        raise NodeNotSupported(f"{node.op_type} without scales or sizes")
    exact = True
    for axis, scale in zip(axes, np.asarray(scales, np.float32).reshape(-1)):
        # ONNX Runtime computes the size in float32 and truncates it.
        product = np.float32(x.shape[axis]) * np.float32(scale)
        out_shape[axis] = int(product)
        exact = exact and float(product) == out_shape[axis]
    return out_shape, exact


def _resize_modes(node: OnnxNode) -> tuple[str, str, str]:
    if node.op_type == "Upsample" or node.opset < 11:
        # Upsample and Resize-10 use asymmetric coordinates and round down when upsampling.
        return node.attr("mode", "nearest"), "asymmetric", "floor"
    mode = node.attr("mode", "nearest")
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    nearest_mode = node.attr("nearest_mode", "round_prefer_floor")
    return mode, transform, nearest_mode


@converts("Resize", "Upsample")
def convert_resize(ctx: ConversionContext, node: OnnxNode) -> None:
    x = ctx.required_input(node, 0)
    if x.rank != 4:
        raise NodeNotSupported(f"{node.op_type} of a rank-{x.rank} input, only NCHW is supported")
    out_shape, exact = _resize_targets(ctx, node, x)
    if out_shape[:2] != list(x.shape[:2]):
        raise NodeNotSupported(f"{node.op_type} of the batch or channel dims to {out_shape}")
    if not exact:
        raise NodeNotSupported(
            f"{node.op_type} with scales whose output size {out_shape[2:]} is not input size "
            "times scale, so graphcomp's size-based coordinate mapping would differ from ONNX's"
        )
    size = out_shape[2:]
    mode, transform, nearest_mode = _resize_modes(node)
    if int(node.attr("antialias", 0)) and any(o < i for o, i in zip(size, x.shape[2:])):
        raise NodeNotSupported(f"{node.op_type} with antialias=1 when downsampling")
    attrs = {"size": size, "mode": mode, "coordinate_transformation": transform}
    if mode == "nearest":
        attrs.update(_nearest_attrs(node, x.shape[2:], size, transform, nearest_mode))
    elif mode == "linear":
        attrs["coordinate_transformation"] = _linear_transform(node, size, transform)
    else:
        raise NodeNotSupported(
            f"{node.op_type} with mode '{mode}', supported modes are nearest and linear"
        )
    ctx.emit_final(node, "resize", [x], attrs)


def _nearest_attrs(node, in_size, out_size, transform, nearest_mode) -> dict[str, str]:
    if transform == "asymmetric" and nearest_mode == "floor":
        if node.op_type == "Upsample" or node.opset < 11:
            if any(o < i for o, i in zip(out_size, in_size)):
                raise NodeNotSupported(f"{node.op_type} in nearest mode with scales below 1")
        return {"coordinate_transformation": "asymmetric", "nearest_mode": "floor"}
    integer_factor = all(o % i == 0 for o, i in zip(out_size, in_size))
    half_pixel = transform in ("half_pixel", "pytorch_half_pixel")
    rounding = nearest_mode in ("round_prefer_floor", "round_prefer_ceil")
    if integer_factor and half_pixel and rounding:
        # For an integer factor s, output x = k*s + r maps to k + (r + 0.5)/s - 0.5, strictly
        # between k - 0.5 and k + 0.5: rounding gives k = floor(x / s), the asymmetric result.
        return {"coordinate_transformation": "asymmetric", "nearest_mode": "floor"}
    raise NodeNotSupported(
        f"{node.op_type} in nearest mode with coordinate_transformation_mode '{transform}' and "
        f"nearest_mode '{nearest_mode}'. Supported are asymmetric with floor, and half_pixel "
        "with round_prefer_floor or round_prefer_ceil at integer upscale factors"
    )


def _linear_transform(node: OnnxNode, out_size: list[int], transform: str) -> str:
    if transform in ("align_corners", "half_pixel"):
        return transform
    if transform == "pytorch_half_pixel" and all(size > 1 for size in out_size):
        # pytorch_half_pixel equals half_pixel unless an output dim has size 1.
        return "half_pixel"
    raise NodeNotSupported(
        f"{node.op_type} in linear mode with coordinate_transformation_mode '{transform}'. "
        "Supported are align_corners, half_pixel, and pytorch_half_pixel for outputs larger "
        "than 1"
    )
