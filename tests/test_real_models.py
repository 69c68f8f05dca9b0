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
