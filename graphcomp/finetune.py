"""Recover the accuracy of a compressed graph by knowledge distillation from the original.

``finetune(student, teacher, data)`` trains the student's weights so that its outputs match
the teacher's outputs on ``data``, optionally mixed with a loss on true labels:

    result = finetune(pruned, original, {"input": images, "labels": labels},
                      FinetuneOptions(epochs=5), validation=test_split)
    recovered = result.graph          # same nodes and shapes as ``pruned``, new weights

It runs in six steps:

1. Check the options and the data: every graph input, examples along dim 0.
2. Run the teacher once on every example (and every validation example) and cache its outputs.
3. Wrap the student in a ``GraphModule`` whose trainable constants are ``nn.Parameter``s.
4. Per epoch, shuffle the graph batches with a generator seeded by ``options.seed``, and per
   batch run the student, compute the loss and take one AdamW step (cosine learning-rate
   decay to 0 over all steps).
5. After each epoch, measure the validation metrics and call ``progress``.
6. Return ``GraphModule.to_graph()``: the student's nodes, shapes and constant names, with
   the trained weights, checked by the verifier.

Batching: graph shapes are static, so the student runs only on its own batch size ``b`` (the
shared dim 0 of its inputs). A batch of ``batch_size`` examples runs as ``batch_size / b``
graph calls vectorized with ``torch.func.vmap``. Every op then gets the exact shapes the graph
was built for, so static reshape attributes stay correct and no graph is rebuilt. Rebuilding
the graph at another batch size would mean deciding, for each reshape, expand or slice
attribute, whether a number in it is the batch size or only equals it. ``batching="loop"`` makes
one graph call per ``b`` examples and accumulates gradients instead: the same loss, slower.
On the digits CNN (batch 1, one PyTorch thread, a shared 2-core Zen 3 machine), one step of 32
examples took 7.5 ms with vmap, 41 ms with the loop and 4.9 ms in the eager PyTorch module.

Batch norm stays in eval mode: its running mean and variance are buffers that never change,
and only its scale and bias train.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from graphcomp.backends.torch_export import TRAINABLE_SELECTORS, GraphModule, to_torch
from graphcomp.errors import GraphcompError, OptionError, ShapeError
from graphcomp.ir import Graph, Node, Value
from graphcomp.verifier import verify_graph

logger = logging.getLogger(__name__)

Teacher = Graph | Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]

LOSSES = ("auto", "kl", "mse")
BATCHING_MODES = ("auto", "vmap", "loop")
LABELS = "labels"
# Examples per forward pass when running the teacher or measuring validation metrics, rounded
# down to a multiple of the graph's batch size.
INFERENCE_EXAMPLES = 256
# batching="auto" runs VMAP_CHECK_CALLS graph calls both ways and uses vmap only if its outputs
# equal the one-call-at-a-time outputs within VMAP_TOLERANCE times the largest output magnitude.
VMAP_CHECK_CALLS = 4
VMAP_TOLERANCE = 1e-4
# Clamp for the log of a softmax output, so a probability of 0 gives a finite log.
MIN_PROBABILITY = 1e-12


@dataclass
class FinetuneOptions:
    """Training settings. ``alpha`` weighs the distillation loss and ``1 - alpha`` the label
    loss when the data has labels; without labels the distillation loss has weight 1.

    ``loss``: ``"kl"`` compares temperature-softened class distributions over the last dim
    (classifiers), ``"mse"`` compares outputs directly (regression, embeddings, maps) and
    ``"auto"`` picks one (see ``pick_loss``). ``trainable_constants`` is the
    ``GraphModule`` selector (``"weights"`` or ``"float"``). With ``keep_zeros``, weights that
    are exactly 0 in the student stay 0, so the sparsity that pruning left survives. That also
    freezes entries that are 0 for other reasons, such as an all-zero bias.
    ``max_steps`` caps the number of optimizer steps over all epochs.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 4.0
    alpha: float = 0.7
    loss: str = "auto"
    seed: int = 0
    weight_decay: float = 0.0
    max_steps: int | None = None
    trainable_constants: str = "weights"
    keep_zeros: bool = True
    batching: str = "auto"


@dataclass
class FinetuneResult:
    """The trained graph and the figures that training measured.

    ``history`` has one entry per epoch: ``epoch``, ``steps``, ``loss`` (mean training loss),
    ``lr`` (at the end of the epoch), ``seconds``, and the validation metrics when validation
    data is given (see ``_split_metrics``). ``initial`` contains the student's validation metrics
    before training and ``teacher`` the teacher's, against labels.
    """

    graph: Graph
    history: list[dict] = field(default_factory=list)
    loss: str = ""
    batching: str = ""
    seconds: float = 0.0
    initial: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)


@dataclass
class _Split:
    """Examples along dim 0: graph inputs by name, optional labels and the teacher's outputs."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    targets: list[np.ndarray]

    @property
    def count(self) -> int:
        return len(next(iter(self.inputs.values())))


# --- public API -------------------------------------------------------------------------------


def finetune(
    student: Graph,
    teacher: Teacher,
    data: Mapping[str, np.ndarray],
    options: FinetuneOptions | None = None,
    progress: Callable[[dict], None] | None = None,
    validation: Mapping[str, np.ndarray] | None = None,
) -> FinetuneResult:
    """Train ``student``'s weights to reproduce ``teacher``'s outputs on ``data``.

    ``teacher`` is a graph with the student's inputs and output shapes (its own batch size may
    differ), or a function that takes feeds shaped like the student's graph inputs and returns
    the outputs in the student's output order. ``data`` and ``validation`` map each graph
    input name to an array of N examples along dim 0 (N a multiple of the graph's batch size)
    and may hold ``"labels"``: class ids with the first output's shape less its last dim, or
    regression targets with the first output's shape. Raises OptionError for invalid options
    and ShapeError for data that does not fit the graphs.
    """
    options = options or FinetuneOptions()
    check_options(options)
    start = time.perf_counter()
    graph_batch = _graph_batch(student)
    _check_batch_size(options, graph_batch, student)

    train = _load_split(student, teacher, data, "data")
    held_out = None
    if validation is not None:
        held_out = _load_split(student, teacher, validation, "validation")
    objective = _Objective.create(student, train, options)
    module = to_torch(student, trainable_constants=options.trainable_constants)
    use_vmap = _choose_batching(module, train.inputs, graph_batch, options.batching)
    trainer = _Trainer(module, objective, options, graph_batch, use_vmap, train.count)

    result = FinetuneResult(student, loss=objective.kind,
                            batching="vmap" if use_vmap else "loop")
    if held_out is not None:
        result.initial = trainer.metrics(held_out)
        result.teacher = _label_metrics([torch.from_numpy(a) for a in held_out.targets],
                                        held_out.labels, objective)
        logger.info("before fine-tuning: %s", _format(result.initial))
        if result.teacher:
            logger.info("teacher: %s", _format(result.teacher))
    _train(trainer, train, held_out, options, progress, result.history)

    result.graph = module.to_graph()
    verify_graph(result.graph)
    result.seconds = time.perf_counter() - start
    logger.info("fine-tuned graph '%s' in %.1f s", student.name, result.seconds)
    return result


def check_options(options: FinetuneOptions) -> None:
    """Raise OptionError naming the first invalid field of ``options``."""
    checks = [
        ("epochs", _is_int(options.epochs) and options.epochs >= 1, "an integer >= 1"),
        ("lr", _is_real(options.lr) and options.lr > 0, "a finite number > 0"),
        ("batch_size", _is_int(options.batch_size) and options.batch_size >= 1,
         "an integer >= 1"),
        ("temperature", _is_real(options.temperature) and options.temperature > 0,
         "a finite number > 0"),
        ("alpha", _is_real(options.alpha) and 0 <= options.alpha <= 1,
         "a number from 0 to 1"),
        ("loss", options.loss in LOSSES, f"one of {list(LOSSES)}"),
        ("seed", _is_int(options.seed) and options.seed >= 0, "an integer >= 0"),
        ("weight_decay", _is_real(options.weight_decay) and options.weight_decay >= 0,
         "a finite number >= 0"),
        ("max_steps", options.max_steps is None
         or (_is_int(options.max_steps) and options.max_steps >= 1), "None or an integer >= 1"),
        ("trainable_constants", options.trainable_constants in TRAINABLE_SELECTORS,
         f"one of {list(TRAINABLE_SELECTORS)}"),
        ("keep_zeros", isinstance(options.keep_zeros, bool), "True or False"),
        ("batching", options.batching in BATCHING_MODES, f"one of {list(BATCHING_MODES)}"),
    ]
    for name, valid, expected in checks:
        if not valid:
            raise OptionError(
                f"invalid fine-tuning option {name}={getattr(options, name)!r}: expected "
                f"{expected}"
            )


def pick_loss(student: Graph, labels: np.ndarray | None, requested: str = "auto") -> str:
    """Return the loss that ``requested`` means for ``student``: ``"kl"`` or ``"mse"``.

    ``"auto"`` picks ``"kl"`` when the labels are integer class ids, or when no labels are
    given and every graph output is class scores: a rank-2 output with at least 2 classes made
    by a linear node, or any output of a softmax over its last dim. Identity nodes between
    that node and the output do not count. Otherwise it picks ``"mse"``.
    """
    if requested != "auto":
        return requested
    if labels is not None:
        return "kl" if np.issubdtype(labels.dtype, np.integer) else "mse"
    producers = student.producers()
    for output in student.outputs:
        node = _source_node(producers, output)
        if node is None:
            return "mse"
        logits = node.op == "linear" and output.rank == 2 and output.shape[1] >= 2
        if not logits and not _is_softmax_output(node, output):
            return "mse"
    return "kl"


# --- data -------------------------------------------------------------------------------------


def _graph_batch(graph: Graph) -> int:
    """Return the batch size of ``graph``: dim 0, shared by every graph input and output."""
    values = [*graph.inputs, *graph.outputs]
    if not graph.inputs or any(value.rank == 0 for value in values):
        raise ShapeError(
            f"graph '{graph.name}': fine-tuning needs graph inputs and outputs whose dim 0 is "
            "the batch dim, but some have rank 0 or the graph has no inputs"
        )
    batch = graph.inputs[0].shape[0]
    differing = [f"'{v.name}' {v.shape}" for v in values if v.shape[0] != batch]
    if differing:
        raise ShapeError(
            f"graph '{graph.name}': dim 0 is the batch dim, so every graph input and output "
            f"needs dim 0 = {batch} like input '{graph.inputs[0].name}', but "
            f"{', '.join(differing)} differ"
        )
    return batch


def _check_batch_size(options: FinetuneOptions, graph_batch: int, graph: Graph) -> None:
    if options.batch_size % graph_batch:
        raise OptionError(
            f"batch_size {options.batch_size} is not a multiple of the batch size "
            f"{graph_batch} of graph '{graph.name}'; use a multiple of {graph_batch}"
        )


def _examples(graph: Graph, data: Mapping[str, np.ndarray],
              data_name: str) -> dict[str, np.ndarray]:
    """Check ``data`` against ``graph``'s inputs; return the inputs in the graph's dtypes."""
    if not isinstance(data, Mapping):
        raise ShapeError(
            f"{data_name} must map input names to arrays, got {type(data).__name__}"
        )
    expected = [value.name for value in graph.inputs]
    missing = [name for name in expected if name not in data]
    extra = [name for name in data if name not in expected and name != LABELS]
    if missing or extra:
        raise ShapeError(
            f"{data_name} does not fit graph '{graph.name}': it needs arrays named {expected} "
            f"(and optionally '{LABELS}'); missing {missing}, unexpected {extra}"
        )
    batch = _graph_batch(graph)
    arrays = {value.name: _input_array(graph, value, data[value.name], data_name)
              for value in graph.inputs}
    counts = {name: len(array) for name, array in arrays.items()}
    if LABELS in data:
        counts[LABELS] = len(np.asarray(data[LABELS]))
    if len(set(counts.values())) != 1:
        raise ShapeError(f"{data_name} arrays hold different numbers of examples: {counts}")
    count = next(iter(counts.values()))
    if count == 0 or count % batch:
        raise ShapeError(
            f"{data_name} contains {count} examples, but graph '{graph.name}' runs {batch} at a "
            f"time: pass a non-zero multiple of {batch} examples"
        )
    return arrays


def _input_array(graph: Graph, value: Value, data, data_name: str) -> np.ndarray:
    array = np.asarray(data)
    if array.ndim != value.rank or array.shape[1:] != value.shape[1:]:
        raise ShapeError(
            f"{data_name}['{value.name}'] has shape {array.shape}, but graph '{graph.name}' "
            f"expects examples of shape {value.shape[1:]} along dim 0, as in "
            f"(N,) + {value.shape[1:]}"
        )
    if not np.can_cast(array.dtype, value.dtype, "same_kind"):
        raise ShapeError(
            f"{data_name}['{value.name}'] has dtype {array.dtype}, but graph '{graph.name}' "
            f"expects {value.dtype}"
        )
    return np.ascontiguousarray(array, dtype=value.dtype)


def _load_split(student: Graph, teacher: Teacher, data, data_name: str) -> _Split:
    """Check ``data`` and compute the teacher's outputs for every example."""
    inputs = _examples(student, data, data_name)
    labels = None if data.get(LABELS) is None else np.asarray(data[LABELS])
    if labels is not None and np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64, copy=False)  # cross_entropy takes int64 class ids
    start = time.perf_counter()
    if isinstance(teacher, Graph):
        targets = _graph_outputs(teacher, _examples(teacher, data, f"{data_name} (teacher)"))
    elif callable(teacher):
        targets = _callable_outputs(teacher, student, inputs)
    else:
        raise OptionError(
            f"teacher must be a Graph or a function of feeds, got {type(teacher).__name__}"
        )
    _check_targets(student, targets, data_name)
    split = _Split(inputs, labels, targets)
    logger.info("computed the teacher's outputs for %d examples of %s in %.2f s", split.count,
                data_name, time.perf_counter() - start)
    return split


def _graph_outputs(graph: Graph, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``graph`` on every example; return its outputs with examples along dim 0."""
    module = to_torch(graph, trainable=False)
    batch = _graph_batch(graph)
    use_vmap = _choose_batching(module, inputs, batch, "auto")
    size = _inference_size(batch, use_vmap)
    return [t.numpy() for t in _run_all(module, inputs, batch, use_vmap, size)]


def _callable_outputs(teacher, student: Graph, inputs: dict[str, np.ndarray]) -> list:
    batch = _graph_batch(student)
    count = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    for begin in range(0, count, batch):
        feeds = {name: array[begin:begin + batch] for name, array in inputs.items()}
        outputs = teacher(feeds)
        if isinstance(outputs, np.ndarray) or not isinstance(outputs, Sequence):
            outputs = [outputs]
        chunks.append([np.asarray(output) for output in outputs])
        _check_call_outputs(student, chunks[-1])
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _check_call_outputs(student: Graph, outputs: list[np.ndarray]) -> None:
    expected = [value.shape for value in student.outputs]
    shapes = [output.shape for output in outputs]
    if shapes != expected:
        raise ShapeError(
            f"the teacher function returned outputs of shapes {shapes}, but the student graph "
            f"'{student.name}' has outputs of shapes {expected}; return one array per student "
            "output, in the student's output order"
        )


def _check_targets(student: Graph, targets: list[np.ndarray], data_name: str) -> None:
    per_example = [value.shape[1:] for value in student.outputs]
    shapes = [target.shape[1:] for target in targets]
    if shapes != per_example:
        raise ShapeError(
            f"{data_name}: the teacher's outputs have example shapes {shapes}, but the student "
            f"graph '{student.name}' has {per_example}"
        )
    for value, target in zip(student.outputs, targets):
        if not np.issubdtype(np.dtype(value.dtype), np.floating):
            raise ShapeError(
                f"output '{value.name}' of graph '{student.name}' has dtype {value.dtype}; "
                "distillation needs float outputs"
            )
        if not np.isfinite(target).all():
            raise GraphcompError(
                f"{data_name}: the teacher's output '{value.name}' contains NaN or infinite "
                "values; check the teacher and the data"
            )
    for index, target in enumerate(targets):
        targets[index] = target.astype(student.outputs[index].dtype, copy=False)


# --- running the graph on many examples -------------------------------------------------------


def _forward(module: GraphModule, inputs: list[torch.Tensor], batch: int,
             use_vmap: bool) -> list[torch.Tensor]:
    """Run ``module`` on n examples along dim 0, n a multiple of the graph batch ``batch``."""
    count = inputs[0].shape[0]
    if count == batch:
        outputs = module(*inputs)
    elif use_vmap:
        calls = count // batch
        grouped = [tensor.reshape(calls, batch, *tensor.shape[1:]) for tensor in inputs]
        outputs = torch.func.vmap(module)(*grouped)
        outputs = tuple(o.reshape(count, *o.shape[2:]) for o in _as_tuple(outputs))
    else:
        parts = [_as_tuple(module(*(t[i:i + batch] for t in inputs)))
                 for i in range(0, count, batch)]
        outputs = tuple(torch.cat(tensors) for tensors in zip(*parts))
    return list(_as_tuple(outputs))


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _run_all(module: GraphModule, inputs: dict[str, np.ndarray], batch: int, use_vmap: bool,
             size: int) -> list[torch.Tensor]:
    """Run ``module`` without gradients on every example, ``size`` examples at a time."""
    names = [value.name for value in module.graph.inputs]
    count = len(inputs[names[0]])
    parts = []
    with torch.no_grad():
        for begin in range(0, count, size):
            tensors = [torch.from_numpy(inputs[name][begin:begin + size]) for name in names]
            parts.append(_forward(module, tensors, batch, use_vmap))
    return [torch.cat(tensors) for tensors in zip(*parts)]


def _inference_size(batch: int, use_vmap: bool) -> int:
    """Return how many examples to run per forward pass without gradients."""
    return max(batch, INFERENCE_EXAMPLES // batch * batch) if use_vmap else batch


def _choose_batching(module: GraphModule, inputs: dict[str, np.ndarray], batch: int,
                     mode: str) -> bool:
    """Return whether to batch graph calls with vmap. ``"auto"`` checks on the first
    ``VMAP_CHECK_CALLS`` graph batches that vmap runs and gives the outputs of one call at a
    time; if not, it logs a warning and picks the loop."""
    if mode != "auto":
        return mode == "vmap"
    names = [value.name for value in module.graph.inputs]
    size = min(len(inputs[names[0]]), VMAP_CHECK_CALLS * batch)
    if size == batch:
        return False
    sample = {name: inputs[name][:size] for name in names}
    looped = _run_all(module, sample, batch, False, size)
    try:
        vectorized = _run_all(module, sample, batch, True, size)
    except (GraphcompError, RuntimeError, NotImplementedError, ValueError) as exc:
        logger.warning("graph '%s' does not run under torch.func.vmap (%s); its graph calls "
                       "run one at a time, which is slower", module.graph.name, exc)
        return False
    for expected, actual in zip(looped, vectorized):
        if expected.numel() == 0:
            continue
        scale = 1.0 + float(expected.abs().max())
        # Written as "not <=" so that a NaN difference also rejects vmap.
        if not float((expected - actual).abs().max()) <= VMAP_TOLERANCE * scale:
            logger.warning("graph '%s' gives different outputs under torch.func.vmap; its "
                           "graph calls run one at a time, which is slower", module.graph.name)
            return False
    return True


# --- losses and metrics -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Objective:
    """The training loss: distillation against the teacher, plus labels when given."""

    kind: str
    temperature: float
    distill_weight: float
    label_weight: float
    probabilities: tuple[bool, ...]  # per output: whether a softmax made it

    @classmethod
    def create(cls, student: Graph, split: _Split, options: FinetuneOptions) -> "_Objective":
        kind = pick_loss(student, split.labels, options.loss)
        if split.labels is not None:
            _check_labels(student, split.labels, kind)
        use_labels = split.labels is not None and options.alpha < 1
        if options.alpha == 0 and split.labels is None:
            raise OptionError(
                "alpha=0 trains on labels only, but the data has no 'labels'; pass labels or "
                "raise alpha"
            )
        producers = student.producers()
        probabilities = tuple(
            kind == "kl" and _is_softmax_output(_source_node(producers, output), output)
            for output in student.outputs
        )
        logger.info("fine-tuning loss: %s%s", kind,
                    f" with labels (alpha={options.alpha})" if use_labels else "")
        return cls(kind, float(options.temperature),
                   float(options.alpha) if use_labels else 1.0,
                   1.0 - float(options.alpha) if use_labels else 0.0, probabilities)

    def scores(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Return class scores over the last dim: log-probabilities for a softmax output."""
        if self.probabilities[index]:
            return output.clamp_min(MIN_PROBABILITY).log()
        return output

    def distill(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Return the mean distillation loss over the outputs, averaged over examples."""
        losses = []
        for index, (output, target) in enumerate(zip(outputs, targets)):
            if self.kind == "mse":
                losses.append(F.mse_loss(output, target))
                continue
            classes = output.shape[-1]
            student = self.scores(index, output).reshape(-1, classes) / self.temperature
            teacher = self.scores(index, target).reshape(-1, classes) / self.temperature
            divergence = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1),
                                  reduction="batchmean", log_target=True)
            # The gradients of softened distributions scale as 1 / T^2, so multiplying by T^2
            # keeps their size, and the balance with the label loss, independent of T.
            losses.append(divergence * self.temperature ** 2)
        return torch.stack(losses).mean()

    def labelled(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Return the loss of the first output against the labels."""
        if self.kind == "mse":
            return F.mse_loss(outputs[0], labels.to(outputs[0].dtype))
        classes = outputs[0].shape[-1]
        scores = self.scores(0, outputs[0]).reshape(-1, classes)
        return F.cross_entropy(scores, labels.reshape(-1))

    def loss(self, outputs, targets, labels: torch.Tensor | None) -> torch.Tensor:
        total = self.distill_weight * self.distill(outputs, targets)
        if self.label_weight and labels is not None:
            total = total + self.label_weight * self.labelled(outputs, labels)
        return total


def _source_node(producers: dict[Value, Node], output: Value) -> Node | None:
    """Return the node that computes ``output``, looking through identity nodes."""
    node = producers.get(output)
    while node is not None and node.op == "identity":
        node = producers.get(node.inputs[0])
    return node


def _is_softmax_output(node: Node | None, output: Value) -> bool:
    if node is None or node.op != "softmax":
        return False
    return node.attrs.get("axis", -1) % output.rank == output.rank - 1


def _check_labels(student: Graph, labels: np.ndarray, kind: str) -> None:
    output = student.outputs[0]
    if kind == "kl":
        expected = output.shape[1:-1]
        if not np.issubdtype(labels.dtype, np.integer):
            raise ShapeError(
                f"labels have dtype {labels.dtype}, but the kl loss needs integer class ids"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= output.shape[-1]):
            raise ShapeError(
                f"labels range from {labels.min()} to {labels.max()}, but output "
                f"'{output.name}' scores {output.shape[-1]} classes"
            )
    else:
        expected = output.shape[1:]
    if labels.shape[1:] != expected:
        raise ShapeError(
            f"labels have shape {labels.shape}, but the {kind} loss on output '{output.name}' "
            f"{output.shape} needs (N,) + {expected}"
        )


def _label_metrics(outputs: list[torch.Tensor], labels: np.ndarray | None,
                   objective: _Objective) -> dict:
    """Return ``val_accuracy`` (kl) or ``val_label_mse`` (mse) of the first output."""
    if labels is None:
        return {}
    if objective.kind == "kl":
        predicted = outputs[0].argmax(dim=-1).numpy()
        return {"val_accuracy": float((predicted == labels).mean())}
    error = (outputs[0].numpy() - labels.astype(np.float64)) ** 2
    return {"val_label_mse": float(error.mean())}


def _split_metrics(outputs: list[torch.Tensor], split: _Split, objective: _Objective) -> dict:
    """Return the validation metrics: ``val_loss`` (distillation loss against the teacher),
    then ``val_agreement`` (share of equal top-1 classes, kl) or ``val_mse`` (mse), then the
    label metrics."""
    targets = [torch.from_numpy(target) for target in split.targets]
    metrics = {"val_loss": float(objective.distill(outputs, targets))}
    if objective.kind == "kl":
        same = outputs[0].argmax(dim=-1) == targets[0].argmax(dim=-1)
        metrics["val_agreement"] = float(same.double().mean())
    else:
        errors = [F.mse_loss(o.double(), t.double()) for o, t in zip(outputs, targets)]
        metrics["val_mse"] = float(torch.stack(errors).mean())
    metrics.update(_label_metrics(outputs, split.labels, objective))
    return metrics


def _format(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()) or "no metrics"


# --- training ---------------------------------------------------------------------------------


class _Trainer:
    """The student module, its optimizer and learning-rate schedule, and the zero masks."""

    def __init__(self, module: GraphModule, objective: _Objective, options: FinetuneOptions,
                 graph_batch: int, use_vmap: bool, examples: int):
        self.module = module
        self.objective = objective
        self.graph_batch = graph_batch
        self.use_vmap = use_vmap
        # In loop mode each chunk is one graph call and gradients accumulate over the batch.
        self.chunk = options.batch_size if use_vmap else graph_batch
        self.names = [value.name for value in module.graph.inputs]
        parameters = [p for p in module.parameters() if p.requires_grad]
        if not parameters:
            raise OptionError(
                f"graph '{module.graph.name}' has no trainable constants with "
                f"trainable_constants={options.trainable_constants!r}; try 'float'"
            )
        self.masks = _zero_masks(module) if options.keep_zeros else {}
        self.optimizer = torch.optim.AdamW(parameters, lr=options.lr,
                                           weight_decay=options.weight_decay)
        steps_per_epoch = math.ceil(examples / options.batch_size)
        self.total_steps = options.epochs * steps_per_epoch
        if options.max_steps is not None:
            self.total_steps = min(self.total_steps, options.max_steps)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                   self.total_steps)
        self.steps = 0

    def step(self, split: _Split, indices: np.ndarray) -> float:
        """Take one optimizer step on the examples at ``indices``; return the batch loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for begin in range(0, len(indices), self.chunk):
            part = indices[begin:begin + self.chunk]
            inputs = [torch.from_numpy(split.inputs[name][part]) for name in self.names]
            targets = [torch.from_numpy(target[part]) for target in split.targets]
            labels = None if split.labels is None else torch.from_numpy(split.labels[part])
            outputs = _forward(self.module, inputs, self.graph_batch, self.use_vmap)
            # Each chunk loss is a mean over its examples; weighting by the chunk's share
            # makes the accumulated gradient that of the mean over the whole batch.
            loss = self.objective.loss(outputs, targets, labels) * (len(part) / len(indices))
            loss.backward()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise GraphcompError(
                f"the fine-tuning loss became {total} at step {self.steps + 1}; lower lr "
                "or check the data for extreme values"
            )
        self.optimizer.step()
        self.schedule.step()
        self._apply_masks()
        self.steps += 1
        return total

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for parameter, mask in self.masks.items():
                parameter.mul_(mask)

    def metrics(self, split: _Split) -> dict:
        size = _inference_size(self.graph_batch, self.use_vmap)
        outputs = _run_all(self.module, split.inputs, self.graph_batch, self.use_vmap, size)
        return _split_metrics(outputs, split, self.objective)


def _zero_masks(module: GraphModule) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Return, for each trainable parameter that contains zeros, a mask that keeps them zero."""
    masks = {}
    for name, parameter in module.named_parameters():
        zeros = parameter.detach() == 0
        if parameter.requires_grad and bool(zeros.any()):
            masks[parameter] = (~zeros).to(parameter.dtype)
            logger.debug("keeping %d zero entries of '%s' at zero", int(zeros.sum()),
                         module.constant_names[name])
    return masks


def _train(trainer: _Trainer, train: _Split, validation: _Split | None,
           options: FinetuneOptions, progress, history: list[dict]) -> None:
    """Run the epochs, appending one history entry per epoch and reporting it to
    ``progress``."""
    generator = np.random.default_rng(options.seed)
    for epoch in range(1, options.epochs + 1):
        if trainer.steps >= trainer.total_steps:
            break
        start = time.perf_counter()
        order = _shuffled(generator, train.count, trainer.graph_batch)
        total, seen, steps = 0.0, 0, 0
        for begin in range(0, train.count, options.batch_size):
            if trainer.steps >= trainer.total_steps:
                break
            indices = order[begin:begin + options.batch_size]
            total += trainer.step(train, indices) * len(indices)
            seen += len(indices)
            steps += 1
        entry = {"epoch": epoch, "epochs": options.epochs, "steps": steps,
                 "loss": total / seen, "lr": trainer.schedule.get_last_lr()[0]}
        if validation is not None:
            entry.update(trainer.metrics(validation))
        entry["seconds"] = time.perf_counter() - start
        history.append(entry)
        logger.info("epoch %d/%d: %s", epoch, options.epochs,
                    _format({k: v for k, v in entry.items() if k not in ("epoch", "epochs")}))
        if progress is not None:
            progress(dict(entry))


def _shuffled(generator: np.random.Generator, count: int, graph_batch: int) -> np.ndarray:
    """Return the example indices with whole graph batches shuffled. Each graph call then gets
    the same examples together as when the teacher ran, which matters for graphs that mix
    examples along dim 0."""
    calls = generator.permutation(count // graph_batch)
    return (calls[:, None] * graph_batch + np.arange(graph_batch)).reshape(-1)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(value))
