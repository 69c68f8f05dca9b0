"""The main job end to end on the real models: import, default passes, TVM build for this CPU,
verify (artifact vs reference executor) and drift (final graph vs the original model).

With lossless passes only, both errors must stay within 1e-3 of the output scale.
"""

import json

import pytest

from graphcomp.compiler import CompileOptions, compile_model

TOLERANCE = 1e-3  # relative to the output scale (max |expected|)

pytestmark = pytest.mark.slow


def compile_zoo(name, tmp_path, **overrides):
    settings = {"samples": 1, "max_samples": 8, "benchmark_repeat": 1, **overrides}
    options = CompileOptions(**settings)
    out = tmp_path / name
    report = compile_model(f"zoo:{name}", out, options)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    return report


def check_lossless(report):
    assert report["verify"]["relative_error"] <= TOLERANCE, report["verify"]
    assert report["drift"]["relative_error"] <= TOLERANCE, report["drift"]
    assert report["drift"]["cosine"] >= 0.9999


@pytest.mark.parametrize("name", ["ppocr-cls", "ppocr-rec", "ppocr-det"])
def test_ppocr_compiles_and_matches_onnxruntime(name, tmp_path):
    report = compile_zoo(name, tmp_path)
    check_lossless(report)
    assert report["graph"]["after"]["nodes"] < report["graph"]["before"]["nodes"]
    assert report["graph"]["after"]["macs"] <= report["graph"]["before"]["macs"]
    assert "onnxruntime" in report["latency_ms"]


def test_digits_cnn_keeps_accuracy(tmp_path):
    report = compile_zoo("digits-cnn", tmp_path, max_samples=1000)
    check_lossless(report)
    drift = report["drift"]
    assert drift["accuracy"] == drift["reference_accuracy"]
    assert drift["accuracy"] >= 0.9
    assert "torch" in report["latency_ms"]


def test_minilm_embeddings_match_pytorch(tmp_path):
    report = compile_zoo("minilm", tmp_path)
    check_lossless(report)
    assert report["drift"]["cosine"] >= 0.99999


def test_digits_pruned_half_then_recovered(tmp_path):
    import numpy as np
    import torch

    from graphcomp.models import digits_data

    train = tmp_path / "train.npz"
    np.savez(train, **digits_data("train"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine train far slower
    try:
        report = compile_zoo("digits-cnn", tmp_path, max_samples=1000, recover=train,
                             passes="fold-bn,prune:ratio=0.5:criterion=l2,dce")
    finally:
        torch.set_num_threads(threads)
    before, after = report["graph"]["before"], report["graph"]["after"]
    assert after["params"] < 0.3 * before["params"]
    assert after["macs"] < 0.3 * before["macs"]
    drift = report["drift"]
    assert drift["accuracy"] >= drift["reference_accuracy"] - 0.01
    assert report["recovery"]["examples"] == 1437
    assert report["verify"]["relative_error"] <= TOLERANCE
