"""Export a graphcomp graph to an ONNX model built from standard ONNX ops (default opset 17).

Each registry op maps to one or more ONNX nodes through the table ``CONVERTERS``:

    conv2d {activation: relu}  ->  Conv -> Relu
    linear (rank-2 input)      ->  Gemm(transB=1)
    linear (other ranks)       ->  Transpose(weight) -> MatMul -> Add(bias)
    gelu                       ->  x * 0.5 * (1 + Erf(x / sqrt(2)))    (Gelu needs opset 20)

Names carry over: graph inputs and outputs, node outputs and constants (as initializers) keep
their names, and ONNX nodes take the graph node's name. Static shape-like attributes (reshape,
expand, slice, pad, split, ReduceSum axes, Resize sizes) become int64 initializers named after
their node. Every exported model passes ``onnx.checker.check_model`` and strict ONNX shape
inference against the graph's own shapes and dtypes, so a wrong conversion fails at export time.

Example::

    from graphcomp.backends.onnx_export import export_onnx
    export_onnx(graph, "model.onnx")

Not covered: graphs whose constants exceed protobuf's 2 GiB limit (no external data yet), pad
mode ``circular`` (ONNX's ``wrap`` needs opset 19) and adaptive average pooling whose input
size is not a multiple of the output size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphcomp import __version__
from graphcomp.errors import BackendError, OptionError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops.quantized import matmul_multiplier
from graphcomp.serialize import write_bytes_atomic

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# LayerNormalization needs opset 17. Later opsets change the ops used here only compatibly
# (ReduceMean and ReduceMax take axes as an input from 18, handled below); 21 is the newest
# opset the tests run through ONNX Runtime.
MIN_OPSET = 17
MAX_OPSET = 21
# A serialized protobuf message cannot exceed 2 GiB.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


class OnnxExportError(BackendError, NotImplementedError):
    """A node uses an op or an attribute value that the ONNX exporter cannot express."""


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Convert ``graph`` to an ONNX model, check it and return it with inferred value shapes.

    Raises OnnxExportError (a NotImplementedError) naming every node whose op has no ONNX
    form, OptionError for an opset outside MIN_OPSET..MAX_OPSET, and BackendError when the
    result fails the ONNX checker or strict shape inference.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(
            f"ONNX export supports opsets {MIN_OPSET} to {MAX_OPSET}, got {opset}; "
            f"use the default {DEFAULT_OPSET}"
        )
    _reject_unknown_ops(graph)
    _reject_oversized(graph)
    builder = OnnxBuilder(graph, opset)
    for node in graph.nodes:
        inputs = [builder.name_of(v) for v in node.inputs]
        outputs = [builder.name_of(v) for v in node.outputs]
        CONVERTERS[node.op](builder, node, inputs, outputs)
    model = builder.model()
    return _checked(model, graph)


def export_onnx_bytes(graph: Graph, opset: int = DEFAULT_OPSET) -> bytes:
    """Return the serialized ONNX ModelProto of ``graph`` (see ``to_onnx``)."""
    return to_onnx(graph, opset).SerializeToString()


def export_onnx(graph: Graph, path: str | Path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``graph`` as an ONNX file through a temporary file and a rename."""
    data = export_onnx_bytes(graph, opset)
    write_bytes_atomic(path, data)
    logger.info("wrote ONNX model of graph '%s' (%d bytes, opset %d) to %s",
                graph.name, len(data), opset, path)


# --- model assembly ---------------------------------------------------------------------------


def onnx_dtype(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class OnnxBuilder:
    """The ONNX nodes, initializers and value names of one export in progress.

    Every graph value gets its own name as its ONNX name. A constant whose name another value
    already uses gets a fresh name (logged), because ONNX names must be unique.
    """

    def __init__(self, graph: Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.node_names: set[str] = set()
        self.value_names: dict[int, str] = {}
        self.taken: set[str] = set()
        for value in graph.inputs + [v for n in graph.nodes for v in n.outputs]:
            self.value_names[id(value)] = value.name
            self.taken.add(value.name)
        for const in graph.constants():
            name = self.fresh_value_name(const.name)
            if name != const.name:
                logger.warning("constant '%s' is exported as initializer '%s' because another "
                               "value has its name", const.name, name)
            self.value_names[id(const)] = name
            self.initializers.append(numpy_helper.from_array(np.asarray(const.data), name))

    def name_of(self, value: Value) -> str:
        return self.value_names[id(value)]

    def fresh_value_name(self, base: str) -> str:
        name = base
        index = 0
        while name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name

    def temp(self, node: Node, role: str) -> str:
        """A new intermediate value name for a helper step of ``node``."""
        return self.fresh_value_name(f"{node.name}_{role}")

    def constant(self, node: Node, role: str, array: Any, dtype: str | None = None) -> str:
        """Add an initializer named after ``node`` and ``role``; return its name."""
        name = self.fresh_value_name(f"{node.name}_{role}")
        data = np.asarray(array, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def int64s(self, node: Node, role: str, values: Iterable[int]) -> str:
        return self.constant(node, role, [int(v) for v in values], "int64")

    def add(self, node: Node, op_type: str, inputs: list[str], outputs: list[str],
            role: str = "", **attrs: Any) -> None:
        """Append one ONNX node; helper steps of ``node`` get ``role`` in their node name."""
        base = f"{node.name}_{role}" if role else node.name
        name = base
        index = 0
        while name in self.node_names:
            index += 1
            name = f"{base}_{index}"
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def model(self) -> onnx.ModelProto:
        graph = self.graph
        inputs = [_value_info(v.name, v) for v in graph.inputs]
        outputs = [_value_info(self.name_of(v), v) for v in graph.outputs]
        boundary = {id(v) for v in graph.inputs + graph.outputs}
        value_info = [
            _value_info(v.name, v) for n in graph.nodes for v in n.outputs
            if id(v) not in boundary
        ]
        graph_proto = helper.make_graph(
            self.nodes, graph.name, inputs, outputs, self.initializers, value_info=value_info
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(
            graph_proto, opset_imports=opsets, producer_name="graphcomp",
            producer_version=__version__,
        )
        model.ir_version = helper.find_min_ir_version_for(opsets)
        for key, value in graph.metadata.items():
            model.metadata_props.add(key=str(key), value=str(value))
        return model


def _value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(value.dtype), list(value.shape))


def _reject_unknown_ops(graph: Graph) -> None:
    unknown: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op not in CONVERTERS:
            unknown.setdefault(node.op, []).append(node.name)
    if unknown:
        listed = "; ".join(f"op '{op}' at node(s) {', '.join(names)}"
                           for op, names in sorted(unknown.items()))
        raise OnnxExportError(
            f"graph '{graph.name}' cannot be exported to ONNX: no ONNX conversion for {listed}. "
            "Add a converter to graphcomp.backends.onnx_export.CONVERTERS."
        )


def _reject_oversized(graph: Graph) -> None:
    total = sum(c.nbytes for c in graph.constants())
    if total > PROTOBUF_LIMIT_BYTES:
        raise BackendError(
            f"graph '{graph.name}' has {total / 2**30:.2f} GiB of constants, more than the "
            "2 GiB limit of one ONNX protobuf; export with external data is not supported yet"
        )


def _checked(model: onnx.ModelProto, graph: Graph) -> onnx.ModelProto:
    """Run the ONNX checker and strict shape inference, which also compares every inferred
    shape and dtype with the graph's own (stored as value_info)."""
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BackendError(
            f"the ONNX model exported from graph '{graph.name}' is invalid: {exc}"
        ) from exc


# --- converters -------------------------------------------------------------------------------

Converter = Callable[[OnnxBuilder, Node, list[str], list[str]], None]
CONVERTERS: dict[str, Converter] = {}


def converts(*ops: str) -> Callable[[Converter], Converter]:
    def register(function: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = function
        return function

    return register


def _input_dtype(node: Node, index: int = 0) -> str:
    return node.inputs[index].dtype


# Unary and binary ops that are one ONNX op each.
SIMPLE_OPS = {
    "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "sqrt": "Sqrt",
    "exp": "Exp", "log": "Log", "neg": "Neg", "abs": "Abs", "reciprocal": "Reciprocal",
    "identity": "Identity", "hardswish": "HardSwish", "logical_not": "Not",
    "matmul": "MatMul", "where": "Where", "pow": "Pow",
}
ARITHMETIC_OPS = {
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max", "minimum": "Min",
}
COMPARISON_OPS = {
    "equal": "Equal", "less": "Less", "greater": "Greater", "greater_equal": "GreaterOrEqual",
    "less_equal": "LessOrEqual", "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor",
}


@converts(*SIMPLE_OPS)
def convert_simple(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, SIMPLE_OPS[node.op], inputs, outputs)


@converts(*ARITHMETIC_OPS, *COMPARISON_OPS)
def convert_binary(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    # ONNX wants both operands in one dtype where PyTorch promotes, so cast to the common one.
    if node.op in ARITHMETIC_OPS:
        op_type, dtype = ARITHMETIC_OPS[node.op], node.outputs[0].dtype
    else:
        op_type = COMPARISON_OPS[node.op]
        dtype = str(np.result_type(*(np.dtype(v.dtype) for v in node.inputs)))
    inputs = [
        _cast(builder, node, name, value.dtype, dtype, f"cast{i}")
        for i, (name, value) in enumerate(zip(inputs, node.inputs))
    ]
    builder.add(node, op_type, inputs, outputs)


def _cast(builder: OnnxBuilder, node: Node, name: str, dtype: str, target: str, role: str) -> str:
    if dtype == target:
        return name
    cast = builder.temp(node, role)
    builder.add(node, "Cast", [name], [cast], role=role, to=onnx_dtype(target))
    return cast


@converts("not_equal")
def convert_not_equal(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    equal = builder.temp(node, "equal")
    builder.add(node, "Equal", inputs, [equal], role="equal")
    builder.add(node, "Not", [equal], outputs)


@converts("rsqrt")
def convert_rsqrt(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    root = builder.temp(node, "sqrt")
    builder.add(node, "Sqrt", inputs, [root], role="sqrt")
    builder.add(node, "Reciprocal", [root], outputs)


@converts("silu")
def convert_silu(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    emit_activation(builder, node, "silu", inputs[0], outputs[0])


@converts("gelu")
def convert_gelu(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    approximate = node.attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise OnnxExportError(
            f"gelu node '{node.name}': approximate='{approximate}' is not 'none' or 'tanh'"
        )
    emit_gelu(builder, node, inputs[0], outputs[0], approximate == "tanh")


def emit_gelu(builder: OnnxBuilder, node: Node, x: str, out: str, tanh: bool) -> None:
    """Emit gelu from Erf (exact) or Tanh (approximate) because ONNX's Gelu needs opset 20."""
    dtype = node.outputs[0].dtype

    def scalar(role: str, number: float) -> str:
        return builder.constant(node, role, number, dtype)

    def step(op_type: str, inputs: list[str], role: str) -> str:
        result = builder.temp(node, role)
        builder.add(node, op_type, inputs, [result], role=role)
        return result

    if tanh:
        # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
        cube = step("Mul", [step("Mul", [x, x], "gelu_square"), x], "gelu_cube")
        inner = step("Add", [x, step("Mul", [cube, scalar("gelu_coeff", 0.044715)],
                                     "gelu_scaled_cube")], "gelu_inner")
        scaled = step("Mul", [inner, scalar("gelu_sqrt_2_over_pi", math.sqrt(2.0 / math.pi))],
                      "gelu_scaled")
        core = step("Tanh", [scaled], "gelu_tanh")
    else:
        # 0.5 * x * (1 + erf(x / sqrt(2)))
        core = step("Erf", [step("Div", [x, scalar("gelu_sqrt2", math.sqrt(2.0))], "gelu_div")],
                    "gelu_erf")
    one_plus = step("Add", [core, scalar("gelu_one", 1.0)], "gelu_one_plus")
    half_x = step("Mul", [x, scalar("gelu_half", 0.5)], "gelu_half_x")
    builder.add(node, "Mul", [half_x, one_plus], [out], role="gelu")


def emit_activation(builder: OnnxBuilder, node: Node, name: str, x: str, out: str) -> None:
    """Emit the fused activation ``name`` (see graphcomp.ops.ACTIVATIONS) from ``x`` to ``out``."""
    dtype = node.outputs[0].dtype
    if name in ("relu", "sigmoid", "tanh"):
        builder.add(node, name.capitalize(), [x], [out], role=name)
    elif name == "relu6":
        low = builder.constant(node, "relu6_min", 0.0, dtype)
        high = builder.constant(node, "relu6_max", 6.0, dtype)
        builder.add(node, "Clip", [x, low, high], [out], role=name)
    elif name == "hardsigmoid":
        builder.add(node, "HardSigmoid", [x], [out], role=name, alpha=1.0 / 6.0, beta=0.5)
    elif name == "hardswish":
        builder.add(node, "HardSwish", [x], [out], role=name)
    elif name == "gelu":
        emit_gelu(builder, node, x, out, tanh=False)
    elif name == "silu":
        gate = builder.temp(node, "sigmoid")
        builder.add(node, "Sigmoid", [x], [gate], role="sigmoid")
        builder.add(node, "Mul", [x, gate], [out], role="silu")
    else:
        raise OnnxExportError(
            f"node '{node.name}' (op {node.op}): unknown fused activation '{name}'"
        )


@converts("hardsigmoid")
def convert_hardsigmoid(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    alpha = float(node.attrs.get("alpha", 1.0 / 6.0))
    beta = float(node.attrs.get("beta", 0.5))
    builder.add(node, "HardSigmoid", inputs, outputs, alpha=alpha, beta=beta)


@converts("clip")
def convert_clip(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    dtype = _input_dtype(node)
    bounds = []
    for key in ("min", "max"):
        bound = node.attrs.get(key)
        # An empty input name leaves that side of Clip unbounded.
        bounds.append("" if bound is None else builder.constant(node, key, bound, dtype))
    builder.add(node, "Clip", [inputs[0], *bounds], outputs)


@converts("cast")
def convert_cast(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "Cast", inputs, outputs, to=onnx_dtype(node.attrs["dtype"]))


# --- nn ops -----------------------------------------------------------------------------------


def _ints(values: Any, default: Iterable[int]) -> list[int]:
    return [int(v) for v in (default if values is None else values)]


def _emit_with_activation(builder: OnnxBuilder, node: Node, op_type: str, inputs: list[str],
                          out: str, **attrs: Any) -> None:
    """Emit ``op_type`` and then the node's fused activation, if it has one."""
    activation = node.attrs.get("activation")
    if activation is None:
        builder.add(node, op_type, inputs, [out], **attrs)
        return
    pre_activation = builder.temp(node, "pre_activation")
    builder.add(node, op_type, inputs, [pre_activation], **attrs)
    emit_activation(builder, node, activation, pre_activation, out)


@converts("conv2d", "conv_transpose2d")
def convert_conv(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    attrs = node.attrs
    conv_attrs: dict[str, Any] = {
        "kernel_shape": list(node.inputs[1].shape[2:]),
        "strides": _ints(attrs.get("strides"), (1, 1)),
        "pads": _ints(attrs.get("pads"), (0, 0, 0, 0)),
        "dilations": _ints(attrs.get("dilations"), (1, 1)),
        "group": int(attrs.get("groups", 1)),
    }
    op_type = "Conv"
    if node.op == "conv_transpose2d":
        op_type = "ConvTranspose"
        conv_attrs["output_padding"] = _ints(attrs.get("output_padding"), (0, 0))
    _emit_with_activation(builder, node, op_type, inputs, outputs[0], **conv_attrs)


@converts("linear")
def convert_linear(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    if node.inputs[0].rank == 2:
        _emit_with_activation(builder, node, "Gemm", inputs, outputs[0], transB=1)
        return
    # The weight keeps its initializer and name. ONNX Runtime's default graph optimizations
    # fold the Transpose when the session loads.
    weight_t = builder.temp(node, "weight_t")
    builder.add(node, "Transpose", [inputs[1]], [weight_t], role="transpose", perm=[1, 0])
    if len(inputs) == 2:
        _emit_with_activation(builder, node, "MatMul", [inputs[0], weight_t], outputs[0])
        return
    product = builder.temp(node, "matmul")
    builder.add(node, "MatMul", [inputs[0], weight_t], [product], role="matmul")
    _emit_with_activation(builder, node, "Add", [product, inputs[2]], outputs[0])


@converts("batch_norm")
def convert_batch_norm(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    eps = float(node.attrs.get("eps", 1e-5))
    builder.add(node, "BatchNormalization", inputs, outputs, epsilon=eps)


@converts("layer_norm")
def convert_layer_norm(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", -1)) % x.rank
    inputs = list(inputs)
    if len(inputs) == 1:
        # ONNX's LayerNormalization requires a scale; ones leave the result unscaled.
        inputs.append(builder.constant(node, "scale", np.ones(x.shape[axis:], x.dtype)))
    eps = float(node.attrs.get("eps", 1e-5))
    builder.add(node, "LayerNormalization", inputs, outputs, axis=axis, epsilon=eps)


@converts("softmax")
def convert_softmax(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "Softmax", inputs, outputs, axis=int(node.attrs.get("axis", -1)))


@converts("max_pool2d", "avg_pool2d")
def convert_pool(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    attrs = node.attrs
    kernel = _ints(attrs["kernel"], ())
    dilations = _ints(attrs.get("dilations"), (1, 1))
    strides = _ints(attrs.get("strides"), kernel)
    pads = _ints(attrs.get("pads"), (0, 0, 0, 0))
    pool_attrs: dict[str, Any] = {
        "kernel_shape": kernel, "strides": strides, "pads": pads,
        "ceil_mode": _onnx_ceil_mode(node, kernel, strides, pads, dilations),
    }
    if node.op == "max_pool2d":
        builder.add(node, "MaxPool", inputs, outputs, dilations=dilations, **pool_attrs)
        return
    if dilations != [1, 1]:
        raise OnnxExportError(
            f"avg_pool2d node '{node.name}': dilations {dilations} need AveragePool from "
            "opset 19, and graphcomp's reference ignores them; remove the dilations"
        )
    include_pad = int(bool(attrs.get("count_include_pad", False)))
    builder.add(node, "AveragePool", inputs, outputs, count_include_pad=include_pad,
                **pool_attrs)


def _onnx_ceil_mode(node: Node, kernel: list[int], strides: list[int], pads: list[int],
                    dilations: list[int]) -> int:
    """Return 1 only where ceil_mode changes the output size.

    PyTorch drops a last window that would start in the right padding. Wherever it does,
    the output size equals the floor-mode size with the same windows, so ceil_mode=0 is exact.
    That form avoids onnx 1.23's shape inference, which keeps the dropped window (it infers
    one more element than ONNX Runtime 1.32 and PyTorch produce).
    """
    if not node.attrs.get("ceil_mode", False):
        return 0
    in_size = node.inputs[0].shape[2:]
    floor_size = tuple(
        (size + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i, size in enumerate(in_size)
    )
    return int(floor_size != node.outputs[0].shape[2:])


@converts("global_avg_pool")
def convert_global_avg_pool(builder: OnnxBuilder, node: Node, inputs: list[str],
                            outputs: list[str]):
    if node.inputs[0].rank < 3:
        raise OnnxExportError(
            f"global_avg_pool node '{node.name}': input rank {node.inputs[0].rank} has no "
            "spatial dims (GlobalAveragePool needs rank 3 or more)"
        )
    builder.add(node, "GlobalAveragePool", inputs, outputs)


@converts("adaptive_avg_pool2d")
def convert_adaptive_avg_pool(builder: OnnxBuilder, node: Node, inputs: list[str],
                              outputs: list[str]):
    in_size = node.inputs[0].shape[2:]
    out_size = _ints(node.attrs["output_size"], ())
    if any(i % o for i, o in zip(in_size, out_size)):
        raise OnnxExportError(
            f"adaptive_avg_pool2d node '{node.name}': input size {list(in_size)} is not a "
            f"multiple of output size {out_size}, so no single AveragePool window fits; "
            "resize the input to a multiple first"
        )
    kernel = [i // o for i, o in zip(in_size, out_size)]
    builder.add(node, "AveragePool", inputs, outputs, kernel_shape=kernel, strides=kernel)


@converts("resize")
def convert_resize(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    attrs = node.attrs
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation", "asymmetric")
    size = _ints(attrs["size"], ())
    resize_attrs: dict[str, Any] = {"mode": mode}
    if mode == "nearest":
        resize_attrs["nearest_mode"] = attrs.get("nearest_mode", "floor")
    elif mode != "linear":
        raise OnnxExportError(f"resize node '{node.name}': mode '{mode}' is not supported")
    # PyTorch's align_corners=False (graphcomp's linear half_pixel) is ONNX's half_pixel,
    # output dims of size 1 included; the tests check a size-1 case against the reference.
    resize_attrs["coordinate_transformation_mode"] = transform
    sizes = builder.int64s(node, "sizes", list(node.inputs[0].shape[:2]) + size)
    # Resize's roi and scales inputs stay empty because the target is given as sizes.
    builder.add(node, "Resize", [inputs[0], "", "", sizes], outputs, **resize_attrs)


# --- tensor ops -------------------------------------------------------------------------------


@converts("concat")
def convert_concat(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "Concat", inputs, outputs, axis=int(node.attrs.get("axis", 0)))


@converts("split")
def convert_split(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    sizes = builder.int64s(node, "sizes", node.attrs["sizes"])
    builder.add(node, "Split", [inputs[0], sizes], outputs, axis=int(node.attrs.get("axis", 0)))


@converts("reshape")
def convert_reshape(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    shape = _ints(node.attrs["shape"], ())
    # Without allowzero, ONNX reads a 0 in the target shape as "copy the input dim".
    extra = {"allowzero": 1} if 0 in shape else {}
    builder.add(node, "Reshape", [inputs[0], builder.int64s(node, "shape", shape)], outputs,
                **extra)


@converts("flatten")
def convert_flatten(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    axis = int(node.attrs.get("axis", 1)) % (node.inputs[0].rank + 1)
    builder.add(node, "Flatten", inputs, outputs, axis=axis)


@converts("transpose")
def convert_transpose(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "Transpose", inputs, outputs, perm=_ints(node.attrs["perm"], ()))


@converts("expand")
def convert_expand(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    shape = builder.int64s(node, "shape", node.attrs["shape"])
    builder.add(node, "Expand", [inputs[0], shape], outputs)


# ONNX names of the pad modes that PyTorch's F.pad (and so graphcomp) uses.
PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@converts("pad")
def convert_pad(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    mode = node.attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        raise OnnxExportError(
            f"pad node '{node.name}': mode '{mode}' has no ONNX form at opset 17 "
            f"(supported: {', '.join(PAD_MODES)})"
        )
    pad_inputs = [inputs[0], builder.int64s(node, "pads", node.attrs["pads"])]
    if mode == "constant":
        value = float(node.attrs.get("value", 0.0))
        pad_inputs.append(builder.constant(node, "value", value, _input_dtype(node)))
    builder.add(node, "Pad", pad_inputs, outputs, mode=PAD_MODES[mode])


INT64_MIN = int(np.iinfo(np.int64).min)


@converts("slice")
def convert_slice(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    attrs = node.attrs
    x = node.inputs[0]
    count = len(attrs["starts"])
    axes = _ints(attrs.get("axes"), range(count))
    steps = _ints(attrs.get("steps"), [1] * count)
    starts, ends = [], []
    for axis, start, end, step in zip(axes, attrs["starts"], attrs["ends"], steps):
        # Resolve with Python's rules (the op's semantics). ONNX clamps differently for
        # negative steps, so the resolved bounds are passed, with "before index 0" as INT64_MIN.
        begin, stop, _ = slice(start, end, step).indices(x.shape[axis % x.rank])
        if step < 0 and stop < 0:
            stop = INT64_MIN
        if step < 0 and begin < 0:
            begin, stop = 0, 0  # empty
        starts.append(begin)
        ends.append(stop)
    slice_inputs = [
        inputs[0],
        builder.int64s(node, "starts", starts),
        builder.int64s(node, "ends", ends),
        builder.int64s(node, "axes", axes),
        builder.int64s(node, "steps", steps),
    ]
    builder.add(node, "Slice", slice_inputs, outputs)


@converts("gather")
def convert_gather(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "Gather", inputs, outputs, axis=int(node.attrs.get("axis", 0)))


@converts("embedding")
def convert_embedding(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    ids, table = inputs
    builder.add(node, "Gather", [table, ids], outputs, axis=0)


REDUCE_OPS = {"reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax"}


@converts(*REDUCE_OPS)
def convert_reduce(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    rank = node.inputs[0].rank
    axes = node.attrs.get("axes")
    # No axes attribute or an empty list both reduce over every dim, as torch does for dim=[].
    axes = sorted(int(a) % rank for a in axes) if axes else []
    keepdims = int(bool(node.attrs.get("keepdims", True)))
    op_type = REDUCE_OPS[node.op]
    if not axes:
        builder.add(node, op_type, inputs, outputs, keepdims=keepdims)
    elif op_type == "ReduceSum" or builder.opset >= 18:
        axes_input = builder.int64s(node, "axes", axes)
        builder.add(node, op_type, [inputs[0], axes_input], outputs, keepdims=keepdims)
    else:
        builder.add(node, op_type, inputs, outputs, axes=axes, keepdims=keepdims)


# --- quantized ops ----------------------------------------------------------------------------
# qconv2d and qlinear requantize as ONNX Runtime's QLinearConv does (see graphcomp.ops.quantized),
# so the exported model computes the reference executor's integers.


def _per_axis(node: Node) -> dict[str, int]:
    data, scale = node.inputs[0], node.inputs[1]
    if scale.rank == 0:
        return {}
    return {"axis": int(node.attrs.get("axis", 1)) % data.rank}


@converts("quantize")
def convert_quantize(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    builder.add(node, "QuantizeLinear", inputs, outputs, **_per_axis(node))


@converts("dequantize")
def convert_dequantize(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    zero_point = node.inputs[2]
    if node.inputs[0].dtype == "int32":
        # DequantizeLinear takes no zero point for int32 input (it must be 0).
        if not isinstance(zero_point, Constant) or np.any(zero_point.data != 0):
            raise OnnxExportError(
                f"dequantize node '{node.name}': int32 input with a zero point other than a "
                "constant 0 has no DequantizeLinear form"
            )
        inputs = inputs[:2]
    builder.add(node, "DequantizeLinear", inputs, outputs, **_per_axis(node))


def _quantized_constants(builder: OnnxBuilder, node: Node) -> dict[str, str]:
    attrs = node.attrs
    dtype = node.inputs[0].dtype
    return {
        "x_scale": builder.constant(node, "x_scale", attrs["x_scale"], "float32"),
        "x_zero_point": builder.constant(node, "x_zero_point", attrs.get("x_zero_point", 0), dtype),
        "y_scale": builder.constant(node, "y_scale", attrs["y_scale"], "float32"),
        "y_zero_point": builder.constant(node, "y_zero_point", attrs.get("y_zero_point", 0), dtype),
    }


@converts("qconv2d")
def convert_qconv2d(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    attrs = node.attrs
    params = _quantized_constants(builder, node)
    out_channels = node.inputs[1].shape[0]
    w_zero_point = builder.constant(node, "w_zero_point", np.zeros(out_channels, np.int8))
    conv_inputs = [inputs[0], params["x_scale"], params["x_zero_point"], inputs[1], inputs[2],
                   w_zero_point, params["y_scale"], params["y_zero_point"], *inputs[3:]]
    conv_attrs = {
        "kernel_shape": list(node.inputs[1].shape[2:]),
        "strides": _ints(attrs.get("strides"), (1, 1)),
        "pads": _ints(attrs.get("pads"), (0, 0, 0, 0)),
        "dilations": _ints(attrs.get("dilations"), (1, 1)),
        "group": int(attrs.get("groups", 1)),
    }
    low = -128 if node.outputs[0].dtype == "int8" else 0
    if attrs.get("activation") != "relu" or attrs.get("y_zero_point", 0) == low:
        # With y_zero_point at the bottom of the range, saturation is the relu.
        builder.add(node, "QLinearConv", conv_inputs, outputs, **conv_attrs)
        return
    convolved = builder.temp(node, "conv")
    builder.add(node, "QLinearConv", conv_inputs, [convolved], **conv_attrs)
    # max(q, y_zero_point) through float: dequantizing and quantizing again is exact.
    real = builder.temp(node, "real")
    builder.add(node, "DequantizeLinear", [convolved, params["y_scale"], params["y_zero_point"]],
                [real], role="dequantize")
    rectified = builder.temp(node, "relu")
    builder.add(node, "Relu", [real], [rectified], role="relu")
    builder.add(node, "QuantizeLinear", [rectified, params["y_scale"], params["y_zero_point"]],
                outputs, role="quantize")


@converts("qconv_transpose2d")
def convert_qconv_transpose2d(builder: OnnxBuilder, node: Node, inputs: list[str],
                              outputs: list[str]):
    """QDQ form: DequantizeLinear on the input, weight (per channel, axis 1) and int32 bias,
    a float ConvTranspose, then QuantizeLinear. ONNX has no integer transposed convolution,
    so ONNX Runtime sums the products in float32: outputs that fall near a rounding boundary
    can differ from the reference's exact integers by one step."""
    attrs = node.attrs
    params = _quantized_constants(builder, node)

    def dequantize(role: str, args: list[str], **axis: int) -> str:
        result = builder.temp(node, role)
        builder.add(node, "DequantizeLinear", args, [result], role=role, **axis)
        return result

    x = dequantize("x_float", [inputs[0], params["x_scale"], params["x_zero_point"]])
    w_zero_point = builder.constant(node, "w_zero_point",
                                    np.zeros(node.inputs[1].shape[1], np.int8))
    weight = dequantize("weight_float", [inputs[1], inputs[2], w_zero_point], axis=1)
    conv_inputs = [x, weight]
    if len(inputs) == 4:
        bias_scale = builder.temp(node, "bias_scale")
        builder.add(node, "Mul", [params["x_scale"], inputs[2]], [bias_scale], role="bias_scale")
        conv_inputs.append(dequantize("bias_float", [inputs[3], bias_scale], axis=0))
    conv_attrs = {
        "kernel_shape": list(node.inputs[1].shape[2:]),
        "strides": _ints(attrs.get("strides"), (1, 1)),
        "pads": _ints(attrs.get("pads"), (0, 0, 0, 0)),
        "dilations": _ints(attrs.get("dilations"), (1, 1)),
        "output_padding": _ints(attrs.get("output_padding"), (0, 0)),
    }
    result = builder.temp(node, "conv")
    builder.add(node, "ConvTranspose", conv_inputs, [result], role="conv", **conv_attrs)
    if attrs.get("activation") == "relu":
        # quantize(relu(v)) = max(quantize(v), y_zero_point): the saturation bound of the op.
        rectified = builder.temp(node, "relu")
        builder.add(node, "Relu", [result], [rectified], role="relu")
        result = rectified
    builder.add(node, "QuantizeLinear", [result, params["y_scale"], params["y_zero_point"]],
                outputs, role="quantize")


@converts("qmatmul")
def convert_qmatmul(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    """MatMulInteger with both zero points, then the reference's float32 requantization, so
    ONNX Runtime computes the reference executor's integers."""
    attrs = node.attrs
    a_dtype, b_dtype = node.inputs[0].dtype, node.inputs[1].dtype
    a_zero_point = builder.constant(node, "a_zero_point", attrs.get("a_zero_point", 0), a_dtype)
    b_zero_point = builder.constant(node, "b_zero_point", attrs.get("b_zero_point", 0), b_dtype)
    acc = builder.temp(node, "acc")
    builder.add(node, "MatMulInteger", [inputs[0], inputs[1], a_zero_point, b_zero_point], [acc],
                role="matmul")
    real_acc = builder.temp(node, "acc_float")
    builder.add(node, "Cast", [acc], [real_acc], role="cast", to=onnx_dtype("float32"))
    multiplier = builder.constant(node, "multiplier", matmul_multiplier(attrs), "float32")
    scaled = builder.temp(node, "scaled")
    builder.add(node, "Mul", [real_acc, multiplier], [scaled], role="requantize")
    # QuantizeLinear with scale 1 rounds half to even, adds the zero point and saturates.
    one = builder.constant(node, "one", 1.0, "float32")
    y_zero_point = builder.constant(node, "y_zero_point", attrs.get("y_zero_point", 0),
                                    node.outputs[0].dtype)
    builder.add(node, "QuantizeLinear", [scaled, one, y_zero_point], outputs)


def _integer_matmul(builder: OnnxBuilder, node: Node, x: str, zero_point: str,
                    weight: str) -> str:
    """Emit MatMulInteger(x, weight.T) with x's zero point (none for ""); return the int32
    result's name."""
    weight_t = builder.temp(node, "weight_t")
    builder.add(node, "Transpose", [weight], [weight_t], role="transpose", perm=[1, 0])
    product = builder.temp(node, "acc")
    matmul_inputs = [x, weight_t, zero_point] if zero_point else [x, weight_t]
    builder.add(node, "MatMulInteger", matmul_inputs, [product], role="matmul")
    return product


@converts("qlinear")
def convert_qlinear(builder: OnnxBuilder, node: Node, inputs: list[str], outputs: list[str]):
    params = _quantized_constants(builder, node)
    acc = _integer_matmul(builder, node, inputs[0], params["x_zero_point"], inputs[1])
    if len(inputs) == 4:
        biased = builder.temp(node, "biased")
        builder.add(node, "Add", [acc, inputs[3]], [biased], role="bias")
        acc = biased
    real_acc = builder.temp(node, "acc_float")
    builder.add(node, "Cast", [acc], [real_acc], role="cast", to=onnx_dtype("float32"))
    # m = x_scale * w_scale / y_scale in float32, in the reference's order.
    product = builder.temp(node, "scale_product")
    builder.add(node, "Mul", [params["x_scale"], inputs[2]], [product], role="scale_product")
    multiplier = builder.temp(node, "multiplier")
    builder.add(node, "Div", [product, params["y_scale"]], [multiplier], role="multiplier")
    scaled = builder.temp(node, "scaled")
    builder.add(node, "Mul", [real_acc, multiplier], [scaled], role="requantize")
    if node.attrs.get("activation") == "relu":
        rectified = builder.temp(node, "relu")
        builder.add(node, "Relu", [scaled], [rectified], role="relu")
        scaled = rectified
    # QuantizeLinear with scale 1 rounds half to even, adds the zero point and saturates.
    one = builder.constant(node, "one", 1.0, "float32")
    builder.add(node, "QuantizeLinear", [scaled, one, params["y_zero_point"]], outputs)


def _row_reduce(builder: OnnxBuilder, node: Node, op_type: str, x: str) -> str:
    """Emit ``op_type`` (ReduceMin or ReduceMax) over the last axis, keeping it."""
    result = builder.temp(node, op_type.lower())
    if builder.opset >= 18:
        axes = builder.int64s(node, "axes", [-1])
        builder.add(node, op_type, [x, axes], [result], role=op_type.lower(), keepdims=1)
    else:
        builder.add(node, op_type, [x], [result], role=op_type.lower(), axes=[-1], keepdims=1)
    return result


def _emit_row_quantization(builder: OnnxBuilder, node: Node, x: str) -> tuple[str, str, str]:
    """Quantize each row of ``x`` to uint8 as DynamicQuantizeLinear quantizes a tensor.
    Return the uint8 rows, their scales and their zero points (float32 integers), [..., 1]."""
    def step(op_type: str, args: list[str], role: str, **attrs: Any) -> str:
        result = builder.temp(node, role)
        builder.add(node, op_type, args, [result], role=role, **attrs)
        return result

    zero = builder.constant(node, "zero", 0.0, "float32")
    low = step("Min", [_row_reduce(builder, node, "ReduceMin", x), zero], "low")
    high = step("Max", [_row_reduce(builder, node, "ReduceMax", x), zero], "high")
    levels = builder.constant(node, "levels", 255.0, "float32")
    span = step("Div", [step("Sub", [high, low], "span"), levels], "raw_scale")
    one = builder.constant(node, "one", 1.0, "float32")
    scale = step("Where", [step("Equal", [span, zero], "empty"), one, span], "scale")
    shifted = step("Sub", [zero, step("Div", [low, scale], "low_steps")], "zero_point_raw")
    zero_point = step("Clip", [step("Round", [shifted], "zero_point_round"), zero, levels],
                      "zero_point")
    rounded = step("Round", [step("Div", [x, scale], "steps")], "rounded")
    clipped = step("Clip", [step("Add", [rounded, zero_point], "shifted"), zero, levels],
                   "clipped")
    return step("Cast", [clipped], "x_q", to=onnx_dtype("uint8")), scale, zero_point


@converts("dynamic_qlinear")
def convert_dynamic_qlinear(builder: OnnxBuilder, node: Node, inputs: list[str],
                            outputs: list[str]):
    if node.attrs.get("per_row", False):
        acc, x_scale = _row_quantized_matmul(builder, node, inputs[0], inputs[1])
    else:
        quantized = [builder.temp(node, role) for role in ("x_q", "x_scale", "x_zero_point")]
        builder.add(node, "DynamicQuantizeLinear", [inputs[0]], quantized, role="quantize")
        acc = _integer_matmul(builder, node, quantized[0], quantized[2], inputs[1])
        x_scale = quantized[1]
    real_acc = builder.temp(node, "acc_float")
    builder.add(node, "Cast", [acc], [real_acc], role="cast", to=onnx_dtype("float32"))
    scale = builder.temp(node, "scale")
    builder.add(node, "Mul", [x_scale, inputs[2]], [scale], role="scale")
    if len(inputs) == 3 and node.attrs.get("activation") is None:
        builder.add(node, "Mul", [real_acc, scale], outputs, role="dequantize")
        return
    scaled = builder.temp(node, "scaled")
    builder.add(node, "Mul", [real_acc, scale], [scaled], role="dequantize")
    if len(inputs) == 4:
        _emit_with_activation(builder, node, "Add", [scaled, inputs[3]], outputs[0])
    else:
        emit_activation(builder, node, node.attrs["activation"], scaled, outputs[0])


def _row_quantized_matmul(builder: OnnxBuilder, node: Node, x: str, weight: str) -> tuple[str, str]:
    """Emit sum((q - zero_point) * w) per row as MatMulInteger(q, w.T) - zero_point * sum(w),
    because ONNX Runtime takes only a scalar zero point in MatMulInteger. Return the int32
    result and the row scales."""
    x_q, scale, zero_point = _emit_row_quantization(builder, node, x)
    product = _integer_matmul(builder, node, x_q, "", weight)
    weight_int32 = builder.temp(node, "weight_int32")
    builder.add(node, "Cast", [weight], [weight_int32], role="weight_cast", to=onnx_dtype("int32"))
    weight_sums = builder.temp(node, "weight_sums")
    axes = builder.int64s(node, "sum_axes", [1])
    builder.add(node, "ReduceSum", [weight_int32, axes], [weight_sums], role="weight_sums",
                keepdims=0)
    zero_point_int32 = builder.temp(node, "zero_point_int32")
    builder.add(node, "Cast", [zero_point], [zero_point_int32], role="zero_point_cast",
                to=onnx_dtype("int32"))
    correction = builder.temp(node, "correction")
    builder.add(node, "Mul", [zero_point_int32, weight_sums], [correction], role="correction")
    acc = builder.temp(node, "acc_centered")
    builder.add(node, "Sub", [product, correction], [acc], role="center")
    return acc, scale
