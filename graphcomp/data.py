"""Inputs for verification, calibration and benchmarks: seeded random feeds or a dataset.

A dataset is a .npz file or a folder of .npy files, with the same layout:

- ``FILE.npz`` contains one array per graph input, named after the input.
- ``DIR/`` contains ``NAME.npy`` for each graph input ``NAME``.

Each input's array stacks the examples along its leading axis: its shape is N x the input's
shape without its batch dim, with N a multiple of the graph's batch size (a graph of input
shape 1x3x48x320 reads N x 3 x 48 x 320, cut into N batches of one). Every input must hold the
same number of batches. An optional ``labels`` array (``labels.npy`` in a folder), one integer
class per example, gives accuracy.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphcomp.errors import GraphcompError, InputValueError, ShapeError
from graphcomp.ir import Graph

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass
class Dataset:
    """Batches of graph inputs (each batch matches the graph's input shapes) and labels."""

    batches: list[Feeds]
    labels: np.ndarray | None = None
    source: str = "random"

    @property
    def random(self) -> bool:
        return self.source == "random"


def random_feeds(graph: Graph, seed: int = 0, count: int = 2) -> Dataset:
    """Seeded random inputs: floats uniform in [-1, 1], integers all ones (a valid token id and
    an all-true attention mask), booleans all true."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        feeds: Feeds = {}
        for value in graph.inputs:
            dtype = np.dtype(value.dtype)
            if np.issubdtype(dtype, np.floating):
                feeds[value.name] = rng.uniform(-1.0, 1.0, value.shape).astype(dtype)
            else:
                feeds[value.name] = np.ones(value.shape, dtype)
        batches.append(feeds)
    return Dataset(batches)


def load_dataset(path: str | Path, graph: Graph, max_samples: int | None = None) -> Dataset:
    """Read a .npz file or a folder of .npy files and split it into batches of the graph's
    input shapes."""
    path = Path(path)
    arrays = _read_npy_folder(path, graph) if path.is_dir() else _read_npz(path)
    labels = arrays.pop("labels", None)
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in arrays]
    if missing and path.is_dir():
        present = sorted(file.name for file in path.glob("*.npy")) or "no .npy files"
        raise ShapeError(
            f"{path}: missing file(s) {[f'{name}.npy' for name in missing]} for graph "
            f"input(s); the folder has {present} (one NAME.npy per graph input {names})"
        )
    if missing:
        raise ShapeError(
            f"{path}: missing array(s) {missing} for graph input(s); the file has "
            f"{sorted(arrays)} (arrays must be named after the inputs {names})"
        )
    unused = sorted(set(arrays) - set(names))
    if unused:
        log.warning("%s: ignoring array(s) %s that name no graph input", path, unused)

    total = _count_batches(path, graph, arrays)
    for value in graph.inputs:
        where = str(path / f"{value.name}.npy") if path.is_dir() else str(path)
        arrays[value.name] = cast_input(arrays[value.name], value.name, value.dtype, where)
        check_finite(arrays[value.name], value.name, where, per_example=True)
    if max_samples is not None:
        total = min(total, max_samples)
    batches = []
    for i in range(total):
        feeds = {}
        for value in graph.inputs:
            batch = max(value.shape[0], 1)
            feeds[value.name] = np.require(
                arrays[value.name][i * batch:(i + 1) * batch], requirements="C"
            )
        batches.append(feeds)
    if labels is not None:
        labels = _check_labels(path, labels, total * max(graph.inputs[0].shape[0], 1), arrays,
                               graph)
    return Dataset(batches, labels, str(path))


def _count_batches(path: Path, graph: Graph, arrays: dict[str, np.ndarray]) -> int:
    """Return how many graph batches the arrays hold; raise ShapeError if they disagree."""
    counts = {}
    for value in graph.inputs:
        array = arrays[value.name]
        batch = value.shape[0] if value.shape else 1
        if array.shape[1:] != value.shape[1:] or array.shape[0] % max(batch, 1):
            raise ShapeError(
                f"{path}: array '{value.name}' has shape {array.shape}; expected N x "
                f"{list(value.shape[1:])} with N a multiple of the batch size {batch}"
            )
        counts[value.name] = array.shape[0] // max(batch, 1)
    if len(set(counts.values())) != 1:
        raise ShapeError(f"{path}: inputs contain different numbers of batches: {counts}")
    total = next(iter(counts.values()))
    if total == 0:
        raise ShapeError(f"{path}: the input arrays contain no examples")
    return total


def _check_labels(path: Path, labels: np.ndarray, used: int, arrays, graph: Graph) -> np.ndarray:
    """Check that labels are one integer class per example; return those of the used batches."""
    examples = len(arrays[graph.inputs[0].name])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ShapeError(
            f"{path}: 'labels' must be a 1-D integer array of class indices, got "
            f"{labels.dtype} with shape {labels.shape}"
        )
    if len(labels) != examples:
        raise ShapeError(
            f"{path}: 'labels' has {len(labels)} entries but the inputs contain {examples} "
            "examples; give one label per example"
        )
    # Accuracy compares each label with the argmax over the first output's non-batch dims.
    output = graph.outputs[0]
    classes = int(np.prod(output.shape[1:])) if len(output.shape) > 1 else None
    if classes is not None and len(labels):
        outside = (labels < 0) | (labels >= classes)
        if outside.any():
            first = int(np.argmax(outside))
            raise ShapeError(
                f"{path}: 'labels' contains {int(outside.sum())} value(s) outside [0, {classes}) "
                f"(the classes of output '{output.name}', shape {list(output.shape)}), first "
                f"{int(labels[first])} at example {first}; labels must be class indices"
            )
    return labels[:used]


def _dtype_kind(dtype: np.dtype) -> str | None:
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    if np.issubdtype(dtype, np.bool_):
        return "bool"
    return None


def cast_input(array: np.ndarray, name: str, dtype: str, where: str) -> np.ndarray:
    """Cast ``array`` to the graph input's ``dtype`` under the rule that ``compile --data``
    and ``run`` share: a cast within a kind (float64 -> float32, int32 -> int64) is done with a
    warning, a cast across kinds (int -> float, float -> int, bool) raises InputValueError, and
    so does an integer that ``dtype`` cannot hold. ``where`` names the array's file in
    messages."""
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    kind = _dtype_kind(array.dtype)
    if kind is None or kind != _dtype_kind(target):
        raise InputValueError(
            f"{where}: input '{name}' is {array.dtype}, but the model expects {target}; "
            f"graphcomp casts only within a kind (float to float, integer to integer), so "
            f"convert the array yourself, e.g. array.astype(numpy.{target})"
        )
    if kind == "integer" and array.size:
        limits = np.iinfo(target)
        low, high = int(array.min()), int(array.max())
        if low < limits.min or high > limits.max:
            raise InputValueError(
                f"{where}: input '{name}' is {array.dtype} with values in [{low}, {high}], "
                f"which {target} (the model's dtype) cannot hold"
            )
    log.warning("%s: casting input '%s' from %s to %s", where, name, array.dtype, target)
    return array.astype(target)


def check_finite(array: np.ndarray, name: str, where: str, per_example: bool,
                 remedy: str = "remove or replace those values") -> None:
    """Raise InputValueError if the float ``array`` contains NaN or infinity.

    TVM's builds of relu, clip and hardsigmoid turn NaN into ordinary numbers, where ONNX
    Runtime and PyTorch keep NaN, so outputs of such inputs cannot be compared or trusted.
    With ``per_example`` the message names the examples (indices on the leading axis) that
    contain such values; ``remedy`` ends the message."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    position = tuple(int(i) for i in np.argwhere(bad)[0])
    value = array[position]
    if per_example:
        examples = np.flatnonzero(bad.reshape(len(array), -1).any(axis=1))
        shown = ", ".join(str(i) for i in examples[:5]) + (" ..." if len(examples) > 5 else "")
        found = f"{len(examples)} example(s) with NaN or infinite values: {shown}"
    else:
        found = f"{int(bad.sum())} NaN or infinite value(s)"
    raise InputValueError(
        f"{where}: input '{name}' contains {found} (first {value} at {list(position)}). "
        "Compiled code may turn NaN into ordinary numbers (TVM's relu, clip and hardsigmoid "
        f"do), so outputs computed from them cannot be trusted; {remedy}"
    )


def split_dataset(dataset: Dataset, first: int) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into its first ``first`` batches and the rest, labels included."""
    if not 0 <= first <= len(dataset.batches):
        raise ValueError(f"cannot take {first} of {len(dataset.batches)} batches")
    head, tail = dataset.batches[:first], dataset.batches[first:]
    head_labels = tail_labels = None
    if dataset.labels is not None:
        per_batch = len(dataset.labels) // max(len(dataset.batches), 1)
        head_labels = dataset.labels[:first * per_batch]
        tail_labels = dataset.labels[first * per_batch:]
    return (Dataset(head, head_labels, dataset.source),
            Dataset(tail, tail_labels, dataset.source))


def _read_npy_folder(path: Path, graph: Graph) -> dict[str, np.ndarray]:
    """Read ``NAME.npy`` for each graph input (and ``labels.npy``) from the folder ``path``."""
    files = {file.stem: file for file in sorted(path.glob("*.npy")) if file.is_file()}
    arrays = {}
    for name in [value.name for value in graph.inputs] + ["labels"]:
        if name not in files:
            continue
        try:
            arrays[name] = np.load(files[name], allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise GraphcompError(
                f"{files[name]}: not a readable .npy file ({exc}); write it with "
                "numpy.save(path, array)"
            ) from None
    unused = sorted(f"{name}.npy" for name in set(files) - set(arrays))
    if unused:
        log.warning("%s: ignoring file(s) %s that name no graph input", path, unused)
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise GraphcompError(f"{path}: data file not found")
    if not zipfile.is_zipfile(path):
        raise GraphcompError(
            f"{path}: not a .npz archive; write one with numpy.savez(path, NAME=array, ...), "
            "one array per graph input"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise GraphcompError(f"{path}: not a readable .npz file ({exc})") from None
