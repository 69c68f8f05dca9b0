"""Post-training int8 quantization of convolutions, linear layers and attention matmuls:
static, dynamic, weight-only."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from graphcomp import executor
from graphcomp.calibration import (
    OBSERVERS, CalibrationError, Observer, ProgressFn, QuantParams, activation_params,
    bias_safe_scales, graph_batches, make_observer, observe_ranges, quantize_bias,
    quantize_weight, weight_scales,
)
from graphcomp.errors import OptionError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.patterns import new_constant
from graphcomp.pipeline import Pass, PassContext, PassResult, output_error, register_pass

logger = logging.getLogger(__name__)

MODES = ("int8", "dynamic", "weight-only")
ACTIVATION_DTYPES = ("int8", "uint8")
# Float op -> its int8 form in static mode.
STATIC_OPS = {"conv2d": "qconv2d", "linear": "qlinear", "conv_transpose2d": "qconv_transpose2d"}
# The float ops that static mode selects. Which matmuls it quantizes: see quantizable_layers.
STATIC_MODE_OPS = (*STATIC_OPS, "matmul")
WEIGHT_ONLY_OPS = ("conv2d", "linear", "conv_transpose2d")
# The weight axis of each layer's output channels, which get one scale each.
WEIGHT_AXES = {"conv2d": 0, "linear": 0, "conv_transpose2d": 1}
WEIGHT_RANKS = {"conv2d": 4, "linear": 2, "conv_transpose2d": 4}
# Fused activations that static mode moves out of a layer into their own op (relu stays fused,
# because it is a saturation bound in int8): activation -> (op, attrs).
UNFUSED_ACTIVATIONS = {
    "relu6": ("clip", {"min": 0.0, "max": 6.0}),
    "sigmoid": ("sigmoid", {}),
    "hardsigmoid": ("hardsigmoid", {}),
    "hardswish": ("hardswish", {}),
    "gelu": ("gelu", {}),
    "tanh": ("tanh", {}),
    "silu": ("silu", {}),
}
MAX_NAMES_SHOWN = 20


@dataclass(frozen=True)
class LayerSensitivity:
    """The graph-output error when only ``layer`` is quantized: ``max|q - f| / max|f|``."""

    layer: str
    op: str
    error: float


@register_pass
class Quantize(Pass):
    """conv2d(x, W, b) -> dequantize(qconv2d(quantize(x), W_int8, w_scale, b_int32))

    Replaces float conv2d, conv_transpose2d and linear layers by int8 ones, in one of three
    modes:

    - ``int8`` (static): int8 weights, symmetric per output channel, int32 bias, and
      activations per tensor, asymmetric, in uint8 (``activations=int8`` for int8). uint8 is
      the default because x86 integer kernels multiply unsigned activations by signed
      weights. In one measurement on a 2-core AVX2 machine, ONNX Runtime 1.32 ran the int8
      PP-OCRv4 rec export in 51 ms with uint8 activations and in 145 ms with int8 ones.
      Activation ranges come from running the float graph on the calibration batches
      (``PassContext.calibration``, else ``PassContext.feeds``) through the observer
      ``calib``: mse (the default), minmax or percentile (option ``percentile``); see
      ``graphcomp.calibration``. On PP-OCRv4, mse gave about half the output error of minmax.
      Without calibration data the pass raises CalibrationError naming the tensors that have
      no range, and leaves the graph unchanged. A value read by several int8 layers is
      quantized once, and an int8 layer that feeds another passes its int8 output on
      directly, so dequantize nodes remain only where float ops read an output.
      With ``matmul=true``, a matmul of two activations (attention's Q K^T and P V) becomes
      ``qmatmul``: both operands and the product quantized per tensor, int32 accumulation.
      It is off by default because one calibrated range must then fit attention scores that
      vary from input to input. On PP-OCRv4 rec it changed the decoded text of 12 held-out
      lines little (benchmarks/int8.py).
      A matmul whose second operand is a constant 2-D matrix W is a linear layer without
      bias: static mode always quantizes it as ``qlinear`` with weight ``W.T``, one scale per
      column of W.
    - ``dynamic``: linear layers become ``dynamic_qlinear``, with int8 weights and inputs
      quantized at run time with one range per row (per token). That suits transformers,
      whose activation ranges vary per input. On all-MiniLM-L6-v2, per-row ranges raised the
      worst cosine similarity with float over 40 sentences from 0.9917 (one range per input)
      to 0.9980.
    - ``weight-only``: conv2d, conv_transpose2d and linear weights are stored as int8, and a
      ``dequantize`` node in front of the float layer restores them: 4x smaller weights, float
      compute.

    In dynamic and weight-only modes, embedding tables are stored as int8 with a scale per
    row, and only the rows looked up are dequantized.

    ``skip`` lists fnmatch patterns of layer names to keep in float, separated by ';'
    (``skip=head*;fc2``). ``sensitivity`` (int8 mode) adds to the details, per layer, the
    output error when only that layer is quantized, largest first (see ``sensitivity``).
    ``float_layers=N`` (int8 mode) measures the same errors and keeps the N layers with the
    largest ones in float, the automatic form of ``skip``.

    Run it after ``fold-bn`` and ``fuse``, so that batch norms are folded and relus fused into
    the layers. Do not run ``fold-constants`` after weight-only mode: it would compute the
    dequantized weights back into float constants.

    Does not cover yet: grouped conv_transpose2d, a matmul whose first operand is the
    constant, a constant matmul in dynamic and weight-only modes, int8 versions of pooling,
    add and concat (they run in float between dequantize and quantize), and a fused
    activation other than relu in static mode, which becomes its own float op after the int8
    layer.

    Example (int8, calibrated on x = [[3.984375, 0]], which gives y = [[-2, 5.96875]]; the
    attributes of fc are left out below: x_scale=0.015625, x_zero_point=0, y_scale=0.03125,
    y_zero_point=64)::

        before:
          fc: %y = linear(%x, @w, @b) -> float32[1,2]
        after:
          x.quantize: %x_q = quantize(%x, @x.scale, @x.zero_point) -> uint8[1,2]
          fc: %y_q = qlinear(%x_q, @fc.weight_q, @fc.w_scale, @fc.bias_q) -> uint8[1,2]
          fc.dequantize: %y = dequantize(%y_q, @fc.y_scale, @fc.y_zero_point) -> float32[1,2]
    """

    name = "quantize"
    summary = "int8 post-training quantization: static (calibrated), dynamic or weight-only"
    lossless = False
    invalidates = ("float",)
    options = {
        "mode": str, "calib": str, "percentile": float, "skip": str, "activations": str,
        "sensitivity": bool, "matmul": bool, "float_layers": int,
    }
    choices = {"mode": MODES, "calib": OBSERVERS, "activations": ACTIVATION_DTYPES}
    defaults = {
        "mode": "int8", "calib": "mse", "percentile": 99.99, "skip": "",
        "activations": "uint8", "sensitivity": False, "matmul": False, "float_layers": 0,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        config = self.config
        _check_choice("mode", config["mode"], MODES)
        _check_choice("calib", config["calib"], OBSERVERS)
        _check_choice("activations", config["activations"], ACTIVATION_DTYPES)
        if config["float_layers"] < 0:
            raise OptionError(f"pass 'quantize': float_layers must be 0 or more, got "
                              f"{config['float_layers']}")
        if not 50.0 < config["percentile"] <= 100.0:
            raise OptionError(f"pass 'quantize': percentile must be in (50, 100], got "
                              f"{config['percentile']}")

    @classmethod
    def parse_word(cls, word: str) -> dict[str, Any]:
        """``quantize:int8``, ``quantize:dynamic`` and ``quantize:weight-only`` set the mode."""
        if word in MODES:
            return {"mode": word}
        return super().parse_word(word)

    def uses_calibration(self) -> bool:
        return self.config["mode"] == "int8"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        mode = self.config["mode"]
        layers, tables, skipped = self._select(graph)
        details: dict[str, Any] = {"mode": mode, "skipped": skipped, "quantized": 0}
        if mode == "int8" and layers:
            details.update(self._run_static(graph, ctx, layers))
        elif mode == "dynamic":
            details["quantized"] = quantize_dynamic(graph, layers, self.name)
        elif mode == "weight-only":
            details["quantized"] = quantize_weights_only(graph, layers, self.name)
        if tables:
            details["embeddings"] = quantize_embeddings(graph, tables, self.name)
        logger.info("quantize (%s): %s", mode, details)
        changed = details["quantized"] + details.get("embeddings", 0) > 0
        return PassResult(changed=changed, details=details)

    def _select(self, graph: Graph) -> tuple[list[Node], list[Node], int]:
        """Return the layers and embedding tables to quantize and how many ``skip`` keeps
        float. Static mode leaves embedding tables alone."""
        mode = self.config["mode"]
        ops = {"int8": STATIC_MODE_OPS, "dynamic": ("linear",),
               "weight-only": WEIGHT_ONLY_OPS}[mode]
        layers = quantizable_layers(graph, ops, activation_matmuls=self.config["matmul"])
        tables = embedding_layers(graph) if mode != "int8" else []
        patterns = parse_patterns(self.config["skip"])
        check_patterns_match(graph, layers + tables, patterns)
        chosen = [layer for layer in layers if not _skipped(layer, patterns)]
        chosen_tables = [layer for layer in tables if not _skipped(layer, patterns)]
        skipped = len(layers) + len(tables) - len(chosen) - len(chosen_tables)
        return chosen, chosen_tables, skipped

    def _run_static(self, graph: Graph, ctx: PassContext, layers: list[Node]) -> dict[str, Any]:
        batches = calibration_batches(ctx, layers)
        calibration = StaticCalibration.run(
            graph, layers, batches, self.config["calib"], self.config["percentile"],
            self.config["activations"], ctx.progress,
        )
        details: dict[str, Any] = {
            "calibration": self.config["calib"], "calibration_runs": calibration.runs,
            "unfused_activations": calibration.unfused,
        }
        keep_float: set[str] = set()
        if self.config["sensitivity"] or self.config["float_layers"]:
            feeds = ctx.feeds if ctx.feeds is not None else next(graph_batches(graph, batches))
            errors = calibration.layer_errors(feeds, self.name)
            if self.config["sensitivity"]:
                details["sensitivity"] = [
                    {"layer": item.layer, "op": item.op, "error": item.error}
                    for item in errors
                ]
            most_sensitive = errors[:self.config["float_layers"]]
            keep_float = {item.layer for item in most_sensitive}
            if most_sensitive:
                details["float_layers"] = [item.layer for item in most_sensitive]
        quantized = calibration.graph.copy()
        targets = [quantized.nodes[position] for position in calibration.positions
                   if quantized.nodes[position].name not in keep_float]
        rewriter = StaticRewriter(quantized, calibration.params, self.name)
        for layer in targets:
            rewriter.quantize_layer(layer)
        details["quantized"] = len(targets)
        details["dequantize_removed"] = rewriter.remove_unused_dequantize()
        _replace_contents(graph, quantized)
        return details


def activation_inputs(layer: Node) -> list[Value]:
    """Return the inputs of ``layer`` that are activations, quantized per tensor."""
    if layer.op == "matmul" and not is_constant_matmul(layer):
        return list(layer.inputs[:2])
    return [layer.inputs[0]]


def is_constant_matmul(node: Node) -> bool:
    """Return whether ``node`` is matmul(x, W) with x a float32 activation and W a constant
    float32 [K, N]: a linear layer without bias."""
    x = node.inputs[0]
    return (node.op == "matmul" and not isinstance(x, Constant) and x.dtype == "float32"
            and _float_constant(node.inputs[1], 2))


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(f"pass 'quantize': {option} must be one of {', '.join(choices)}, got "
                          f"'{value}'")


def _replace_contents(graph: Graph, source: Graph) -> None:
    graph.inputs, graph.outputs, graph.nodes = source.inputs, source.outputs, source.nodes


# --- layer selection --------------------------------------------------------------------------


def parse_patterns(text: str) -> list[str]:
    """Split ``head*;fc2`` into fnmatch patterns of node names."""
    return [part.strip() for part in text.split(";") if part.strip()]


def _skipped(layer: Node, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in patterns)


def check_patterns_match(graph: Graph, layers: Sequence[Node], patterns: Sequence[str]) -> None:
    """Raise OptionError for a skip pattern that matches no quantizable layer (likely a typo)."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in layers):
            names = ", ".join(layer.name for layer in layers[:8])
            raise OptionError(
                f"pass 'quantize': skip pattern '{pattern}' matches no quantizable layer of "
                f"graph '{graph.name}'; its layers are named like: {names or 'none'}"
            )


def _float_constant(value: Value | None, rank: int | None = None) -> bool:
    return (
        isinstance(value, Constant) and value.dtype == "float32"
        and (rank is None or value.rank == rank)
    )


def quantizable_layers(graph: Graph, ops: Sequence[str],
                       activation_matmuls: bool = True) -> list[Node]:
    """Return the nodes of ``ops`` with a float32 input, a constant float32 weight and a
    constant (or no) bias, in graph order. Among matmuls: those with a constant 2-D second
    operand, and with ``activation_matmuls`` those of two float32 activations of rank 2 or
    more. Other layers stay float, with a debug log."""
    layers = []
    for node in graph.nodes:
        if node.op not in ops:
            continue
        if node.op == "matmul" and is_constant_matmul(node):
            usable, reason = True, ""
        elif node.op == "matmul":
            usable = activation_matmuls and all(
                value.dtype == "float32" and value.rank >= 2
                and not isinstance(value, Constant) for value in node.inputs)
            reason = ("it needs two float32 activations of rank 2 or more and the option "
                      "matmul=true, or a constant 2-D second operand")
        else:
            bias = node.inputs[2] if len(node.inputs) == 3 else None
            usable = (node.inputs[0].dtype == "float32"
                      and _float_constant(node.inputs[1], WEIGHT_RANKS[node.op])
                      and (bias is None or _float_constant(bias, 1))
                      and not _grouped_transpose(node))
            reason = ("it needs a float32 input and constant float32 weight and bias, and "
                      "groups=1 for conv_transpose2d")
        if usable:
            layers.append(node)
        else:
            logger.debug("layer '%s' (%s) stays float: %s", node.name, node.op, reason)
    return layers


def _grouped_transpose(node: Node) -> bool:
    # A grouped transposed convolution has O/groups weight channels on axis 1 for O output
    # channels, so its per-output-channel scales would not follow one weight axis.
    return node.op == "conv_transpose2d" and int(node.attrs.get("groups", 1)) != 1


def _quantized_weight(graph: Graph, layer: Node,
                      x_scale: float | None = None) -> tuple[Constant, Constant, np.ndarray]:
    """Return int8 weight and float32 per-output-channel scale constants, and the scales.
    Given the input scale, the weight scales leave room for the layer's int32 bias."""
    weight = layer.inputs[1].data
    axis = WEIGHT_AXES[layer.op]
    scales = weight_scales(weight, axis=axis)
    if x_scale is not None and len(layer.inputs) == 3:
        scales = bias_safe_scales(scales, layer.inputs[2].data, x_scale)
    weight_q = new_constant(graph, f"{layer.name}.weight_q",
                            quantize_weight(weight, scales, axis))
    return weight_q, new_constant(graph, f"{layer.name}.w_scale", scales), scales


# --- dynamic and weight-only modes ------------------------------------------------------------


def embedding_layers(graph: Graph) -> list[Node]:
    """Return the embedding nodes whose table is a constant float32 [V, D]."""
    return [node for node in graph.nodes
            if node.op == "embedding" and _float_constant(node.inputs[1], 2)]


def quantize_embeddings(graph: Graph, layers: Sequence[Node], created_by: str) -> int:
    """embedding(ids, T) -> float32(embedding(ids, T_int8)) * embedding(ids, row_scales)

    Stores each table as int8 with a symmetric scale per row and dequantizes only the rows
    looked up. Returns the count."""
    for layer in layers:
        ids, table = layer.inputs
        output = layer.outputs[0]
        scales = weight_scales(table.data, axis=0)
        table_q = new_constant(graph, f"{layer.name}.table_q", quantize_weight(table.data, scales))
        row_scales = new_constant(graph, f"{layer.name}.row_scale", scales.reshape(-1, 1))
        rows_q = Value(graph.unique_name(f"{output.name}_q"), output.shape, "int8")
        rows = Value(graph.unique_name(f"{output.name}_unscaled"), output.shape)
        rows_scale = Value(graph.unique_name(f"{output.name}_row_scale"), output.shape[:-1] + (1,))
        nodes = [
            Node(layer.name, "embedding", [ids, table_q], [rows_q], {}, created_by),
            Node(graph.unique_name(f"{layer.name}.cast"), "cast", [rows_q], [rows],
                 {"dtype": "float32"}, created_by),
            Node(graph.unique_name(f"{layer.name}.scale_lookup"), "embedding", [ids, row_scales],
                 [rows_scale], {}, created_by),
            Node(graph.unique_name(f"{layer.name}.dequantize"), "mul", [rows, rows_scale],
                 [output], {}, created_by),
        ]
        index = graph.nodes.index(layer)
        graph.nodes[index:index + 1] = nodes
    return len(layers)


def quantize_dynamic(graph: Graph, layers: Sequence[Node], created_by: str) -> int:
    """Replace each linear layer by dynamic_qlinear with int8 weights; return the count."""
    for layer in layers:
        weight_q, w_scale, _ = _quantized_weight(graph, layer)
        attrs: dict[str, Any] = {"per_row": True}
        if layer.attrs.get("activation"):
            attrs["activation"] = layer.attrs["activation"]
        replacement = Node(layer.name, "dynamic_qlinear",
                           [layer.inputs[0], weight_q, w_scale, *layer.inputs[2:]],
                           list(layer.outputs), attrs, created_by)
        graph.nodes[graph.nodes.index(layer)] = replacement
    return len(layers)


def quantize_weights_only(graph: Graph, layers: Sequence[Node], created_by: str) -> int:
    """Store each layer's weight as int8 with a dequantize node in front; return the count."""
    dequantized: dict[int, Value] = {}  # a weight shared by layers is dequantized once
    for layer in layers:
        weight = layer.inputs[1]
        if id(weight) not in dequantized:
            weight_q, w_scale, scales = _quantized_weight(graph, layer)
            zero_point = new_constant(graph, f"{layer.name}.w_zero_point",
                                      np.zeros(scales.shape, np.int8))
            value = Value(graph.unique_name(f"{weight.name}_dequantized"), weight.shape)
            node = Node(graph.unique_name(f"{layer.name}.weight_dequantize"), "dequantize",
                        [weight_q, w_scale, zero_point], [value],
                        {"axis": WEIGHT_AXES[layer.op]}, created_by)
            graph.insert_before(layer, [node])
            dequantized[id(weight)] = value
        layer.inputs[1] = dequantized[id(weight)]
    return len(layers)


# --- static mode ------------------------------------------------------------------------------


def calibration_batches(ctx: PassContext, layers: Sequence[Node]) -> list[Mapping[str, Any]]:
    """Return the calibration batches of ``ctx``, or raise CalibrationError naming the
    tensors that would have no range."""
    if ctx.calibration is not None:
        batches = list(ctx.calibration)
        given = "zero calibration batches were given"
    else:
        batches = [ctx.feeds] if ctx.feeds is not None else []
        given = "no calibration batches or input feeds were given"
    if batches:
        return batches
    names = list(dict.fromkeys(
        value.name for layer in layers for value in (*activation_inputs(layer), layer.outputs[0])
    ))
    shown = ", ".join(f"'{name}'" for name in names[:MAX_NAMES_SHOWN])
    if len(names) > MAX_NAMES_SHOWN:
        shown += f" and {len(names) - MAX_NAMES_SHOWN} more"
    raise CalibrationError(
        f"static int8 quantization needs calibration data, but {given}, so these "
        f"{len(names)} tensors have no range: {shown}. Pass real input batches "
        "(PassManager(..., calibration=[feeds, ...]) or feeds=...), or use quantize:dynamic "
        "or quantize:weight-only, which need none."
    )


def unfuse_activations(graph: Graph, layers: Sequence[Node], created_by: str) -> int:
    """Move fused activations other than relu out of ``layers`` into their own nodes."""
    count = 0
    for layer in layers:
        activation = layer.attrs.get("activation")
        if activation is None or activation == "relu":
            continue
        op, attrs = UNFUSED_ACTIVATIONS[activation]
        output = layer.outputs[0]
        pre_activation = Value(graph.unique_name(f"{output.name}_pre_{activation}"),
                               output.shape, output.dtype)
        layer.outputs = [pre_activation]
        layer.attrs = {k: v for k, v in layer.attrs.items() if k != "activation"}
        node = Node(graph.unique_name(f"{layer.name}.{activation}"), op, [pre_activation],
                    [output], dict(attrs), created_by)
        graph.nodes.insert(graph.nodes.index(layer) + 1, node)
        count += 1
    return count


def constant_matmuls_to_linear(graph: Graph, positions: Sequence[int], created_by: str) -> int:
    """matmul(x, W) -> linear(x, W.T) for the matmuls with a constant operand at ``positions``
    of ``graph``, in place, so that static mode quantizes them as linear layers (weight
    scales per column of W). Returns the count."""
    count = 0
    for position in positions:
        node = graph.nodes[position]
        if not is_constant_matmul(node):
            continue
        x, matrix = node.inputs
        weight = new_constant(graph, f"{node.name}.weight",
                              np.ascontiguousarray(matrix.data.T))
        graph.nodes[position] = Node(node.name, "linear", [x, weight], list(node.outputs), {},
                                     created_by)
        count += 1
    return count


@dataclass
class StaticCalibration:
    """A float copy of the graph whose layers at ``positions`` will become int8, and the
    calibrated parameters of their inputs and outputs, by value name."""

    graph: Graph
    positions: list[int]
    params: dict[str, QuantParams]
    runs: int
    unfused: int

    @classmethod
    def run(cls, graph: Graph, layers: Sequence[Node], batches: Sequence[Mapping[str, Any]],
            method: str, percentile: float, dtype: str,
            progress: ProgressFn | None = None) -> "StaticCalibration":
        """Copy ``graph``, unfuse activations other than relu from ``layers`` and observe the
        ranges of their activation inputs and outputs over ``batches``."""
        positions = [graph.nodes.index(layer) for layer in layers]
        working = graph.copy()
        constant_matmuls_to_linear(working, positions, Quantize.name)
        targets = [working.nodes[position] for position in positions]
        unfused = unfuse_activations(working, targets, Quantize.name)
        values = list({id(v): v for t in targets
                       for v in (*activation_inputs(t), t.outputs[0])}.values())
        observers = {value.name: make_observer(method, percentile, dtype) for value in values}
        runs = observe_ranges(working, values, batches, observers, progress)
        params = {name: _params_from(name, observer, dtype) for name, observer in observers.items()}
        positions = [working.nodes.index(target) for target in targets]
        return cls(working, positions, params, runs, unfused)

    def layer_errors(self, feeds: Mapping[str, np.ndarray],
                     created_by: str = "quantize") -> list[LayerSensitivity]:
        """Return, per layer, the output error on ``feeds`` when only it is int8; largest
        first."""
        reference = _outputs(self.graph, feeds)
        results = []
        for position in self.positions:
            single = self.graph.copy()
            layer = single.nodes[position]
            rewriter = StaticRewriter(single, self.params, created_by)
            rewriter.quantize_layer(layer)
            rewriter.remove_unused_dequantize()
            error = output_error(reference, _outputs(single, feeds))
            results.append(LayerSensitivity(layer.name, layer.op, error))
        results.sort(key=lambda item: item.error, reverse=True)
        return results


def _params_from(name: str, observer: Observer, dtype: str) -> QuantParams:
    low, high = observer.range()
    try:
        return activation_params(low, high, dtype)
    except CalibrationError:
        raise CalibrationError(
            f"tensor '{name}': calibration gave the range [{low}, {high}]; check the "
            "calibration batches for NaN or infinite values"
        ) from None


def _outputs(graph: Graph, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    results = executor.run(graph, feeds)
    return [results[value.name] for value in graph.outputs]


def sensitivity(graph: Graph, feeds: Mapping[str, np.ndarray],
                calibration: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                calib: str = "mse", percentile: float = 99.99, activations: str = "uint8",
                skip: str = "", matmul: bool = False) -> list[LayerSensitivity]:
    """Return, for each layer that static int8 mode would quantize, the graph-output error
    on ``feeds`` when only that layer is int8, largest first. Calibrates on ``calibration``
    (default: ``feeds``); ``graph`` is not changed."""
    options = Quantize(calib=calib, percentile=percentile, activations=activations, skip=skip)
    patterns = parse_patterns(skip)
    layers = quantizable_layers(graph, STATIC_MODE_OPS, activation_matmuls=matmul)
    check_patterns_match(graph, layers, patterns)
    chosen = [layer for layer in layers if not _skipped(layer, patterns)]
    ctx = PassContext(feeds=dict(feeds), calibration=calibration)
    batches = calibration_batches(ctx, chosen)
    config = options.config
    calibrated = StaticCalibration.run(graph, chosen, batches, config["calib"],
                                       config["percentile"], config["activations"])
    return calibrated.layer_errors(feeds)


class StaticRewriter:
    """Turns calibrated float layers of ``graph`` into int8 layers, one at a time.

    Each layer becomes quantize (unless its input is already int8) -> int8 layer ->
    dequantize. ``quantized`` maps each float value that has an int8 form to it, so later
    layers read that form directly.
    """

    def __init__(self, graph: Graph, params: Mapping[str, QuantParams], created_by: str):
        self.graph = graph
        self.params = params
        self.created_by = created_by
        self.quantized: dict[int, Value] = {}
        self.dequantize_nodes: list[Node] = []

    def quantize_layer(self, layer: Node) -> None:
        if layer.op == "matmul":
            self._quantize_matmul(layer)
            return
        graph = self.graph
        x, y = layer.inputs[0], layer.outputs[0]
        x_params, y_params = self.params[x.name], self.params[y.name]
        x_q = self._quantized_input(x, layer)
        weight_q, w_scale, scales = _quantized_weight(graph, layer, x_params.scale)
        inputs = [x_q, weight_q, w_scale]
        if len(layer.inputs) == 3:
            bias = quantize_bias(layer.inputs[2].data, x_params.scale, scales, layer.name)
            inputs.append(new_constant(graph, f"{layer.name}.bias_q", bias))
        attrs = {key: value for key, value in layer.attrs.items() if key != "activation"}
        attrs.update(x_scale=x_params.scale, x_zero_point=x_params.zero_point,
                     y_scale=y_params.scale, y_zero_point=y_params.zero_point)
        if layer.attrs.get("activation") == "relu":
            attrs["activation"] = "relu"
        self._replace(layer, STATIC_OPS[layer.op], inputs, attrs)

    def _quantize_matmul(self, layer: Node) -> None:
        """matmul(a, b) -> dequantize(qmatmul(quantize(a), quantize(b)))"""
        a, b = layer.inputs
        a_params, b_params = self.params[a.name], self.params[b.name]
        y_params = self.params[layer.outputs[0].name]
        inputs = [self._quantized_input(a, layer), self._quantized_input(b, layer)]
        attrs = {"a_scale": a_params.scale, "a_zero_point": a_params.zero_point,
                 "b_scale": b_params.scale, "b_zero_point": b_params.zero_point,
                 "y_scale": y_params.scale, "y_zero_point": y_params.zero_point}
        self._replace(layer, "qmatmul", inputs, attrs)

    def _replace(self, layer: Node, op: str, inputs: list[Value], attrs: dict[str, Any]) -> None:
        """Replace ``layer`` by the int8 node ``op`` followed by a dequantize of its output."""
        graph = self.graph
        y = layer.outputs[0]
        y_params = self.params[y.name]
        y_q = Value(graph.unique_name(f"{y.name}_q"), y.shape, y_params.dtype)
        int8_layer = Node(layer.name, op, inputs, [y_q], attrs, self.created_by)
        dequantize = self._param_node("dequantize", f"{layer.name}.dequantize",
                                      f"{layer.name}.y_", y_q, y, y_params)
        index = graph.nodes.index(layer)
        graph.nodes[index:index + 1] = [int8_layer, dequantize]
        self.quantized[id(y)] = y_q
        self.dequantize_nodes.append(dequantize)

    def remove_unused_dequantize(self) -> int:
        """Remove the dequantize nodes that nothing reads any more; return the count."""
        consumers = self.graph.consumers()
        outputs = {id(value) for value in self.graph.outputs}
        unused = [node for node in self.dequantize_nodes
                  if not consumers.get(node.outputs[0]) and id(node.outputs[0]) not in outputs]
        self.graph.remove_nodes(unused)
        return len(unused)

    def _quantized_input(self, x: Value, layer: Node) -> Value:
        if id(x) not in self.quantized:
            params = self.params[x.name]
            x_q = Value(self.graph.unique_name(f"{x.name}_q"), x.shape, params.dtype)
            node = self._param_node("quantize", f"{x.name}.quantize", f"{x.name}.", x, x_q,
                                    params)
            self.graph.insert_before(layer, [node])
            self.quantized[id(x)] = x_q
        return self.quantized[id(x)]

    def _param_node(self, op: str, name: str, prefix: str, source: Value, result: Value,
                    params: QuantParams) -> Node:
        """Build a quantize or dequantize node with constants ``{prefix}scale`` and
        ``{prefix}zero_point``."""
        scale = new_constant(self.graph, f"{prefix}scale", np.array(params.scale, np.float32))
        zero_point = new_constant(self.graph, f"{prefix}zero_point",
                                  np.array(params.zero_point, params.dtype))
        return Node(self.graph.unique_name(name), op, [source, scale, zero_point], [result],
                    {}, self.created_by)
