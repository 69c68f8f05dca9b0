"""The graphcomp command line on a small ONNX model: compile, run, inspect and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from graphcomp.cli import main
from onnx_models import conv_bn_relu_gemm, save, with_unsupported_ops


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save(conv_bn_relu_gemm(), tmp_path_factory.mktemp("model") / "small.onnx")


@pytest.fixture(scope="module")
def compiled(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8", "-o", str(out)])
    assert code == 0
    return out


def test_compile_writes_artifact_and_report(compiled):
    names = {p.name for p in compiled.iterdir()}
    assert {"report.json", "manifest.json", "weights.npz", "graph.json", "graph.txt"} <= names
    assert not [p for p in compiled.parent.iterdir() if p.name.endswith(".tmp")]


def test_compile_report_fields(compiled, model_file):
    report = json.loads((compiled / "report.json").read_text())
    assert report["model"] == str(model_file)
    assert report["target"] == "cpu"
    for side in ("before", "after"):
        assert set(report["graph"][side]) == {"nodes", "params", "macs", "bytes"}
    # The default pipeline folds the batch norm into the conv.
    assert report["graph"]["after"]["nodes"] < report["graph"]["before"]["nodes"]
    assert report["verify"]["max_abs_error"] <= 1e-5
    assert report["drift"]["max_abs_error"] <= 1e-5
    assert report["drift"]["cosine"] > 0.99999
    assert set(report["latency_ms"]) == {"onnxruntime", "graphcomp"}
    assert report["artifact"] == str(compiled)


def test_run_matches_onnxruntime(compiled, model_file, tmp_path, capsys):
    x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out_file = tmp_path / "outputs.npz"
    code = main(["run", str(compiled), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out_file)])
    assert code == 0
    assert "y: float32[1, 5]" in capsys.readouterr().out
    expected = ort.InferenceSession(str(model_file)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(out_file)["y"], expected, atol=1e-5)


def test_run_rejects_wrong_input_shape(compiled, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 9, 9), np.float32))
    code = main(["run", str(compiled), "--input", f"x={tmp_path / 'x.npy'}"])
    assert code == 2
    assert "x" in capsys.readouterr().err


def test_inspect_after_pipeline(model_file, capsys):
    code = main(["inspect", str(model_file), "--input-shape", "x=1,3,8,8",
                 "--after", "fold-bn,dce", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    before_ops = [row["op"] for row in payload["before"]]
    after_ops = [row["op"] for row in payload["after"]]
    assert "batch_norm" in before_ops
    assert "batch_norm" not in after_ops
    assert "bn" in payload["difference"]["removed"]


def test_inspect_table_has_totals(model_file, capsys):
    assert main(["inspect", str(model_file), "--input-shape", "x=1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "conv2d" in out
    assert "7 nodes" in out


# --- bad input: exit code 2, one clear message, no output folder ------------------------------


def compile_fails(args, out, capsys) -> str:
    code = main(["compile", *args, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


def test_missing_model_file(tmp_path, capsys):
    err = compile_fails([str(tmp_path / "absent.onnx")], tmp_path / "out", capsys)
    assert "absent.onnx" in err
    assert "not found" in err


def test_corrupt_model_file(tmp_path, capsys):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(os.urandom(300))
    err = compile_fails([str(path)], tmp_path / "out", capsys)
    assert "corrupt.onnx" in err


def test_unsupported_ops_listed_together(tmp_path, capsys):
    path = save(with_unsupported_ops(), tmp_path / "unsupported.onnx")
    err = compile_fails([str(path)], tmp_path / "out", capsys)
    assert "Det" in err
    assert "Hardmax" in err
    assert "det_node" in err


def test_dynamic_dims_need_input_shape(model_file, tmp_path, capsys):
    err = compile_fails([str(model_file)], tmp_path / "out", capsys)
    assert "--input-shape" in err
    assert "x" in err


def test_wrong_input_shape(model_file, tmp_path, capsys):
    err = compile_fails([str(model_file), "--input-shape", "x=1,4,8,8"], tmp_path / "out", capsys)
    assert "x" in err


def test_unknown_pass(model_file, tmp_path, capsys):
    err = compile_fails([str(model_file), "--input-shape", "x=1,3,8,8", "--passes", "fold-bm"],
                        tmp_path / "out", capsys)
    assert "fold-bm" in err
    assert "fold-bn" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder(model_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        compile_fails([str(model_file), "--input-shape", "x=1,3,8,8"], locked / "out", capsys)
    finally:
        locked.chmod(0o700)


def test_output_path_is_a_file(model_file, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8", "-o", str(target)])
    assert code == 2
    assert target.read_text() == "keep me"
    assert "not a folder" in capsys.readouterr().err


def test_output_below_a_file(model_file, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8",
                 "-o", str(blocker / "out")])
    assert code == 2
    assert "cannot write" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "graphcomp.cli", "compile", str(tmp_path / "absent.onnx"),
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "absent.onnx" in result.stderr


def test_foreign_folder_with_manifest_kept(model_file, tmp_path, capsys):
    # Another tool's folder that happens to contain a manifest.json must not be replaced.
    folder = tmp_path / "extension"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "background.js").write_text("keep me")
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8", "-o", str(folder)])
    assert code == 2
    assert (folder / "background.js").read_text() == "keep me"
    assert "not a graphcomp output" in capsys.readouterr().err


def test_current_folder_as_output_rejected(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8", "-o", "."])
    assert code == 2
    assert "current folder" in capsys.readouterr().err


def test_dump_dir_blocked_by_file(model_file, tmp_path, capsys):
    blocker = tmp_path / "dump"
    blocker.write_text("")
    err = compile_fails([str(model_file), "--input-shape", "x=1,3,8,8", "--dump-dir",
                         str(blocker)], tmp_path / "out", capsys)
    assert "--dump-dir" in err


def test_error_text_keeps_square_brackets(model_file, tmp_path, capsys):
    err = compile_fails([str(model_file)], tmp_path / "out", capsys)
    # The dynamic dims are listed as [N, 3, 8, 8]; rich markup must not swallow them.
    assert "[N, 3, 8, 8]" in err


def test_data_labels_checked(model_file, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    err = compile_fails([str(model_file), "--input-shape", "x=1,3,8,8", "--data", str(data)],
                        tmp_path / "out", capsys)
    assert "'labels' has 3 entries" in err


def test_data_accuracy_from_labels(model_file, tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, (6, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(model_file))
    labels = np.array([session.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(6)])
    labels[0] = (labels[0] + 1) % 5  # one wrong label: accuracy 5/6
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=labels)
    out = tmp_path / "out"
    code = main(["compile", str(model_file), "--input-shape", "x=1,3,8,8", "--data", str(data),
                 "-o", str(out)])
    assert code == 0
    drift = json.loads((out / "report.json").read_text())["drift"]
    assert drift["accuracy"] == pytest.approx(5 / 6)
    assert drift["reference_accuracy"] == pytest.approx(5 / 6)


def test_run_rejects_truncated_library(compiled, tmp_path, capsys):
    copy = tmp_path / "artifact"
    copy.mkdir()
    for item in compiled.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    library = copy / "model.so"
    library.write_bytes(library.read_bytes()[:5000])
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    code = main(["run", str(copy), "--input", f"x={tmp_path / 'x.npy'}"])
    assert code == 2
    assert "truncated" in capsys.readouterr().err


def test_sigterm_leaves_no_partial_output(model_file, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "graphcomp.cli", "compile", str(model_file),
         "--input-shape", "x=1,3,8,8", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # Wait until the staging folder exists, then terminate.
    for _ in range(600):
        if [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]:
            break
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    if process.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert process.returncode == 130
    assert leftovers == []
    assert not out.exists()
