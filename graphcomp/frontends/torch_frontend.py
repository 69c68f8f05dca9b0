"""The PyTorch frontend: ``torch.export`` programs to graphcomp graphs.

The import runs in six steps:

1. Export the module with ``torch.export.export(strict=False)`` (or take an ExportedProgram).
2. Keep only the FX nodes that the outputs depend on. Parameters, buffers and lifted tensor
   constants become Constants (float32 numpy copies of floating-point tensors), user inputs
   become graph inputs.
3. Fold every node whose tensor inputs are all constants by running its own ATen op on them,
   and fold ops that read only the shape of their input (``ones_like``, ``sym_size``).
4. Convert every other node with the converter registered for its ATen op. Converters emit
   registry ops; ``scaled_dot_product_attention`` becomes matmul, mul, where/add, softmax and
   matmul. In-place ops (``relu_``) convert like their out-of-place forms because
   ``torch.export`` makes later readers use the in-place op's result.
5. Collect unsupported ops and raise one UnsupportedOpError listing all of them.
6. Infer shapes, verify the graph and check every converted value's shape (and the output
   dtypes) against what ``torch.export`` recorded.

Decompositions (``ExportedProgram.run_decompositions``) are not run: they split linear,
layer_norm and attention into many smaller ops, while the converters map the high-level
ATen ops directly. Programs that were decomposed already still import, because the core ATen
forms (convolution, addmm, _native_batch_norm_legit_no_training, native_layer_norm, _softmax)
have converters too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

from graphcomp.errors import (
    GraphcompError, ModelLoadError, ShapeError, UnsupportedOpError, VerificationError,
)
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import TORCH_DTYPES
from graphcomp.shapes import infer_node, infer_shapes
from graphcomp.verifier import verify_graph

logger = logging.getLogger(__name__)

NUMPY_DTYPES = {torch_dtype: name for name, torch_dtype in TORCH_DTYPES.items()}


class _Unsupported(Exception):
    """Raised by a converter for an op variant it cannot map. The importer collects these."""


# --- public API -------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_output_at_info() -> Iterator[None]:
    """Pass what torch logs or prints to stderr inside the block to graphcomp's logger at
    INFO level, after the block, instead of to the terminal.

    torch.export logs tracebacks and prints partial graphs before it raises; the error that
    graphcomp raises already names the fault, so those show only with ``--verbose``.
    """
    diverted: list[str] = []

    def divert(record: logging.LogRecord) -> bool:
        diverted.append(f"[{record.name}] {record.getMessage()}")
        return False

    handlers = {
        handler
        for name, item in list(logging.root.manager.loggerDict.items())
        if (name == "torch" or name.startswith("torch.")) and isinstance(item, logging.Logger)
        for handler in item.handlers
    }
    for handler in handlers:
        handler.addFilter(divert)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(divert)
        if printed.getvalue().strip():
            diverted.append(f"[stderr] {printed.getvalue().strip()}")
        for text in diverted:
            logger.info("torch output: %s", text)


def load_pt2(path) -> torch.export.ExportedProgram:
    """Load an ExportedProgram saved with ``torch.export.save``, raising ModelLoadError if it
    is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        with torch_output_at_info():
            return torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises many exception types for bad files
        raise ModelLoadError(
            f"{path}: not a valid torch.export program ({type(exc).__name__}: {exc}); save one "
            "with torch.export.save"
        ) from exc


def import_torch(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    input_names: list[str] | None = None,
    name: str | None = None,
    output_names: list[str] | None = None,
) -> Graph:
    """Import a PyTorch module in eval mode (exported here) or an ExportedProgram as a Graph.

    Graph inputs are named after the forward arguments unless ``input_names`` is given.
    Outputs are named ``output`` (one output) or ``output_0``, ``output_1``, ... unless
    ``output_names`` is given. Raises GraphcompError for a module in training mode or a failed
    export, UnsupportedOpError listing every op that has no converter.
    """
    start = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        name = name or "exported_program"
    elif isinstance(model, torch.nn.Module):
        name = name or type(model).__name__
        program = _export(model, example_inputs, name)
    else:
        raise GraphcompError(
            f"import_torch expects a torch.nn.Module or torch.export.ExportedProgram, got "
            f"{type(model).__name__}"
        )

    graph = _ProgramImporter(program, name, input_names, output_names).run()
    logger.info(
        "imported %s: %d nodes, %d constants in %.2f s",
        name, len(graph.nodes), len(graph.constants()), time.perf_counter() - start,
    )
    return graph


def _export(model: torch.nn.Module, example_inputs, name: str) -> torch.export.ExportedProgram:
    training = [path or "<root>" for path, module in model.named_modules() if module.training]
    if training:
        shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
        raise GraphcompError(
            f"model '{name}' is in training mode (modules {shown}); call model.eval() before "
            "importing it, because batch norm and dropout compute differently in training"
        )
    if example_inputs is None:
        raise GraphcompError(
            f"model '{name}': example_inputs are required to export a torch.nn.Module"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        with torch.no_grad(), torch_output_at_info():
            return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:  # any exception here means the export failed
        logger.info("torch.export error in full:\n%s", exc)
        raise GraphcompError(
            f"torch.export failed for model '{name}' ({type(exc).__name__}): "
            f"{_export_error_summary(str(exc))} (rerun with --verbose for torch's full message)"
        ) from exc


def _export_error_summary(message: str) -> str:
    """Shorten a torch.export error to its first paragraph and the user's line that raised it.

    torch's messages run to dozens of lines of debugging advice; the first paragraph states
    the fault and "The following call raised this error" names the model's source line.
    """
    paragraphs = [part.strip() for part in re.split(r"\n\s*\n", message.strip()) if part.strip()]
    if not paragraphs:
        return "no message"
    summary = " ".join(paragraphs[0].split())
    if len(summary) > 500:
        summary = summary[:500] + " ..."
    for index, part in enumerate(paragraphs):
        if part.startswith("The following call raised this error"):
            lines = part.splitlines()[1:]
            if not lines and index + 1 < len(paragraphs):
                lines = paragraphs[index + 1].splitlines()
            where = " ".join(" ".join(line.split()) for line in lines[:2])
            if where:
                summary += f"; raised at {where}"
            break
    return summary


# --- the importer -----------------------------------------------------------------------------


class _ProgramImporter:
    """Builds one Graph from one ExportedProgram, in the steps the module docstring lists."""

    def __init__(self, program, name, input_names, output_names):
        self.program = program
        self.name = name
        self.input_names = input_names
        self.output_names = output_names
        self.nodes: list[Node] = []
        self.taken: set[str] = set()
        self.env: dict[fx.Node, Any] = {}
        # (value, FX node name, shape and dtype recorded by torch.export) for the final check.
        self.expected: list[tuple[Value, str, tuple[int, ...], torch.dtype]] = []
        self.unsupported: dict[tuple[str, str], list[str]] = {}
        self.stand_in_ids: set[int] = set()  # values made for unsupported nodes
        self.base = name  # name stem for nodes and constants made for the current FX node

    def run(self) -> Graph:
        graph_module = self.program.graph_module
        live = _live_nodes(graph_module.graph)
        output_node = next(n for n in graph_module.graph.nodes if n.op == "output")
        out_names = self._output_names(output_node)
        self.taken.update(out_names)
        inputs = self._read_placeholders(graph_module.graph, live)

        for fx_node in graph_module.graph.nodes:
            if fx_node not in live or fx_node.op in ("placeholder", "output"):
                continue
            self.env[fx_node] = self._convert(fx_node)
        if self.unsupported:
            raise UnsupportedOpError(
                f"model '{self.name}'",
                [(op, where, names) for (op, where), names in self.unsupported.items()],
            )

        outputs = self._graph_outputs(output_node, out_names)
        graph = Graph(self.name, inputs, outputs, self.nodes,
                      {"source": self.name, "frontend": "torch"})
        infer_shapes(graph)
        verify_graph(graph)
        self._check_against_export(outputs)
        return graph

    # --- names and emitting nodes -------------------------------------------------------------

    def unique(self, base: str) -> str:
        candidate, index = base, 0
        while candidate in self.taken:
            candidate = f"{base}_{index}"
            index += 1
        self.taken.add(candidate)
        return candidate

    def emit(self, op: str, inputs: list[Value], attrs: dict | None = None,
             part: str | None = None, outputs: int = 1) -> Any:
        """Append a node for the current FX node and return its output Value (a list if the
        node has several)."""
        node_name = self.unique(self.base if part is None else f"{self.base}.{part}")
        if outputs == 1:
            values = [Value(self.unique(f"{node_name}_out"), ())]
        else:
            values = [Value(self.unique(f"{node_name}_out{i}"), ()) for i in range(outputs)]
        node = Node(node_name, op, list(inputs), values, dict(attrs or {}), created_by="import")
        for value, (shape, dtype) in zip(values, infer_node(node)):
            value.shape = tuple(int(d) for d in shape)
            value.dtype = dtype
        self.nodes.append(node)
        return values[0] if outputs == 1 else values

    def constant(self, data: np.ndarray, part: str | None = None) -> Constant:
        base = self.base if part is None else f"{self.base}.{part}"
        # np.ascontiguousarray would turn a 0-d array into a 1-d one.
        data = np.asarray(data)
        return Constant(self.unique(base), data if data.flags.c_contiguous else data.copy())

    def scalar(self, number, dtype: str, part: str = "scalar") -> Constant:
        return self.constant(np.array(number, dtype=dtype), part)

    def cast(self, value: Value, dtype: str) -> Value:
        if value.dtype == dtype:
            return value
        if isinstance(value, Constant):
            return self.constant(value.data.astype(dtype), "cast")
        return self.emit("cast", [value], {"dtype": dtype}, part="cast")

    def reshape(self, value: Value, shape: Iterable[int], part: str | None = None) -> Value:
        shape = tuple(int(d) for d in shape)
        if value.shape == shape:
            return value
        if isinstance(value, Constant):
            return self.constant(value.data.reshape(shape), part or "reshape")
        return self.emit("reshape", [value], {"shape": list(shape)}, part=part)

    # --- graph inputs and outputs -------------------------------------------------------------

    def _read_placeholders(self, graph: fx.Graph, live: set[fx.Node]) -> list[Value]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        specs = self.program.graph_signature.input_specs
        user_nodes = []
        for fx_node, spec in zip(placeholders, specs):
            if spec.kind != InputKind.USER_INPUT and fx_node not in live:
                continue  # an unused weight, such as a pooler that the outputs do not read
            if spec.kind == InputKind.USER_INPUT:
                if isinstance(spec.arg, TensorArgument):
                    user_nodes.append(fx_node)
                else:
                    self.env[fx_node] = getattr(spec.arg, "value", None)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER,
                               InputKind.CONSTANT_TENSOR):
                self.env[fx_node] = self._weight(spec.target)
            else:
                raise GraphcompError(
                    f"model '{self.name}': input '{fx_node.name}' is a {spec.kind.name} input, "
                    "which graphcomp cannot import; export a model without custom objects"
                )
        names = self.input_names or [n.name for n in user_nodes]
        if len(names) != len(user_nodes):
            raise GraphcompError(
                f"model '{self.name}' has {len(user_nodes)} tensor inputs "
                f"({', '.join(n.name for n in user_nodes)}) but {len(names)} input names "
                f"were given: {names}"
            )
        inputs = []
        for fx_node, input_name in zip(user_nodes, names):
            shape, dtype = _meta_tensor(fx_node)
            if dtype not in NUMPY_DTYPES:
                raise GraphcompError(
                    f"model '{self.name}': input '{input_name}' has dtype {dtype}; graphcomp "
                    f"supports {', '.join(sorted(TORCH_DTYPES))}"
                )
            if input_name in self.taken:
                raise GraphcompError(
                    f"model '{self.name}': input name '{input_name}' is already used by another "
                    "input or an output"
                )
            value = Value(self.unique(input_name), shape, NUMPY_DTYPES[dtype])
            self.env[fx_node] = value
            inputs.append(value)
        return inputs

    def _weight(self, target: str) -> Constant:
        if target in self.program.state_dict:
            tensor = self.program.state_dict[target]
        else:
            tensor = self.program.constants[target]
        if not isinstance(tensor, torch.Tensor):
            raise GraphcompError(
                f"model '{self.name}': constant '{target}' is a {type(tensor).__name__}, not a "
                "tensor; graphcomp imports only tensor constants"
            )
        return Constant(self.unique(target), _to_numpy(tensor, target))

    def _output_names(self, output_node: fx.Node) -> list[str]:
        specs = self.program.graph_signature.output_specs
        mutations = [s for s in specs if s.kind != OutputKind.USER_OUTPUT]
        if mutations:
            kinds = ", ".join(sorted({s.kind.name for s in mutations}))
            raise GraphcompError(
                f"model '{self.name}' mutates buffers or inputs ({kinds}); graphcomp imports only "
                "models whose forward has no side effects (call model.eval() and remove state "
                "updates)"
            )
        count = len(output_node.args[0])
        if self.output_names is not None:
            if len(self.output_names) != count:
                raise GraphcompError(
                    f"model '{self.name}' has {count} outputs but {len(self.output_names)} "
                    f"output names were given: {self.output_names}"
                )
            return list(self.output_names)
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]

    def _graph_outputs(self, output_node: fx.Node, names: list[str]) -> list[Value]:
        outputs: list[Value] = []
        for fx_arg, out_name in zip(output_node.args[0], names):
            value = self.env[fx_arg] if isinstance(fx_arg, fx.Node) else fx_arg
            self.base = out_name
            if not isinstance(value, Value):
                if not isinstance(value, (bool, int, float)):
                    raise GraphcompError(
                        f"model '{self.name}': output '{out_name}' is a {type(value).__name__}; "
                        "graphcomp graphs return tensors only"
                    )
                value = self.constant(_to_numpy(torch.tensor(value), out_name), "value")
            produced = {id(v) for n in self.nodes for v in n.outputs}
            reused = any(v is value for v in outputs)
            if id(value) not in produced or reused:
                # Graph inputs, constants and repeated outputs need a node of their own to
                # carry the output name.
                value = self.emit("identity", [value], part="identity")
            self.taken.discard(value.name)
            value.name = out_name
            outputs.append(value)
        return outputs

    # --- converting one FX node ---------------------------------------------------------------

    def _convert(self, fx_node: fx.Node) -> Any:
        if fx_node.op == "get_attr":
            attr = getattr(self.program.graph_module, fx_node.target)
            if isinstance(attr, torch.Tensor):
                return Constant(self.unique(fx_node.target), _to_numpy(attr, fx_node.target))
            return self._unsupported(fx_node, "get_attr", "a non-tensor attribute")
        args = fx.node.map_arg(fx_node.args, self.env.__getitem__)
        kwargs = fx.node.map_arg(fx_node.kwargs, self.env.__getitem__)
        self.base = _base_name(fx_node)
        target = fx_node.target
        if any(id(v) in self.stand_in_ids for v in _values_in((args, kwargs))):
            # Downstream of an unsupported node: that node is reported, this one is skipped.
            return self._stand_ins(fx_node)

        if target is operator.getitem:
            return self._getitem(fx_node, args)
        if not isinstance(target, torch._ops.OpOverload):
            if not any(True for _ in _values_in((args, kwargs))):
                return self._fold(fx_node, args, kwargs)
            return self._unsupported(fx_node, _target_name(target), "not an ATen op")

        packet = str(target.overloadpacket)
        # Random ops (dropout, attention with dropout) never fold; their converters check
        # that they are in eval mode.
        random = torch.Tag.nondeterministic_seeded in target.tags
        if not random and all(isinstance(v, Constant) for v in _values_in((args, kwargs))):
            return self._fold(fx_node, args, kwargs)
        if packet in _SHAPE_ONLY_OPS:
            return self._fold(fx_node, *_with_zeros((args, kwargs)))

        converter = _CONVERTERS.get(packet)
        if converter is None:
            reason = "random op" if random else "no graphcomp converter"
            return self._unsupported(fx_node, str(target), reason)
        try:
            result = converter(self, fx_node, _bind(target, args, kwargs))
        except _Unsupported as exc:
            return self._unsupported(fx_node, str(target), str(exc))
        self._remember_expected(fx_node, result)
        return result

    def _getitem(self, fx_node: fx.Node, args) -> Any:
        container, index = args
        item = container[index]
        if item is None:
            return self._unsupported(
                fx_node, "getitem", f"output {index} of '{fx_node.args[0]}' is not imported"
            )
        return item

    def _fold(self, fx_node: fx.Node, args, kwargs) -> Any:
        to_torch = lambda x: torch.from_numpy(x.data.copy()) if isinstance(x, Constant) else x
        args = fx.node.map_aggregate(args, to_torch)
        kwargs = fx.node.map_aggregate(kwargs, to_torch)
        with torch.no_grad():
            result = fx_node.target(*args, **kwargs)
        return fx.node.map_aggregate(
            result,
            lambda x: self.constant(_to_numpy(x, fx_node.name)) if isinstance(x, torch.Tensor)
            else x,
        )

    def _unsupported(self, fx_node: fx.Node, op: str, reason: str) -> Any:
        self.unsupported.setdefault((op, reason), []).append(fx_node.name)
        return self._stand_ins(fx_node)

    def _stand_ins(self, fx_node: fx.Node) -> Any:
        """Values of the recorded shapes for a node that is not converted, so the import can
        go on and report every unsupported node at once."""
        def stand_in(meta):
            if not isinstance(meta, torch.Tensor):
                return meta
            dtype = NUMPY_DTYPES.get(meta.dtype, "float32")
            shape = tuple(d if isinstance(d, int) else 1 for d in meta.shape)
            value = Value(f"{fx_node.name}_unsupported", shape, dtype)
            self.stand_in_ids.add(id(value))
            return value

        return fx.node.map_aggregate(fx_node.meta.get("val"), stand_in)

    def _remember_expected(self, fx_node: fx.Node, result: Any) -> None:
        meta = fx_node.meta.get("val")
        pairs = zip(result, meta) if isinstance(result, (list, tuple)) and isinstance(
            meta, (list, tuple)) else [(result, meta)]
        for value, recorded in pairs:
            if isinstance(value, Value) and isinstance(recorded, torch.Tensor):
                self.expected.append(
                    (value, fx_node.name, _static_shape(recorded, fx_node.name), recorded.dtype)
                )

    def _check_against_export(self, outputs: list[Value]) -> None:
        output_ids = {id(v) for v in outputs}
        for value, fx_name, shape, dtype in self.expected:
            if value.shape != shape:
                raise VerificationError(
                    f"model '{self.name}': value '{value.name}' from node '{fx_name}' has shape "
                    f"{value.shape} in graphcomp but {shape} in torch.export; this is a frontend "
                    "bug, report it with the model"
                )
            # Floating-point weights become float32, so only non-float output dtypes must match.
            both_float = dtype.is_floating_point and np.dtype(value.dtype).kind == "f"
            same_dtype = both_float or NUMPY_DTYPES.get(dtype) == value.dtype
            if id(value) in output_ids and not same_dtype:
                raise VerificationError(
                    f"model '{self.name}': output '{value.name}' has dtype {value.dtype} in "
                    f"graphcomp but {dtype} in torch.export"
                )


# --- helpers for FX nodes ---------------------------------------------------------------------


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Collect the nodes that the graph output depends on, so dead code (an unused pooler)
    is skipped."""
    output_node = next(n for n in graph.nodes if n.op == "output")
    live, stack = set(), [output_node]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    return live


_MODULE_PATH = re.compile(r"^[A-Za-z0-9_.]+$")


def _base_name(fx_node: fx.Node) -> str:
    """Name a node after its torch.nn leaf module (``conv1``), else after the FX node."""
    stack = fx_node.meta.get("nn_module_stack")
    if stack:
        path, module_type = list(stack.values())[-1]
        type_name = module_type if isinstance(module_type, str) else getattr(
            module_type, "__module__", "")
        if path and _MODULE_PATH.match(path) and type_name.startswith("torch.nn.modules."):
            return path
    return fx_node.name


def _target_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _values_in(tree) -> Iterable[Value]:
    found: list[Value] = []
    fx.node.map_aggregate(tree, lambda x: found.append(x) if isinstance(x, Value) else None)
    return found


def _with_zeros(tree):
    """Replace each Value by a zero tensor of its shape and dtype (for shape-only ops)."""
    return fx.node.map_aggregate(
        tree,
        lambda x: torch.zeros(x.shape, dtype=TORCH_DTYPES[x.dtype]) if isinstance(x, Value) else x,
    )


def _bind(target: torch._ops.OpOverload, args, kwargs) -> dict[str, Any]:
    """Map the op's schema argument names to the call's values, filling in defaults."""
    bound = {}
    for index, argument in enumerate(target._schema.arguments):
        if index < len(args):
            bound[argument.name] = args[index]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _static_shape(tensor: torch.Tensor, where: str) -> tuple[int, ...]:
    shape = []
    for dim in tensor.shape:
        if not isinstance(dim, int):
            raise ShapeError(
                f"node '{where}' has a dynamic dim ({dim}); graphcomp needs static shapes, so "
                "export without dynamic_shapes"
            )
        shape.append(dim)
    return tuple(shape)


def _meta_tensor(fx_node: fx.Node) -> tuple[tuple[int, ...], torch.dtype]:
    meta = fx_node.meta.get("val")
    if not isinstance(meta, torch.Tensor):
        raise ShapeError(f"node '{fx_node.name}' has no recorded tensor shape in the export")
    return _static_shape(meta, fx_node.name), meta.dtype


def _numpy_dtype(dtype: torch.dtype, where: str) -> str:
    if dtype not in NUMPY_DTYPES:
        raise _Unsupported(f"dtype {dtype} at '{where}'")
    return NUMPY_DTYPES[dtype]


def _to_numpy(tensor: torch.Tensor, where: str) -> np.ndarray:
    """Copy a weight or folded tensor to numpy, converting floating-point data to float32."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    if tensor.dtype not in NUMPY_DTYPES:
        raise GraphcompError(
            f"constant '{where}' has dtype {tensor.dtype}, which graphcomp does not support"
        )
    return tensor.numpy().copy()


def _out_shape(fx_node: fx.Node) -> tuple[int, ...]:
    return _meta_tensor(fx_node)[0]


def _out_dtype(fx_node: fx.Node) -> str:
    return _numpy_dtype(_meta_tensor(fx_node)[1], fx_node.name)


def _ints(value, count: int) -> list[int]:
    """Expand an int or a list of ints (as ATen passes kernel sizes and strides) to ``count``."""
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value]
        return values * count if len(values) == 1 else values
    return [int(value)] * count


# --- converters -------------------------------------------------------------------------------

Converter = Callable[[_ProgramImporter, fx.Node, dict], Any]
_CONVERTERS: dict[str, Converter] = {}

# Ops whose tensor inputs contribute only their shape and dtype, so they always fold.
_SHAPE_ONLY_OPS = {
    "aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.new_zeros", "aten.new_ones",
    "aten.new_full", "aten.sym_size", "aten.sym_numel", "aten.size",
}


def _converts(*packets: str) -> Callable[[Converter], Converter]:
    def register(converter: Converter) -> Converter:
        for packet in packets:
            _CONVERTERS[packet] = converter
        return converter
    return register


def _first_args(bound: dict, count: int) -> list:
    return list(bound.values())[:count]


@_converts("aten.dropout", "aten.dropout_", "aten.feature_dropout", "aten.alpha_dropout",
           "aten.feature_alpha_dropout", "aten.native_dropout")
def _dropout(b, fx_node, a):
    x, _, train = _first_args(a, 3)
    is_native = str(fx_node.target.overloadpacket) == "aten.native_dropout"
    # native_dropout treats train=None as training.
    if train or (is_native and train is None):
        raise GraphcompError(
            f"model '{b.name}': node '{fx_node.name}' is dropout in training mode; call "
            "model.eval() before exporting"
        )
    return (x, None) if is_native else x


@_converts("aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy",
           "aten.to", "aten._to_copy", "aten.type_as")
def _copy_or_cast(b, fx_node, a):
    x = _first_args(a, 1)[0]
    return b.cast(x, _out_dtype(fx_node))


# --- elementwise ------------------------------------------------------------------------------

_UNARY_OPS = {
    "aten.relu": "relu", "aten.relu_": "relu", "aten.sigmoid": "sigmoid",
    "aten.sigmoid_": "sigmoid", "aten.tanh": "tanh", "aten.tanh_": "tanh", "aten.erf": "erf",
    "aten.exp": "exp", "aten.log": "log", "aten.sqrt": "sqrt", "aten.rsqrt": "rsqrt",
    "aten.neg": "neg", "aten.abs": "abs", "aten.reciprocal": "reciprocal", "aten.silu": "silu",
    "aten.silu_": "silu", "aten.hardswish": "hardswish", "aten.hardswish_": "hardswish",
    "aten.hardsigmoid": "hardsigmoid", "aten.hardsigmoid_": "hardsigmoid",
}


@_converts(*_UNARY_OPS)
def _unary(b, fx_node, a):
    x = b.cast(_first_args(a, 1)[0], _out_dtype(fx_node))
    return b.emit(_UNARY_OPS[str(fx_node.target.overloadpacket)], [x])


@_converts("aten.gelu", "aten.gelu_")
def _gelu(b, fx_node, a):
    return b.emit("gelu", [a["self"]], {"approximate": a.get("approximate") or "none"})


@_converts("aten.logical_not", "aten.bitwise_not")
def _logical_not(b, fx_node, a):
    x = a["self"]
    if str(fx_node.target.overloadpacket) == "aten.bitwise_not" and x.dtype != "bool":
        raise _Unsupported("bitwise not of integers")
    return b.emit("logical_not", [b.cast(x, "bool")])


@_converts("aten.hardtanh", "aten.hardtanh_", "aten.relu6", "aten.clamp", "aten.clamp_",
           "aten.clamp_min", "aten.clamp_max")
def _clamp(b, fx_node, a):
    packet = str(fx_node.target.overloadpacket)
    x = b.cast(a["self"], _out_dtype(fx_node))
    if packet.startswith("aten.hardtanh"):
        low, high = a["min_val"], a["max_val"]
    elif packet == "aten.relu6":
        low, high = 0.0, 6.0
    elif packet == "aten.clamp_min":
        low, high = a["min"], None
    elif packet == "aten.clamp_max":
        low, high = None, a["max"]
    else:
        low, high = a["min"], a["max"]
    if isinstance(low, Value) or isinstance(high, Value):
        # clamp.Tensor: bounds are tensors, so use maximum and minimum.
        if low is not None:
            x = b.emit("maximum", [x, b.cast(low, x.dtype)], part="min")
        if high is not None:
            x = b.emit("minimum", [x, b.cast(high, x.dtype)], part="max")
        return x
    number = float if np.dtype(x.dtype).kind == "f" else int
    attrs = {"min": None if low is None else number(low),
             "max": None if high is None else number(high)}
    return b.emit("clip", [x], attrs)


_BINARY_OPS = {
    "aten.add": "add", "aten.add_": "add", "aten.sub": "sub", "aten.sub_": "sub",
    "aten.rsub": "sub", "aten.mul": "mul", "aten.mul_": "mul", "aten.div": "div",
    "aten.div_": "div", "aten.pow": "pow", "aten.maximum": "maximum",
    "aten.minimum": "minimum", "aten.eq": "equal", "aten.ne": "not_equal", "aten.lt": "less",
    "aten.le": "less_equal", "aten.gt": "greater", "aten.ge": "greater_equal",
    "aten.logical_and": "logical_and", "aten.logical_or": "logical_or",
    "aten.logical_xor": "logical_xor", "aten.bitwise_and": "logical_and",
    "aten.__and__": "logical_and", "aten.bitwise_or": "logical_or", "aten.__or__": "logical_or",
    "aten.bitwise_xor": "logical_xor", "aten.__xor__": "logical_xor",
}
_LOGICAL_OPS = {"logical_and", "logical_or", "logical_xor"}


def _dtype_sample(operand):
    """Something torch.result_type promotes like ``operand``: a tensor of the same rank and
    dtype for a Value (0-d tensors promote differently), the number itself for a scalar."""
    if isinstance(operand, Value):
        return torch.empty((0,) * operand.rank, dtype=TORCH_DTYPES[operand.dtype])
    return operand


def _operand(b, operand, dtype: str, part: str) -> Value:
    if isinstance(operand, Value):
        return b.cast(operand, dtype)
    return b.scalar(operand, dtype, part)


@_converts(*_BINARY_OPS)
def _binary(b, fx_node, a):
    packet = str(fx_node.target.overloadpacket)
    op = _BINARY_OPS[packet]
    lhs, rhs = _first_args(a, 2)
    if packet == "aten.rsub":
        lhs, rhs = rhs, lhs
    if a.get("rounding_mode") is not None:
        raise _Unsupported(f"division with rounding_mode='{a['rounding_mode']}'")
    alpha = a.get("alpha")
    if alpha not in (None, 1):
        # sub: self - alpha * other; rsub (swapped above): other - alpha * self.
        rhs = _scaled(b, rhs, alpha)

    common = torch.result_type(_dtype_sample(lhs), _dtype_sample(rhs))
    if op in _LOGICAL_OPS:
        if packet.startswith(("aten.bitwise", "aten.__")) and common != torch.bool:
            raise _Unsupported("bitwise ops on integers")
        common = torch.bool
    elif op == "div" and not common.is_floating_point:
        common = torch.get_default_dtype()
    dtype = _numpy_dtype(common, fx_node.name)
    return b.emit(op, [_operand(b, lhs, dtype, "lhs"), _operand(b, rhs, dtype, "rhs")])


def _scaled(b, operand, factor):
    if factor == 1:
        return operand
    if isinstance(operand, Constant):
        return b.constant((operand.data * factor).astype(operand.dtype), "scaled")
    if isinstance(operand, Value):
        return _binary_values(b, "mul", operand, factor, "alpha")
    return operand * factor


def _binary_values(b, op: str, value: Value, number, part: str) -> Value:
    return b.emit(op, [value, b.scalar(number, value.dtype, f"{part}_value")], part=part)


@_converts("aten.where")
def _where(b, fx_node, a):
    cond, lhs, rhs = a["condition"], a["self"], a["other"]
    dtype = _out_dtype(fx_node)
    cond = _operand(b, cond, "bool", "condition")
    return b.emit("where", [cond, _operand(b, lhs, dtype, "lhs"), _operand(b, rhs, dtype, "rhs")])


@_converts("aten.masked_fill", "aten.masked_fill_")
def _masked_fill(b, fx_node, a):
    x, mask, fill = a["self"], a["mask"], a["value"]
    fill = _operand(b, fill, x.dtype, "fill")
    return b.emit("where", [b.cast(mask, "bool"), fill, x])


# --- shape and data movement ------------------------------------------------------------------


@_converts("aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy", "aten.flatten",
           "aten.unflatten", "aten.unsqueeze", "aten.unsqueeze_", "aten.squeeze",
           "aten.squeeze_")
def _reshape(b, fx_node, a):
    return b.reshape(_first_args(a, 1)[0], _out_shape(fx_node))


@_converts("aten.expand", "aten.expand_as", "aten.expand_copy", "aten.broadcast_to")
def _expand(b, fx_node, a):
    x = _first_args(a, 1)[0]
    shape = _out_shape(fx_node)
    if x.shape == shape:
        return x
    return b.emit("expand", [x], {"shape": list(shape)})


@_converts("aten.permute", "aten.transpose", "aten.t", "aten.numpy_T", "aten.mT",
           "aten.swapaxes", "aten.swapdims", "aten.permute_copy")
def _transpose(b, fx_node, a):
    packet = str(fx_node.target.overloadpacket)
    x = _first_args(a, 1)[0]
    perm = list(range(x.rank))
    if packet in ("aten.permute", "aten.permute_copy"):
        perm = [int(d) % x.rank for d in a["dims"]]
    elif packet == "aten.numpy_T":
        perm.reverse()
    elif packet == "aten.mT" or (packet == "aten.t" and x.rank == 2):
        perm[-2], perm[-1] = perm[-1], perm[-2]
    elif packet != "aten.t":
        first, second = _first_args(a, 3)[1:]
        first, second = int(first) % x.rank, int(second) % x.rank
        perm[first], perm[second] = perm[second], perm[first]
    if perm == list(range(x.rank)):
        return x
    return b.emit("transpose", [x], {"perm": perm})


@_converts("aten.cat", "aten.concat", "aten.concatenate")
def _cat(b, fx_node, a):
    dtype = _out_dtype(fx_node)
    # Legacy code concatenates empty 1-D tensors with anything; they add nothing.
    parts = [b.cast(v, dtype) for v in a["tensors"] if not (v.rank == 1 and v.shape[0] == 0)]
    if len(parts) == 1:
        return parts[0]
    return b.emit("concat", parts, {"axis": int(a["dim"]) % parts[0].rank})


@_converts("aten.stack")
def _stack(b, fx_node, a):
    dtype = _out_dtype(fx_node)
    rank = len(_out_shape(fx_node))
    axis = int(a["dim"]) % rank
    parts = []
    for index, value in enumerate(a["tensors"]):
        shape = value.shape[:axis] + (1,) + value.shape[axis:]
        parts.append(b.reshape(b.cast(value, dtype), shape, part=f"unsqueeze{index}"))
    return b.emit("concat", parts, {"axis": axis})


@_converts("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
           "aten.tensor_split", "aten.unsafe_split")
def _split(b, fx_node, a):
    x = _first_args(a, 1)[0]
    pieces = fx_node.meta["val"]
    axis = int(a.get("dim") or 0) % x.rank
    sizes = [int(p.shape[axis]) if str(fx_node.target.overloadpacket) != "aten.unbind" else 1
             for p in pieces]
    if len(sizes) == 1:
        values = [x]
    else:
        values = b.emit("split", [x], {"axis": axis, "sizes": sizes}, outputs=len(sizes))
    if str(fx_node.target.overloadpacket) == "aten.unbind":
        values = [b.reshape(v, tuple(p.shape), part=f"squeeze{i}")
                  for i, (v, p) in enumerate(zip(values, pieces))]
    return values


@_converts("aten.slice", "aten.narrow", "aten.slice_copy")
def _slice(b, fx_node, a):
    x = _first_args(a, 1)[0]
    axis = int(a["dim"]) % x.rank
    if str(fx_node.target.overloadpacket) == "aten.narrow":
        start = int(a["start"])
        start, stop, step = start, start + int(a["length"]), 1
    else:
        start = 0 if a["start"] is None else int(a["start"])
        stop = x.shape[axis] if a["end"] is None else int(a["end"])
        step = int(a["step"])
    start, stop, step = slice(start, stop, step).indices(x.shape[axis])
    if (start, stop, step) == (0, x.shape[axis], 1):
        return x
    return b.emit("slice", [x], {"starts": [start], "ends": [stop], "axes": [axis],
                                 "steps": [step]})


@_converts("aten.select", "aten.select_copy")
def _select(b, fx_node, a):
    x = a["self"]
    axis = int(a["dim"]) % x.rank
    index = int(a["index"]) % x.shape[axis]
    picked = b.emit("slice", [x], {"starts": [index], "ends": [index + 1], "axes": [axis],
                                   "steps": [1]})
    return b.reshape(picked, _out_shape(fx_node), part="squeeze")


def _gather_positions(b, data: Value, positions: np.ndarray) -> Value:
    """Read ``data`` at flat ``positions`` (an integer array of the output's shape)."""
    if positions.size == data.size and np.array_equal(positions.ravel(), np.arange(data.size)):
        return b.reshape(data, positions.shape)
    flat = b.reshape(data, (data.size,), part="flatten")
    index = b.constant(positions.astype(np.int64), "positions")
    return b.emit("gather", [flat, index], {"axis": 0})


def _positions(shape: tuple[int, ...], pick: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Apply an indexing function to a tensor of flat positions. Each element of the result is
    the flat index of the input element that the output element reads."""
    flat = torch.arange(int(np.prod(shape, dtype=np.int64)), dtype=torch.int64).reshape(shape)
    return pick(flat).numpy()


@_converts("aten.index")
def _index(b, fx_node, a):
    data, indices = a["self"], list(a["indices"])
    tensors = [i for i in indices if i is not None]
    if all(isinstance(i, Constant) for i in tensors):
        torch_indices = [None if i is None else torch.from_numpy(i.data) for i in indices]
        positions = _positions(data.shape, lambda t: torch.ops.aten.index.Tensor(t, torch_indices))
        return _gather_positions(b, data, positions)
    if len(tensors) == 1 and tensors[0].dtype != "bool":
        return b.emit("gather", [data, tensors[0]], {"axis": indices.index(tensors[0])})
    raise _Unsupported("several index tensors, or a boolean mask, computed from graph inputs")


@_converts("aten.gather")
def _gather(b, fx_node, a):
    data, axis, index = a["self"], int(a["dim"]), a["index"]
    if not isinstance(index, Constant):
        raise _Unsupported("gather indices computed from graph inputs")
    torch_index = torch.from_numpy(index.data)
    positions = _positions(data.shape, lambda t: torch.gather(t, axis, torch_index))
    return _gather_positions(b, data, positions)


@_converts("aten.index_select")
def _index_select(b, fx_node, a):
    data = a["self"]
    return b.emit("gather", [data, a["index"]], {"axis": int(a["dim"]) % data.rank})


@_converts("aten.embedding")
def _embedding(b, fx_node, a):
    return b.emit("embedding", [a["indices"], a["weight"]])


@_converts("aten.constant_pad_nd", "aten.pad")
def _pad(b, fx_node, a):
    x = a["self"]
    if (a.get("mode") or "constant") != "constant":
        raise _Unsupported(f"padding mode '{a['mode']}'")
    torch_pads = [int(p) for p in a["pad"]]
    if any(p < 0 for p in torch_pads):
        raise _Unsupported("negative padding (cropping)")
    # PyTorch lists (before, after) pairs from the last dim backwards, but the pad op wants
    # all befores, then all afters, from the first dim.
    befores, afters = [0] * x.rank, [0] * x.rank
    for pair in range(len(torch_pads) // 2):
        dim = x.rank - 1 - pair
        befores[dim], afters[dim] = torch_pads[2 * pair], torch_pads[2 * pair + 1]
    value = a.get("value")
    return b.emit("pad", [x], {"pads": befores + afters, "mode": "constant",
                               "value": float(value or 0.0)})


# --- matmul, convolution, normalization -------------------------------------------------------


@_converts("aten.linear")
def _linear(b, fx_node, a):
    inputs = [a["input"], a["weight"]] + ([a["bias"]] if a["bias"] is not None else [])
    if inputs[1].rank != 2:
        raise _Unsupported(f"a {inputs[1].rank}-D weight")
    return b.emit("linear", inputs)


@_converts("aten.addmm")
def _addmm(b, fx_node, a):
    """Convert beta * bias + alpha * (mat1 @ mat2). A constant mat2 becomes a linear layer."""
    bias, x, weight, alpha, beta = a["self"], a["mat1"], a["mat2"], a["alpha"], a["beta"]
    if alpha == 1 and beta == 1 and isinstance(weight, Constant) and weight.rank == 2 \
            and bias.rank == 1:
        return b.emit("linear", [x, b.constant(weight.data.T, "weight"), bias])
    product = _binary_matmul(b, x, weight)
    if alpha != 1:
        product = _scaled(b, product, alpha)
    if beta == 0:
        return product
    return b.emit("add", [product, _scaled(b, bias, beta)], part="bias")


def _binary_matmul(b, x: Value, weight: Value) -> Value:
    if isinstance(weight, Constant) and weight.rank == 2 and x.rank >= 2:
        # x @ W is linear(x, W.T): one op that passes and backends know as a layer.
        return b.emit("linear", [x, b.constant(weight.data.T, "weight")])
    return b.emit("matmul", [x, weight])


@_converts("aten.mm", "aten.bmm", "aten.matmul")
def _matmul(b, fx_node, a):
    lhs, rhs = _first_args(a, 2)
    return _binary_matmul(b, lhs, rhs)


def _conv_padding(padding, weight: Value, dilations: list[int], spatial: int) -> list[int]:
    """Return pads for the spatial dims (all befores, then all afters) from ATen's padding."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * spatial)
        # 'same': PyTorch puts the odd extra padding after.
        totals = [d * (k - 1) for d, k in zip(dilations, weight.shape[2:])]
        return [t // 2 for t in totals] + [t - t // 2 for t in totals]
    pads = _ints(padding, spatial)
    return pads + pads


def _emit_conv(b, fx_node, x, weight, bias, stride, padding, dilation, groups,
               transposed=False, output_padding=None):
    if x.rank == 3:
        return _emit_conv1d(b, fx_node, x, weight, bias, stride, padding, dilation, groups,
                            transposed, output_padding)
    if x.rank != 4:
        raise _Unsupported(f"{x.rank - 2}-D convolution (only 1-D and 2-D are supported)")
    dilations = _ints(dilation, 2)
    attrs = {
        "strides": _ints(stride, 2),
        "pads": _conv_padding(padding, weight, dilations, 2),
        "dilations": dilations,
        "groups": int(groups),
    }
    inputs = [x, weight] + ([bias] if bias is not None else [])
    if not transposed:
        return b.emit("conv2d", inputs, attrs)
    attrs["output_padding"] = _ints(output_padding or 0, 2)
    return b.emit("conv_transpose2d", inputs, attrs)


def _emit_conv1d(b, fx_node, x, weight, bias, stride, padding, dilation, groups,
                 transposed, output_padding):
    """Emit a 1-D convolution as a 2-D one over a height of 1."""
    n, c, length = x.shape
    x2 = b.reshape(x, (n, c, 1, length), part="to2d")
    w2 = b.reshape(weight, weight.shape[:2] + (1,) + weight.shape[2:], part="weight2d")
    dilations = [1] + _ints(dilation, 1)
    pads_1d = _conv_padding(padding, weight, dilations[1:], 1)
    attrs = {
        "strides": [1] + _ints(stride, 1),
        "pads": [0, pads_1d[0], 0, pads_1d[1]],
        "dilations": dilations,
        "groups": int(groups),
    }
    inputs = [x2, w2] + ([bias] if bias is not None else [])
    if transposed:
        attrs["output_padding"] = [0] + _ints(output_padding or 0, 1)
        y = b.emit("conv_transpose2d", inputs, attrs)
    else:
        y = b.emit("conv2d", inputs, attrs)
    return b.reshape(y, _out_shape(fx_node), part="to1d")


@_converts("aten.conv2d", "aten.conv1d")
def _conv(b, fx_node, a):
    return _emit_conv(b, fx_node, a["input"], a["weight"], a["bias"], a["stride"],
                      a["padding"], a["dilation"], a["groups"])


@_converts("aten.conv_transpose2d", "aten.conv_transpose1d")
def _conv_transpose(b, fx_node, a):
    return _emit_conv(b, fx_node, a["input"], a["weight"], a["bias"], a["stride"],
                      a["padding"], a["dilation"], a["groups"], True, a["output_padding"])


@_converts("aten.convolution", "aten._convolution")
def _convolution(b, fx_node, a):
    return _emit_conv(b, fx_node, a["input"], a["weight"], a["bias"], a["stride"],
                      a["padding"], a["dilation"], a["groups"], bool(a["transposed"]),
                      a["output_padding"])


@_converts("aten.batch_norm", "aten._native_batch_norm_legit_no_training",
           "aten.native_batch_norm", "aten._native_batch_norm_legit",
           "aten._native_batch_norm_legit_functional")
def _batch_norm(b, fx_node, a):
    x = a["input"]
    if a.get("training"):
        raise GraphcompError(
            f"model '{b.name}': node '{fx_node.name}' is batch norm in training mode; call "
            "model.eval() before exporting"
        )
    mean, var = a.get("running_mean"), a.get("running_var")
    if mean is None or var is None:
        raise _Unsupported("batch norm without running statistics (track_running_stats=False)")
    channels = x.shape[1]
    scale = a["weight"] if a["weight"] is not None else b.constant(
        np.ones(channels, np.float32), "scale")
    bias = a["bias"] if a["bias"] is not None else b.constant(
        np.zeros(channels, np.float32), "bias")
    y = b.emit("batch_norm", [x, scale, bias, mean, var], {"eps": float(a["eps"])})
    if str(fx_node.target.overloadpacket) == "aten.batch_norm":
        return y
    return (y, None, None)


@_converts("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(b, fx_node, a):
    x, weight, bias = a["input"], a["weight"], a["bias"]
    norm_shape = [int(d) for d in a["normalized_shape"]]
    inputs = [x]
    if weight is not None or bias is not None:
        inputs.append(weight if weight is not None else b.constant(
            np.ones(norm_shape, np.float32), "scale"))
    if bias is not None:
        inputs.append(bias)
    y = b.emit("layer_norm", inputs, {"axis": x.rank - len(norm_shape), "eps": float(a["eps"])})
    if str(fx_node.target.overloadpacket) == "aten.layer_norm":
        return y
    return (y, None, None)


@_converts("aten.softmax", "aten._softmax", "aten.special_softmax")
def _softmax(b, fx_node, a):
    x = b.cast(a["self"], _out_dtype(fx_node))
    return b.emit("softmax", [x], {"axis": int(a["dim"]) % x.rank})


@_converts("aten.scaled_dot_product_attention")
def _attention(b, fx_node, a):
    """Decompose attention into softmax(q @ k^T * scale + mask) @ v. A boolean mask marks the
    positions that take part, as in PyTorch."""
    query, key, value, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a.get("dropout_p"):
        raise _Unsupported("attention dropout (dropout_p > 0)")
    if a.get("enable_gqa") and query.shape[-3] != key.shape[-3]:
        raise _Unsupported("grouped-query attention (enable_gqa with fewer key heads)")
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

    perm = list(range(key.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    key_t = b.emit("transpose", [key], {"perm": perm}, part="key_t")
    scores = b.emit("matmul", [query, key_t], part="scores")
    scores = _binary_values(b, "mul", scores, scale, "scale")
    if a.get("is_causal"):
        allowed = np.tril(np.ones((query.shape[-2], key.shape[-2]), dtype=bool))
        mask_value = b.constant(allowed, "causal_mask")
        scores = _mask_scores(b, scores, mask_value, "causal")
    if mask is not None:
        if mask.dtype == "bool":
            scores = _mask_scores(b, scores, mask, "mask")
        else:
            scores = b.emit("add", [scores, b.cast(mask, scores.dtype)], part="mask")
    probs = b.emit("softmax", [scores], {"axis": -1}, part="probs")
    # NOTE: a query row with every key masked gives NaN here (softmax of all -inf).
    return b.emit("matmul", [probs, value])


def _mask_scores(b, scores: Value, allowed: Value, part: str) -> Value:
    minus_inf = b.scalar(-np.inf, scores.dtype, f"{part}_fill")
    return b.emit("where", [allowed, scores, minus_inf], part=part)


# --- pooling and reductions -------------------------------------------------------------------


def _require_4d(x: Value, what: str) -> None:
    if x.rank != 4:
        raise _Unsupported(f"{what} on a {x.rank}-D input (only batched N,C,H,W is supported)")


@_converts("aten.max_pool2d", "aten.max_pool2d_with_indices")
def _max_pool(b, fx_node, a):
    x = a["self"]
    _require_4d(x, "max pooling")
    kernel = _ints(a["kernel_size"], 2)
    pads = _ints(a["padding"], 2)
    attrs = {
        "kernel": kernel, "strides": _ints(a["stride"] or kernel, 2), "pads": pads + pads,
        "dilations": _ints(a["dilation"], 2), "ceil_mode": bool(a["ceil_mode"]),
    }
    y = b.emit("max_pool2d", [x], attrs)
    if str(fx_node.target.overloadpacket) == "aten.max_pool2d":
        return y
    return (y, None)


@_converts("aten.avg_pool2d")
def _avg_pool(b, fx_node, a):
    x = a["self"]
    _require_4d(x, "average pooling")
    if a.get("divisor_override") is not None:
        raise _Unsupported("avg_pool2d with divisor_override")
    kernel = _ints(a["kernel_size"], 2)
    pads = _ints(a["padding"], 2)
    attrs = {
        "kernel": kernel, "strides": _ints(a["stride"] or kernel, 2), "pads": pads + pads,
        "ceil_mode": bool(a["ceil_mode"]), "count_include_pad": bool(a["count_include_pad"]),
    }
    return b.emit("avg_pool2d", [x], attrs)


@_converts("aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d")
def _adaptive_avg_pool(b, fx_node, a):
    x = a["self"]
    _require_4d(x, "adaptive average pooling")
    return b.emit("adaptive_avg_pool2d", [x], {"output_size": list(_out_shape(fx_node)[2:])})


def _reduce_axes(x: Value, dims) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(x.rank))
    return sorted(int(d) % x.rank for d in _ints(dims, 1))


@_converts("aten.mean", "aten.sum", "aten.amax")
def _reduce(b, fx_node, a):
    op = {"aten.mean": "reduce_mean", "aten.sum": "reduce_sum", "aten.amax": "reduce_max"}[
        str(fx_node.target.overloadpacket)]
    x = b.cast(a["self"], _out_dtype(fx_node))
    if x.rank == 0:
        return x
    axes = _reduce_axes(x, a.get("dim"))
    return b.emit(op, [x], {"axes": axes, "keepdims": bool(a.get("keepdim") or False)})


@_converts("aten.linalg_vector_norm")
def _vector_norm(b, fx_node, a):
    x = b.cast(a["self"], _out_dtype(fx_node))
    order = float(a["ord"])
    attrs = {"axes": _reduce_axes(x, a["dim"]), "keepdims": bool(a["keepdim"])}
    if order == 2.0:
        squares = b.emit("mul", [x, x], part="square")
        return b.emit("sqrt", [b.emit("reduce_sum", [squares], attrs, part="sum")])
    if order == 1.0:
        return b.emit("reduce_sum", [b.emit("abs", [x], part="abs")], attrs)
    if order == math.inf:
        return b.emit("reduce_max", [b.emit("abs", [x], part="abs")], attrs)
    raise _Unsupported(f"vector norm of order {order} (1, 2 and inf are supported)")


# --- resizing ---------------------------------------------------------------------------------


@_converts("aten.upsample_nearest2d")
def _upsample_nearest(b, fx_node, a):
    x = a["input"] if "input" in a else a["self"]
    _require_4d(x, "nearest upsampling")
    return b.emit("resize", [x], {"size": list(_out_shape(fx_node)[2:]), "mode": "nearest",
                                  "coordinate_transformation": "asymmetric",
                                  "nearest_mode": "floor"})


@_converts("aten.upsample_bilinear2d")
def _upsample_bilinear(b, fx_node, a):
    x = a["input"] if "input" in a else a["self"]
    _require_4d(x, "bilinear upsampling")
    transform = "align_corners" if a["align_corners"] else "half_pixel"
    return b.emit("resize", [x], {"size": list(_out_shape(fx_node)[2:]), "mode": "linear",
                                  "coordinate_transformation": transform})
