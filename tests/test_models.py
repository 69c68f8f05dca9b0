"""Real PyTorch models through the PyTorch frontend: the trained digits CNN and
all-MiniLM-L6-v2, each compared with the PyTorch module on real data.

Tolerances: digits logits to 1e-5 absolute on the whole test split, and the same accuracy.
MiniLM embeddings (unit length) to 1e-4 absolute and cosine similarity >= 0.99999 per sentence.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from graphcomp import executor
from graphcomp.errors import OptionError
from graphcomp.frontends.torch_frontend import import_torch, load_pt2
from graphcomp.models import (
    DIGITS_PROGRAM, digits_cnn, digits_data, minilm, minilm_inputs, minilm_sentences,
)

pytestmark = pytest.mark.slow


# --- digits CNN -------------------------------------------------------------------------------


def test_digits_data_is_the_held_out_split():
    data = digits_data()
    assert data["input"].shape == (360, 1, 8, 8)
    assert data["input"].dtype == np.float32
    assert data["labels"].dtype == np.int64
    assert data["input"].min() >= 0.0
    assert data["input"].max() <= 1.0
    assert set(np.unique(data["labels"])) == set(range(10))


def test_digits_cnn_graph_matches_module_on_test_split():
    model, (example,) = digits_cnn()
    assert not model.training
    assert example.shape == (1, 1, 8, 8)
    data = digits_data()
    images = torch.from_numpy(data["input"])

    start = time.perf_counter()
    graph = import_torch(model, (images,), name="digits_cnn")
    import_seconds = time.perf_counter() - start
    logits = executor.run(graph, {"input": data["input"]})["output"]
    with torch.no_grad():
        expected = model(images).numpy()

    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    graph_accuracy = float((logits.argmax(1) == data["labels"]).mean())
    module_accuracy = float((expected.argmax(1) == data["labels"]).mean())
    assert graph_accuracy == module_accuracy
    assert module_accuracy >= 0.97  # the committed weights reach 0.9917
    assert [node.op for node in graph.nodes] == [
        "conv2d", "batch_norm", "relu", "conv2d", "batch_norm", "relu", "max_pool2d",
        "reshape", "linear", "relu", "linear",
    ]
    assert [value.name for value in graph.inputs] == ["input"]
    assert import_seconds < 30


def test_digits_pt2_file_matches_module():
    model, _ = digits_cnn()
    graph = import_torch(load_pt2(DIGITS_PROGRAM), name="digits_cnn")
    image = digits_data()["input"][5:6]
    result = executor.run(graph, {"input": image})["output"]
    with torch.no_grad():
        expected = model(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------

SEQ_LEN = 32
BATCH = 8


@pytest.fixture(scope="module")
def minilm_graph():
    model, inputs = minilm(seq_len=SEQ_LEN, batch=BATCH)
    start = time.perf_counter()
    graph = import_torch(model, inputs, name="minilm")
    return model, graph, time.perf_counter() - start


def test_minilm_sentences_and_inputs():
    sentences = minilm_sentences()
    assert len(sentences) >= 24
    ids, mask = minilm_inputs(sentences[:3], SEQ_LEN)
    assert ids.shape == mask.shape == (3, SEQ_LEN)
    assert ids.dtype == mask.dtype == torch.int64
    assert int(ids[0, 0]) == 101  # [CLS]
    assert 0 < int(mask[0].sum()) < SEQ_LEN  # a short sentence is padded


def test_minilm_embeddings_match_module(minilm_graph):
    model, graph, import_seconds = minilm_graph
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    assert graph.outputs[0].shape == (BATCH, 384)
    sentences = minilm_sentences()
    # Sentences other than the export's examples, so the padding differs from the export's.
    for start in range(8, len(sentences), BATCH):
        chunk = (sentences[start:] + sentences)[:BATCH]
        ids, mask = minilm_inputs(chunk, SEQ_LEN)
        result = executor.run(graph, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        embeddings = result["output"]
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        assert np.abs(embeddings - expected).max() <= 1e-4
        cosine = (embeddings * expected).sum(1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(expected, axis=1))
        assert cosine.min() >= 0.99999
    assert import_seconds < 60


def test_minilm_mask_logic_is_in_the_graph(minilm_graph):
    """Masking one more token must change the embedding as it changes the module's."""
    model, graph, _ = minilm_graph
    ids, mask = minilm_inputs(minilm_sentences()[:BATCH], SEQ_LEN)
    shorter = mask.clone()
    last = int(shorter[0].sum()) - 2
    shorter[0, last] = 0  # drop the last word piece before [SEP] from the first sentence
    feeds = {"input_ids": ids.numpy()}
    full = executor.run(graph, {**feeds, "attention_mask": mask.numpy()})["output"]
    masked = executor.run(graph, {**feeds, "attention_mask": shorter.numpy()})["output"]
    with torch.no_grad():
        expected = model(ids, shorter).numpy()
    assert np.abs(full[0] - masked[0]).max() > 1e-3
    assert np.abs(masked - expected).max() <= 1e-4
    readers = graph.consumers()[graph.inputs[1]]
    assert readers


def test_minilm_rejects_bad_seq_len():
    with pytest.raises(OptionError, match="seq_len must be between 2"):
        minilm_inputs(["hello"], 1)
    with pytest.raises(OptionError, match="seq_len must be between 2"):
        minilm(seq_len=1000)
