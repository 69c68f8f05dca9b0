"""graphcomp.finetune: knowledge-distillation recovery of a damaged graph against its original.

Students are teachers with damaged weights (noise, or zeroed channels as 50% channel pruning
leaves them). Every accuracy and error figure is measured on the returned graph with the
reference executor, on examples that training did not see.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from graphcomp import executor
from graphcomp.backends.torch_export import to_torch
from graphcomp.errors import OptionError, ShapeError
from graphcomp.finetune import FinetuneOptions, check_options, finetune, pick_loss
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.serialize import format_graph
from graphcomp.shapes import infer_shapes
from graphcomp.verifier import verify_graph


@pytest.fixture(autouse=True)
def one_thread():
    """Run PyTorch on one thread. On a 2-core machine shared with other processes, two
    intra-op threads made these small models 4 to 50 times slower, and their timing erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def build(name: str, inputs: list[Value], nodes: list[Node]) -> Graph:
    graph = Graph(name, inputs, [nodes[-1].outputs[0]], nodes)
    infer_shapes(graph)
    verify_graph(graph)
    return graph


def map_net(seed: int = 0) -> Graph:
    """A small dense-prediction graph with batch 2; its output is a map, so "auto" picks mse.

        x[2,3,6,6] -> conv2d 3x3 (3->8) -> relu -> conv2d 1x1 (8->2) -> y[2,2,6,6]
    """
    rng = np.random.default_rng(seed)
    x = Value("x", (2, 3, 6, 6))
    hidden, relu_out, y = Value("hidden", ()), Value("relu_out", ()), Value("y", ())
    conv_attrs = {"pads": [1, 1, 1, 1]}
    nodes = [
        Node("conv1", "conv2d", [x, Constant("conv1.weight", normal(rng, 8, 3, 3, 3, scale=0.3)),
                                 Constant("conv1.bias", normal(rng, 8, scale=0.1))],
             [hidden], conv_attrs),
        Node("relu", "relu", [hidden], [relu_out]),
        Node("conv2", "conv2d", [relu_out, Constant("conv2.weight", normal(rng, 2, 8, 1, 1)),
                                 Constant("conv2.bias", normal(rng, 2, scale=0.1))], [y]),
    ]
    return build("map_net", [x], nodes)


def small_classifier(seed: int = 0) -> Graph:
    """A classifier with batch norm and a linear head, batch 1 (like the digits CNN).

        x[1,3,6,6] -> conv2d 3x3 (3->6) -> batch_norm -> relu -> reshape [1,216]
                   -> linear (216->4) -> logits[1,4]
    """
    rng = np.random.default_rng(seed)
    x = Value("x", (1, 3, 6, 6))
    conv_out, bn_out, relu_out = Value("conv_out", ()), Value("bn_out", ()), Value("relu_out", ())
    flat, logits = Value("flat", ()), Value("logits", ())
    bn_inputs = [
        Constant("bn.weight", 1 + normal(rng, 6, scale=0.1)),
        Constant("bn.bias", normal(rng, 6, scale=0.1)),
        Constant("bn.running_mean", normal(rng, 6, scale=0.1)),
        Constant("bn.running_var", 1 + np.abs(normal(rng, 6, scale=0.1))),
    ]
    nodes = [
        Node("conv", "conv2d", [x, Constant("conv.weight", normal(rng, 6, 3, 3, 3, scale=0.3))],
             [conv_out], {"pads": [1, 1, 1, 1]}),
        Node("bn", "batch_norm", [conv_out, *bn_inputs], [bn_out]),
        Node("relu", "relu", [bn_out], [relu_out]),
        Node("flatten", "reshape", [relu_out], [flat], {"shape": [1, 216]}),
        Node("fc", "linear", [flat, Constant("fc.weight", normal(rng, 4, 216, scale=0.2)),
                              Constant("fc.bias", normal(rng, 4, scale=0.1))], [logits]),
    ]
    return build("small_classifier", [x], nodes)


def matmul_net(seed: int = 0) -> Graph:
    """x[1,8] -> matmul with a constant [8,3] (a weight that is not a parameter by default)."""
    rng = np.random.default_rng(seed)
    x, y = Value("x", (1, 8)), Value("y", ())
    node = Node("mm", "matmul", [x, Constant("mm.weight", normal(rng, 8, 3))], [y])
    return build("matmul_net", [x], [node])


def batch_mixing_net(seed: int = 0) -> Graph:
    """A graph with batch 2 whose outputs mix both examples, so each output depends on which
    two examples share a graph call.

        x[2,3] -> transpose [3,2] -> linear (2->2) -> transpose -> y[2,3]
    """
    rng = np.random.default_rng(seed)
    x = Value("x", (2, 3))
    swapped, mixed, y = Value("swapped", ()), Value("mixed", ()), Value("y", ())
    nodes = [
        Node("swap", "transpose", [x], [swapped], {"perm": [1, 0]}),
        Node("mix", "linear", [swapped, Constant("mix.weight", normal(rng, 2, 2))], [mixed]),
        Node("swap_back", "transpose", [mixed], [y], {"perm": [1, 0]}),
    ]
    return build("batch_mixing_net", [x], nodes)


def with_noise(graph: Graph, scale: float, seed: int = 1) -> Graph:
    """Copy ``graph`` and add noise of ``scale`` times each weight's spread to every conv and
    linear weight and bias."""
    rng = np.random.default_rng(seed)
    damaged = graph.copy()
    for node in damaged.nodes:
        if node.op not in ("conv2d", "linear", "matmul"):
            continue
        for index, value in enumerate(node.inputs[1:], start=1):
            spread = float(value.data.std()) or 0.1
            noisy = value.data + normal(rng, *value.shape, scale=scale * spread)
            node.inputs[index] = Constant(value.name, noisy)
    return damaged


def examples(graph: Graph, count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = graph.inputs[0]
    return {value.name: normal(rng, count, *value.shape[1:])}


def run_examples(graph: Graph, data: dict[str, np.ndarray]) -> np.ndarray:
    """Run ``graph`` with the reference executor on examples along dim 0, a batch at a time."""
    value = graph.inputs[0]
    batch = value.shape[0]
    outputs = [executor.run(graph, {value.name: data[value.name][i:i + batch]})
               [graph.outputs[0].name] for i in range(0, len(data[value.name]), batch)]
    return np.concatenate(outputs)


def weights(graph: Graph) -> dict[str, np.ndarray]:
    return {const.name: const.data for const in graph.constants()}


# --- options and input checks -----------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", 2.5), ("lr", 0.0), ("lr", float("nan")), ("batch_size", 0),
    ("temperature", -1.0), ("alpha", 1.5), ("loss", "huber"), ("seed", -1),
    ("weight_decay", -0.1), ("max_steps", 0), ("trainable_constants", "all"),
    ("keep_zeros", "yes"), ("batching", "threads"), ("epochs", True),
])
def test_options_invalid_raise(field, value):
    options = FinetuneOptions(**{field: value})
    with pytest.raises(OptionError, match=f"option {field}="):
        check_options(options)
    graph = map_net()
    with pytest.raises(OptionError, match=f"option {field}="):
        finetune(graph, graph, examples(graph, 4, 0), options)


def test_options_defaults_valid():
    check_options(FinetuneOptions())


def test_batch_size_not_graph_multiple():
    graph = map_net()  # batch 2
    with pytest.raises(OptionError, match="batch_size 3 is not a multiple of the batch size 2"):
        finetune(graph, graph, examples(graph, 4, 0), FinetuneOptions(batch_size=3))


def test_alpha_zero_needs_labels():
    graph = map_net()
    with pytest.raises(OptionError, match="alpha=0 trains on labels only"):
        finetune(graph, graph, examples(graph, 4, 0), FinetuneOptions(alpha=0.0))


def test_data_missing_input():
    graph = map_net()
    with pytest.raises(ShapeError, match=r"missing \['x'\], unexpected \['image'\]"):
        finetune(graph, graph, {"image": np.zeros((4, 3, 6, 6), np.float32)})


def test_data_wrong_example_shape():
    graph = map_net()
    with pytest.raises(ShapeError, match=r"data\['x'\] has shape \(4, 3, 5, 5\)"):
        finetune(graph, graph, {"x": np.zeros((4, 3, 5, 5), np.float32)})


def test_data_count_not_batch_multiple():
    graph = map_net()
    with pytest.raises(ShapeError, match="contains 5 examples.*multiple of 2"):
        finetune(graph, graph, examples(graph, 5, 0))


def test_data_labels_count_differs():
    graph = small_classifier()
    data = {**examples(graph, 4, 0), "labels": np.zeros(3, np.int64)}
    with pytest.raises(ShapeError, match="different numbers of examples"):
        finetune(graph, graph, data)


def test_labels_out_of_range():
    graph = small_classifier()
    data = {**examples(graph, 4, 0), "labels": np.array([0, 1, 2, 4])}
    with pytest.raises(ShapeError, match="labels range from 0 to 4.*scores 4 classes"):
        finetune(graph, graph, data)


def test_validation_wrong_shape():
    graph = map_net()
    with pytest.raises(ShapeError, match=r"validation\['x'\] has shape"):
        finetune(graph, graph, examples(graph, 4, 0),
                 validation={"x": np.zeros((4, 3), np.float32)})


def test_teacher_output_shape_differs():
    student = map_net()
    teacher = map_net()
    teacher.nodes[-1].inputs[1] = Constant("conv2.weight", np.zeros((3, 8, 1, 1), np.float32))
    teacher.nodes[-1].inputs[2] = Constant("conv2.bias", np.zeros(3, np.float32))
    infer_shapes(teacher)
    with pytest.raises(ShapeError, match="teacher's outputs have example shapes"):
        finetune(student, teacher, examples(student, 4, 0))


def test_teacher_function_wrong_shape():
    graph = map_net()
    with pytest.raises(ShapeError, match="teacher function returned outputs of shapes"):
        finetune(graph, lambda feeds: [np.zeros((2, 2), np.float32)], examples(graph, 4, 0))


def test_no_trainable_constants():
    graph = matmul_net()
    with pytest.raises(OptionError, match="no trainable constants.*try 'float'"):
        finetune(graph, graph, examples(graph, 4, 0), FinetuneOptions(loss="mse"))


# --- loss choice ------------------------------------------------------------------------------


def test_pick_loss_auto():
    classifier = small_classifier()
    assert pick_loss(classifier, None) == "kl"
    assert pick_loss(map_net(), None) == "mse"
    assert pick_loss(matmul_net(), None) == "mse"
    assert pick_loss(map_net(), np.zeros(4, np.int64)) == "kl"
    assert pick_loss(classifier, np.zeros((4, 4), np.float32)) == "mse"
    assert pick_loss(classifier, None, "mse") == "mse"


def test_pick_loss_softmax_output():
    graph = small_classifier()
    probabilities = Value("probabilities", (1, 4))
    graph.nodes.append(Node("softmax", "softmax", [graph.outputs[0]], [probabilities],
                            {"axis": -1}))
    graph.outputs = [probabilities]
    verify_graph(graph)
    assert pick_loss(graph, None) == "kl"
    # An identity after the softmax, as ONNX exports often have, changes nothing.
    renamed = Value("renamed", (1, 4))
    graph.nodes.append(Node("identity", "identity", [probabilities], [renamed]))
    graph.outputs = [renamed]
    verify_graph(graph)
    assert pick_loss(graph, None) == "kl"


# --- training ---------------------------------------------------------------------------------


def test_mse_reduces_output_error():
    teacher = map_net()
    student = with_noise(teacher, 0.5)
    train, held_out = examples(teacher, 256, 10), examples(teacher, 64, 11)
    expected = run_examples(teacher, held_out)
    error_before = float(np.mean((run_examples(student, held_out) - expected) ** 2))

    result = finetune(student, teacher, train, FinetuneOptions(epochs=4, lr=1e-2, batch_size=16),
                      validation=held_out)
    error_after = float(np.mean((run_examples(result.graph, held_out) - expected) ** 2))

    assert result.loss == "mse"
    assert result.batching == "vmap"
    assert error_before > 0.05
    assert error_after < 0.1 * error_before
    # The validation metric is the same mean squared error, measured on the trained module.
    assert result.history[-1]["val_mse"] == pytest.approx(error_after, rel=1e-3)
    assert result.initial["val_mse"] == pytest.approx(error_before, rel=1e-3)


def test_result_keeps_student_structure():
    teacher = small_classifier()
    student = with_noise(teacher, 0.5)
    original = {name: data.copy() for name, data in weights(student).items()}
    result = finetune(student, teacher, examples(teacher, 64, 3),
                      FinetuneOptions(epochs=2, batch_size=8))
    verify_graph(result.graph)
    assert format_graph(result.graph) == format_graph(student)
    before, after = weights(student), weights(result.graph)
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name].shape == before[name].shape, name
        assert after[name].dtype == before[name].dtype, name
    # Batch norm runs in eval mode: its running statistics never change.
    np.testing.assert_array_equal(after["bn.running_mean"], before["bn.running_mean"])
    np.testing.assert_array_equal(after["bn.running_var"], before["bn.running_var"])
    for name in ("conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias"):
        assert not np.array_equal(after[name], before[name]), name
    # The student passed in is left as it was.
    for name, data in weights(student).items():
        np.testing.assert_array_equal(data, original[name], err_msg=name)


def test_kl_improves_agreement():
    teacher = small_classifier()
    student = with_noise(teacher, 0.7)
    held_out = examples(teacher, 128, 5)
    result = finetune(student, teacher, examples(teacher, 1024, 4),
                      FinetuneOptions(epochs=3, lr=1e-2), validation=held_out)
    expected = run_examples(teacher, held_out).argmax(-1)
    before = float(np.mean(run_examples(student, held_out).argmax(-1) == expected))
    after = float(np.mean(run_examples(result.graph, held_out).argmax(-1) == expected))
    assert result.loss == "kl"
    # Measured 0.70 -> 0.87 top-1 agreement with the teacher.
    assert after >= before + 0.1
    assert result.history[-1]["val_agreement"] == pytest.approx(after)
    assert result.history[-1]["val_loss"] < 0.5 * result.initial["val_loss"]


def test_vmap_matches_loop():
    teacher = map_net()
    student = with_noise(teacher, 0.5)
    data = examples(teacher, 32, 6)
    results = {
        mode: finetune(student, teacher, data,
                       FinetuneOptions(max_steps=3, batch_size=8, lr=1e-2, batching=mode))
        for mode in ("vmap", "loop")
    }
    assert results["vmap"].batching == "vmap"
    assert results["loop"].batching == "loop"
    vectorized, looped = weights(results["vmap"].graph), weights(results["loop"].graph)
    for name in vectorized:
        np.testing.assert_allclose(vectorized[name], looped[name], atol=1e-5, rtol=0,
                                   err_msg=name)
    assert not np.array_equal(vectorized["conv1.weight"], weights(student)["conv1.weight"])


def test_seed_makes_runs_repeatable():
    teacher = small_classifier()
    student = with_noise(teacher, 0.5)
    data = examples(teacher, 32, 7)

    def trained(seed: int) -> dict[str, np.ndarray]:
        options = FinetuneOptions(epochs=2, batch_size=8, seed=seed)
        return weights(finetune(student, teacher, data, options).graph)

    first, second, other = trained(0), trained(0), trained(1)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert not np.array_equal(first["fc.weight"], other["fc.weight"])


def test_teacher_function_matches_graph():
    teacher = map_net()
    student = with_noise(teacher, 0.5)
    data = examples(teacher, 16, 8)
    calls = []

    def teacher_function(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        calls.append(feeds["x"].shape)
        return [executor.run(teacher, feeds)["y"]]

    options = FinetuneOptions(max_steps=2, batch_size=8)
    from_function = weights(finetune(student, teacher_function, data, options).graph)
    from_graph = weights(finetune(student, teacher, data, options).graph)
    assert calls == [(2, 3, 6, 6)] * 8
    for name in from_graph:
        np.testing.assert_allclose(from_function[name], from_graph[name], atol=1e-6, rtol=0,
                                   err_msg=name)


def test_keep_zeros_preserves_sparsity():
    teacher = small_classifier()
    student = with_noise(teacher, 0.5)
    conv = student.node("conv")
    pruned = conv.inputs[1].data.copy()
    pruned[:3] = 0.0
    conv.inputs[1] = Constant("conv.weight", pruned)
    data = examples(teacher, 32, 9)
    options = FinetuneOptions(epochs=2, batch_size=8)

    kept = weights(finetune(student, teacher, data, options).graph)["conv.weight"]
    options.keep_zeros = False
    revived = weights(finetune(student, teacher, data, options).graph)["conv.weight"]
    assert np.all(kept[:3] == 0)
    assert not np.array_equal(kept[3:], pruned[3:])
    assert np.any(revived[:3] != 0)


def test_shuffle_keeps_graph_batches_together():
    # Student and teacher are equal, so the loss stays 0 only if every graph call gets the
    # same two examples as when the teacher ran. A tiny lr keeps Adam's steps on
    # float-rounding gradients from moving the weights.
    graph = batch_mixing_net()
    result = finetune(graph, graph, examples(graph, 64, 16),
                      FinetuneOptions(epochs=2, batch_size=8, lr=1e-9, loss="mse"))
    for entry in result.history:
        assert entry["loss"] < 1e-10


def test_progress_and_max_steps():
    teacher = map_net()
    student = with_noise(teacher, 0.5)
    reports = []
    result = finetune(student, teacher, examples(teacher, 32, 12),
                      FinetuneOptions(epochs=5, batch_size=8, max_steps=6),
                      progress=reports.append, validation=examples(teacher, 8, 13))
    # 32 examples in batches of 8 make 4 steps an epoch, so 6 steps end during epoch 2.
    assert [entry["steps"] for entry in result.history] == [4, 2]
    assert reports == result.history
    for key in ("epoch", "epochs", "loss", "lr", "seconds", "val_loss", "val_mse"):
        assert key in reports[0], key
    assert reports[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_trainable_float_constants():
    teacher = matmul_net()
    student = with_noise(teacher, 0.5)
    held_out = examples(teacher, 32, 15)
    result = finetune(student, teacher, examples(teacher, 128, 14),
                      FinetuneOptions(epochs=3, lr=3e-2, batch_size=16, loss="mse",
                                      trainable_constants="float"))
    expected = run_examples(teacher, held_out)
    error_before = float(np.mean((run_examples(student, held_out) - expected) ** 2))
    error_after = float(np.mean((run_examples(result.graph, held_out) - expected) ** 2))
    assert error_after < 0.1 * error_before


def test_graph_module_float_selector():
    module = to_torch(small_classifier(), trainable_constants="float")
    parameters = sorted(module.constant_names[name] for name, _ in module.named_parameters())
    buffers = sorted(module.constant_names[name] for name, _ in module.named_buffers())
    assert parameters == ["bn.bias", "bn.weight", "conv.weight", "fc.bias", "fc.weight"]
    assert buffers == ["bn.running_mean", "bn.running_var"]
    matmul = to_torch(matmul_net(), trainable_constants="float")
    assert [matmul.constant_names[n] for n, _ in matmul.named_parameters()] == ["mm.weight"]
    assert list(to_torch(matmul_net()).parameters()) == []
    with pytest.raises(OptionError, match="trainable_constants must be one of"):
        to_torch(matmul_net(), trainable_constants="all")


# --- the digits CNN ---------------------------------------------------------------------------


def prune_channels(graph: Graph, fraction: float) -> Graph:
    """Zero the ``fraction`` of each conv's output channels with the smallest L1 norm, and the
    scale and bias of the batch norm after it, so those channels output exactly 0: what
    pruning them computes, at the original shapes."""
    pruned = graph.copy()
    consumers = pruned.consumers()
    for conv in [node for node in pruned.nodes if node.op == "conv2d"]:
        weight = conv.inputs[1].data
        norms = np.abs(weight).reshape(len(weight), -1).sum(axis=1)
        dropped = np.argsort(norms)[: int(len(norms) * fraction)]
        (batch_norm,) = consumers[conv.outputs[0]]
        assert batch_norm.op == "batch_norm"
        for node, index in ((conv, 1), (batch_norm, 1), (batch_norm, 2)):
            data = node.inputs[index].data.copy()
            data[dropped] = 0.0
            node.inputs[index] = Constant(node.inputs[index].name, data)
    return pruned


def accuracy(graph: Graph, data: dict[str, np.ndarray]) -> float:
    return float(np.mean(run_examples(graph, data).argmax(-1) == data["labels"]))


@pytest.mark.slow
def test_digits_recovers_after_pruning():
    from graphcomp.frontends.torch_frontend import import_torch
    from graphcomp.models import _digits_module, digits_cnn

    model, example = digits_cnn()
    teacher = import_torch(model, example)
    train_images, train_labels, test_images, test_labels = _digits_module().load_split()
    train = {"input": train_images, "labels": train_labels}
    test = {"input": test_images, "labels": test_labels}
    student = prune_channels(teacher, 0.5)

    start = time.perf_counter()
    result = finetune(student, teacher, train, FinetuneOptions(epochs=6, lr=1e-2),
                      validation=test)
    seconds = time.perf_counter() - start

    teacher_accuracy = accuracy(teacher, test)
    damaged_accuracy = accuracy(student, test)
    recovered_accuracy = accuracy(result.graph, test)
    print(f"digits: teacher {teacher_accuracy:.4f}, pruned {damaged_accuracy:.4f}, "
          f"recovered {recovered_accuracy:.4f} in {seconds:.1f} s")
    assert teacher_accuracy > 0.97
    assert damaged_accuracy < teacher_accuracy - 0.3
    assert recovered_accuracy >= teacher_accuracy - 0.02
    assert result.teacher["val_accuracy"] == pytest.approx(teacher_accuracy)
    assert result.history[-1]["val_accuracy"] == pytest.approx(recovered_accuracy)
    # keep_zeros: the pruned channels are still exactly zero.
    conv1 = weights(result.graph)["conv1.weight"]
    assert int((np.abs(conv1).reshape(16, -1).sum(axis=1) == 0).sum()) == 8
    assert seconds < 60
