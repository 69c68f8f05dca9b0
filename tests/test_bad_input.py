"""Bad input through the command line: one test per case of the bad-input catalogue.

Every case checks the exit code (2 for bad input, 1 for an internal error) and that the message
names the file (and the node and op where there is one). It also checks that no output was half
written: the output folder is absent or unchanged, and no staging folder is left beside it.
tests/test_cli.py covers the cases this file leaves out. They are a missing or random-bytes
model file, unsupported op types alone, dynamic dims without --input-shape, and an input shape
that contradicts the model's fixed dims. Also an unknown pass name, an output path that is a
file or lies below one, and a truncated model.so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphcomp.cli import main
from onnx_models import conv_bn_relu_gemm, save

SHAPE = ["--input-shape", "x=1,3,8,8"]


# --- helpers ----------------------------------------------------------------------------------


def folder_state(folder: Path) -> dict[str, str]:
    """Map every file below ``folder`` to its sha256, and every folder to "dir"."""
    state = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        state[relative] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def fails(args: list[str], capsys, code: int = 2, watch: Path | None = None) -> str:
    """Run the CLI, assert the exit code and that the folder ``watch`` (the output folder's
    parent) is unchanged, and return stderr."""
    before = folder_state(watch) if watch is not None else None
    result = main(args)
    err = capsys.readouterr().err
    assert result == code, err
    if watch is not None:
        assert folder_state(watch) == before
    return " ".join(err.split())  # undo line wrapping of long messages


def compile_fails(model, out: Path, capsys, *extra: str) -> str:
    """``graphcomp compile MODEL EXTRA -o OUT`` fails with exit code 2 and writes nothing."""
    return fails(["compile", str(model), *extra, "-o", str(out)], capsys, watch=out.parent)


def write_module(folder: Path, source: str) -> Path:
    """Write a Python file of model builders for FILE.py:FUNCTION specs."""
    path = folder / "models.py"
    path.write_text("import torch\n\n" + textwrap.dedent(source))
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save(conv_bn_relu_gemm(), tmp_path_factory.mktemp("model") / "small.onnx")


@pytest.fixture(scope="module")
def artifact(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    assert main(["compile", str(model_file), *SHAPE, "-o", str(out)]) == 0
    return out


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 3, 8, 8), np.float32))
    return path


def edited_copy(artifact: Path, folder: Path, edit) -> Path:
    copy = folder / "artifact"
    shutil.copytree(artifact, copy)
    edit(copy)
    return copy


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


# --- model files ------------------------------------------------------------------------------


def test_empty_onnx(tmp_path, capsys):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    err = compile_fails(path, tmp_path / "out", capsys)
    assert "empty.onnx: the file is empty (0 bytes)" in err


def test_truncated_onnx(model_file, tmp_path, capsys):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(model_file.read_bytes()[:300])
    err = compile_fails(path, tmp_path / "out", capsys, *SHAPE)
    assert "truncated.onnx: cannot be parsed as an ONNX model" in err
    assert "truncated, corrupt" in err


def test_tensor_proto_instead_of_model(tmp_path, capsys):
    path = tmp_path / "weights.onnx"
    tensor = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    path.write_bytes(tensor.SerializeToString())
    err = compile_fails(path, tmp_path / "out", capsys)
    assert "weights.onnx: is a serialized ONNX tensor (TensorProto)" in err


def test_external_data_file_missing(tmp_path, capsys):
    path = tmp_path / "external.onnx"
    onnx.save(conv_bn_relu_gemm(), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="external.data", size_threshold=0)
    (tmp_path / "external.data").unlink()
    err = compile_fails(path, tmp_path / "out", capsys, *SHAPE)
    assert "external.onnx: the model keeps weights in external data files" in err
    assert "external.data (tensors conv.w" in err


# --- unsupported ops --------------------------------------------------------------------------


def test_unsupported_types_and_attributes_together(tmp_path, capsys):
    # x -> Det; x4 -> Resize(mode=cubic); x -> Hardmax: two op types without a converter and
    # one supported op type with an attribute value graphcomp cannot import.
    nodes = [
        helper.make_node("Det", ["x"], ["d"], name="det_node"),
        helper.make_node("Resize", ["x4", "", "scales"], ["r"], name="cubic_resize",
                         mode="cubic"),
        helper.make_node("Hardmax", ["x"], ["h"], name="hardmax_node"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3]),
         helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 8, 8]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, 3])],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = save(model, tmp_path / "mixed.onnx")
    err = compile_fails(path, tmp_path / "out", capsys)
    assert "mixed.onnx: 3 unsupported op type(s)" in err
    assert "Det (domain ai.onnx, opset 13) at node(s) det_node" in err
    assert "Hardmax (domain ai.onnx, opset 13) at node(s) hardmax_node" in err
    assert "Resize with mode 'cubic'" in err
    assert "cubic_resize" in err


def test_torch_unsupported_ops_together(tmp_path, capsys):
    module = write_module(tmp_path, """
        class Exotic(torch.nn.Module):
            def forward(self, x):
                return torch.cumsum(x, 1) + torch.flip(x, [1])

        def build():
            return Exotic().eval(), (torch.ones(2, 3),)
    """)
    err = compile_fails(f"{module}:build", tmp_path / "out", capsys)
    assert "models.py:build" in err
    assert "aten.cumsum.default" in err
    assert "aten.flip.default" in err
    assert "at node(s) cumsum" in err


# --- shapes -----------------------------------------------------------------------------------


def reshape_model() -> onnx.ModelProto:
    """x[N,3,H,W] -> Flatten -> Reshape to the fixed shape [1,4,12]: only H = W = 4 fits."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten", axis=1),
        helper.make_node("Reshape", ["flat", "shape"], ["y"], name="to_heads"),
    ]
    graph = helper.make_graph(
        nodes, "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12])],
        [numpy_helper.from_array(np.array([1, 4, 12], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_shape_error_inside_model(tmp_path, capsys):
    path = save(reshape_model(), tmp_path / "reshape.onnx")
    err = compile_fails(path, tmp_path / "out", capsys, "--input-shape", "x=1,3,5,5")
    assert "reshape.onnx: node 'to_heads' (op Reshape) cannot reshape" in err
    assert "shape [1, 75] (75 elements) to [1, 4, 12]" in err
    assert "x [1, 3, 5, 5]" in err
    assert "--input-shape" in err
    assert "unsupported" not in err


def test_input_dim_without_name(tmp_path, capsys):
    # A dim with neither a size nor a name (exporters write these) is dynamic too.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "unnamed_dim",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = save(model, tmp_path / "unnamed_dim.onnx")
    err = compile_fails(path, tmp_path / "out", capsys)
    assert "unnamed_dim.onnx: 1 input(s) have dynamic dims" in err
    assert "x: [?, 3]" in err
    assert "--input-shape x=D0,3" in err


@pytest.mark.slow
def test_ppocr_rec_wrong_shape(tmp_path, capsys):
    # A height of 32 instead of 48 shrinks a feature map to height 0 before a Reshape.
    err = compile_fails("zoo:ppocr-rec", tmp_path / "out", capsys,
                        "--input-shape", "x=1,3,32,320")
    assert "ch_PP-OCRv4_rec_infer.onnx: node 'p2o.Reshape.67' (op Reshape)" in err
    assert "cannot reshape a tensor of shape [1, 0, 360]" in err
    assert "x [1, 3, 32, 320]" in err
    assert "unsupported" not in err


# --- weights ----------------------------------------------------------------------------------


def with_weight_value(name: str, index: tuple, number: float) -> onnx.ModelProto:
    model = conv_bn_relu_gemm()
    for position, initializer in enumerate(model.graph.initializer):
        if initializer.name == name:
            array = numpy_helper.to_array(initializer).copy()
            array[index] = number
            model.graph.initializer[position].CopyFrom(numpy_helper.from_array(array, name))
    return model


def test_nan_weights_rejected(tmp_path, capsys):
    path = save(with_weight_value("conv.w", (0, 0, 0, 0), np.nan), tmp_path / "nan.onnx")
    err = compile_fails(path, tmp_path / "out", capsys, *SHAPE)
    assert "nan.onnx: 1 weight tensor(s) contain NaN" in err
    assert "conv.w [4, 3, 3, 3], read by 'conv' (op conv2d): 1 NaN of 108" in err


def test_inf_weights_warned(tmp_path, capsys):
    # An infinite weight is warned about, not rejected (masks contain -inf). Here it makes every
    # output NaN, and the compile must warn about that rather than report a silent zero error.
    path = save(with_weight_value("fc.w", (0, 0), np.inf), tmp_path / "inf.onnx")
    out = tmp_path / "out"
    assert main(["compile", str(path), *SHAPE, "-o", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "inf.onnx: 1 weight tensor(s) contain infinite values" in err
    assert "read by 'fc' (op linear): 1 infinite of 20" in err
    assert "10 of 10 output values are NaN or infinite in the original model" in err
    assert (out / "report.json").is_file()


def test_nan_from_inf_weight_not_blamed_on_backend(tmp_path, capsys):
    # 0 * inf in the conv gives NaN, which the reference's relu keeps and TVM's turns into 0.
    path = save(with_weight_value("conv.w", (0, 0, 1, 1), np.inf), tmp_path / "inf.onnx")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    x[:, 0] = 0.0
    np.savez(tmp_path / "data.npz", x=x)
    err = compile_fails(path, tmp_path / "out", capsys, *SHAPE, "--data",
                        str(tmp_path / "data.npz"))
    assert "disagree on NaN or infinite output values" in err
    assert "from an infinite weight or an overflow" in err
    assert "lowered an op wrongly" not in err


def test_equal_infinities_verify_as_equal():
    # An output that is +inf in the reference and in the build agrees (inf - inf is NaN, which
    # would fail verification and blame the backend); opposite infinities do not.
    from graphcomp.compiler import ErrorStats

    same = ErrorStats()
    same.add(np.array([np.inf, 1.0, np.nan]), np.array([np.inf, 1.0, np.nan]))
    assert not same.mismatch
    assert same.max_abs == 0.0
    assert same.nonfinite_on_both_sides == 2
    opposite = ErrorStats()
    opposite.add(np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]))
    assert opposite.mismatch


# --- PyTorch models ---------------------------------------------------------------------------


def test_training_mode_rejected(tmp_path, capsys):
    # graphcomp rejects a module in training mode instead of switching it to eval, because
    # the caller's module would change under them and batch norm statistics differ.
    module = write_module(tmp_path, """
        def build():
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            return net, (torch.ones(1, 3, 8, 8),)
    """)
    err = compile_fails(f"{module}:build", tmp_path / "out", capsys)
    assert "models.py:build: model 'build' is in training mode (modules <root>, 0, 1)" in err
    assert "model.eval()" in err


def test_failed_export_message(tmp_path, capfd):
    module = write_module(tmp_path, """
        class DataDependent(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x.nonzero()

        def build():
            return DataDependent().eval(), (torch.ones(1, 3),)
    """)
    out = tmp_path / "out"
    assert main(["compile", f"{module}:build", "-o", str(out)]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "models.py:build: torch.export failed for model 'build'" in err
    assert "GuardOnDataDependentSymNode" in err
    assert 'raised at File "' in err
    assert "line 6, in forward if x.sum() > 0:" in err
    # torch's partial graph, traceback and debugging advice stay out unless --verbose.
    assert "def forward" not in err
    assert "Traceback" not in err
    assert "TORCHDYNAMO" not in err
    assert not out.exists()


def test_failed_export_verbose_shows_torch_output(tmp_path, capfd):
    module = write_module(tmp_path, """
        class DataDependent(torch.nn.Module):
            def forward(self, x):
                return x * 2 if x.sum() > 0 else x

        def build():
            return DataDependent().eval(), (torch.ones(1, 3),)
    """)
    assert main(["-v", "compile", f"{module}:build", "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "torch.export error in full" in err
    assert "TORCHDYNAMO" in err


def test_corrupt_pt2_no_traceback(tmp_path, capfd):
    path = tmp_path / "model.pt2"
    path.write_bytes(os.urandom(512))
    out = tmp_path / "out"
    assert main(["compile", str(path), "-o", str(out)]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "model.pt2: not a valid torch.export program" in err
    assert "Traceback" not in err
    assert not out.exists()


# --- passes and options -----------------------------------------------------------------------


def test_unknown_pass_option(model_file, tmp_path, capsys):
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE,
                        "--passes", "prune:ration=0.5")
    assert "pass 'prune' has no option 'ration'" in err
    assert "ratio (float)" in err


@pytest.mark.parametrize("pipeline, message", [
    ("prune:ratio=-1", "pass 'prune': ratio must be in [0, 1), got -1.0"),
    ("prune:ratio=1.5", "pass 'prune': ratio must be in [0, 1), got 1.5"),
    ("prune:ratio=nan", "pass 'prune': option 'ratio' must be a number, got nan"),
    ("lowrank:rank=0", "pass 'lowrank': rank must be at least 1, got 0"),
    ("lowrank:energy=2", "pass 'lowrank': energy must be in (0, 1], got 2.0"),
    ("fold-constants:max_elements=-5",
     "pass 'fold-constants': option 'max_elements' must be at least 0, got -5"),
    ("quantize:percentile=40", "pass 'quantize': percentile must be in (50, 100], got 40.0"),
])
def test_option_out_of_range(pipeline, message, model_file, tmp_path, capsys):
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--passes", pipeline)
    assert message in err


# --- output folder ----------------------------------------------------------------------------


def test_unwritable_output_folder(model_file, capsys):
    # /proc takes no new folders even for root, unlike a chmod-ed folder.
    err = fails(["compile", str(model_file), *SHAPE, "-o", "/proc/graphcomp-test/out"], capsys)
    assert "/proc/graphcomp-test/out: cannot write the output folder" in err
    assert not Path("/proc/graphcomp-test").exists()


def fill_disk_on_weights(monkeypatch) -> None:
    """Make the artifact writer fail with ENOSPC after writing part of weights.npz."""
    from graphcomp.backends.tvm import artifact as artifact_module

    def write_half(path: Path, arrays) -> None:
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(artifact_module, "_save_npz", write_half)


def test_full_disk_leaves_nothing(model_file, tmp_path, capsys, monkeypatch):
    fill_disk_on_weights(monkeypatch)
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE)
    assert "weights.npz: cannot write (No space left on device)" in err
    assert "out was left as it was" in err


def test_full_disk_keeps_previous_output(artifact, model_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(artifact, out)
    fill_disk_on_weights(monkeypatch)
    err = fails(["compile", str(model_file), *SHAPE, "-o", str(out)], capsys, watch=tmp_path)
    assert "No space left on device" in err
    assert (out / "manifest.json").is_file()


def test_internal_error_asks_for_report(model_file, tmp_path, capsys, monkeypatch):
    from graphcomp import compiler

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(compiler, "save_graph", broken)
    err = fails(["compile", str(model_file), *SHAPE, "-o", str(tmp_path / "out")], capsys,
                code=1, watch=tmp_path)
    assert "internal error: RuntimeError: simulated fault" in err
    assert "This is a bug in graphcomp" in err
    assert "report it" in err


# --- tuning database --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_database_name() -> tuple[str, str]:
    """The cpu target's database file name and a valid header line for it."""
    from graphcomp.backends.tvm import resolve_target
    from graphcomp.backends.tvm.targets import export_json
    from graphcomp.backends.tvm.tuning_db import FORMAT_NAME, FORMAT_VERSION, target_key

    target_json = export_json(resolve_target("cpu"))
    header = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                         "target": target_json, "tvm_version": "0"})
    return f"{target_key(target_json)}.jsonl", header


def database_with(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir()
    (folder / name).write_bytes(content)
    return folder


def test_tuning_db_garbage_line(tmp_path, capsys, cpu_database_name):
    name, header = cpu_database_name
    db = database_with(tmp_path / "db", name, header.encode() + b"\nnot json at all\n{}\n")
    err = fails(["tune-db", "--tuning-db", str(db), "list"], capsys, watch=db)
    assert f"{name}: corrupt tuning database at line 2: not valid JSON" in err
    assert "prune --target" in err


def test_tuning_db_binary_file(tmp_path, capsys, cpu_database_name):
    name, _ = cpu_database_name
    db = database_with(tmp_path / "db", name, bytes(range(256)) * 4)
    err = fails(["tune-db", "--tuning-db", str(db), "list"], capsys, watch=db)
    assert f"{name}: corrupt tuning database at line 1" in err


def test_tuning_db_cut_last_line(tmp_path, capsys, cpu_database_name):
    # A run killed while appending leaves a cut last line: skipped with a warning, not fatal.
    name, header = cpu_database_name
    db = database_with(tmp_path / "db", name, header.encode() + b'\n{"workload": 0, "shash')
    assert main(["tune-db", "--tuning-db", str(db), "list"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{name}: skipped an incomplete last line 2" in err


def test_tuning_db_other_version(tmp_path, capsys, cpu_database_name):
    name, header = cpu_database_name
    newer = json.loads(header) | {"version": 99}
    db = database_with(tmp_path / "db", name, json.dumps(newer).encode() + b"\n")
    err = fails(["tune-db", "--tuning-db", str(db), "list"], capsys, watch=db)
    assert f"{name}: tuning database format version 99; this graphcomp reads version 1" in err


def test_compile_tune_with_corrupt_db(model_file, tmp_path, capsys, cpu_database_name):
    name, header = cpu_database_name
    db = database_with(tmp_path / "db", name, header.encode() + b"\n\x00\x01garbage\n")
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--tune",
                        "--tuning-db", str(db))
    assert f"{name}: corrupt tuning database at line 2" in err


# --- artifacts given to 'graphcomp run' -------------------------------------------------------


def run_fails(folder: Path, inputs: Path, capsys) -> str:
    return fails(["run", str(folder), "--input", f"x={inputs}"], capsys, watch=folder)


def test_run_artifact_of_other_target(artifact, inputs, tmp_path, capsys):
    cuda = {"name": "cuda", "json": {"kind": "cuda", "arch": "sm_90"}}
    folder = edited_copy(artifact, tmp_path, lambda f: edit_manifest(f, target=cuda))
    err = run_fails(folder, inputs, capsys)
    assert f"artifact {folder} (target 'cuda') cannot run on this host" in err


def test_run_artifact_of_other_format_version(artifact, inputs, tmp_path, capsys):
    folder = edited_copy(artifact, tmp_path, lambda f: edit_manifest(f, format_version=2))
    err = run_fails(folder, inputs, capsys)
    assert "manifest.json: artifact format version 2 is not supported" in err


def test_run_arm_manifest_with_host_library(artifact, inputs, tmp_path, capsys):
    # The manifest claims aarch64, so run takes the emulation path, which checks the ELF header.
    arm = {"name": "arm", "json": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                   "mattr": ["+neon"]}}
    folder = edited_copy(artifact, tmp_path, lambda f: edit_manifest(f, target=arm))
    err = run_fails(folder, inputs, capsys)
    assert "model.so: ELF machine is 62, expected 183 (aarch64)" in err


def test_run_artifact_without_library(artifact, inputs, tmp_path, capsys):
    folder = edited_copy(artifact, tmp_path, lambda f: (f / "model.so").unlink())
    err = run_fails(folder, inputs, capsys)
    assert f"{folder}: artifact is missing model.so" in err


def test_run_artifact_with_changed_library(artifact, inputs, tmp_path, capsys):
    def flip_byte(folder: Path) -> None:
        data = bytearray((folder / "model.so").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "model.so").write_bytes(bytes(data))

    folder = edited_copy(artifact, tmp_path, flip_byte)
    err = run_fails(folder, inputs, capsys)
    assert f"{folder / 'model.so'} does not match the checksum in manifest.json" in err
    assert "the file changed after compile (the size is unchanged); compile the model again" in err


# --- input arrays given to 'run' and 'compile --data' -----------------------------------------


def with_nan(shape: tuple[int, ...], position: tuple[int, ...]) -> np.ndarray:
    array = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    array[position] = np.nan
    return array


def test_run_rejects_nan_input(artifact, tmp_path, capsys):
    # The artifact's relu turns NaN into a number, so the run would print ordinary outputs.
    path = tmp_path / "x.npy"
    np.save(path, with_nan((1, 3, 8, 8), (0, 1, 2, 3)))
    err = fails(["run", str(artifact), "--input", f"x={path}"], capsys, watch=tmp_path)
    assert f"--input x={path}: input 'x' contains 1 NaN or infinite value(s)" in err
    assert "first nan at [0, 1, 2, 3]" in err
    assert "--allow-non-finite" in err


def test_run_allows_nan_with_flag(artifact, tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, with_nan((1, 3, 8, 8), (0, 1, 2, 3)))
    assert main(["run", str(artifact), "--input", f"x={path}", "--allow-non-finite"]) == 0
    assert "y: float32[1, 5]" in capsys.readouterr().out


def test_compile_rejects_nan_example(model_file, tmp_path, capsys):
    data = tmp_path / "data.npz"
    x = with_nan((4, 3, 8, 8), (2, 0, 5, 5))
    x[3, 1, 0, 0] = np.inf
    np.savez(data, x=x)
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--data", str(data))
    assert f"{data}: input 'x' contains 2 example(s) with NaN or infinite values: 2, 3" in err
    assert "the backend" not in err  # the input is at fault, not the build


def test_compile_rejects_nan_in_npy_folder(model_file, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "x.npy", with_nan((2, 3, 8, 8), (1, 0, 0, 0)))
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--data", str(folder))
    assert f"{folder / 'x.npy'}: input 'x' contains 1 example(s) with NaN" in err


def test_run_casts_float64_with_warning(artifact, tmp_path, capsys):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 8))
    np.save(tmp_path / "x64.npy", x)
    np.save(tmp_path / "x32.npy", x.astype(np.float32))
    results = []
    for name in ("x64", "x32"):
        out = tmp_path / f"{name}.npz"
        assert main(["run", str(artifact), "--input", f"x={tmp_path / name}.npy",
                     "-o", str(out)]) == 0
        results.append(np.load(out)["y"])
    assert "casting input 'x' from float64 to float32" in capsys.readouterr().err
    np.testing.assert_array_equal(results[0], results[1])


def test_run_rejects_int_for_float_input(artifact, tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((1, 3, 8, 8), np.int32))
    err = fails(["run", str(artifact), "--input", f"x={path}"], capsys, watch=tmp_path)
    assert f"--input x={path}: input 'x' is int32, but the model expects float32" in err


def test_compile_data_dtype_rule_matches_run(model_file, tmp_path, capsys):
    data = tmp_path / "ints.npz"
    np.savez(data, x=np.ones((2, 3, 8, 8), np.int64))
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--data", str(data))
    assert f"{data}: input 'x' is int64, but the model expects float32" in err

    data = tmp_path / "doubles.npz"
    np.savez(data, x=np.random.default_rng(2).uniform(-1, 1, (2, 3, 8, 8)))
    assert main(["compile", str(model_file), *SHAPE, "--data", str(data), "-o",
                 str(tmp_path / "out")]) == 0
    assert f"{data}: casting input 'x' from float64 to float32" in capsys.readouterr().err


def test_labels_outside_classes(model_file, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((3, 3, 8, 8), np.float32), labels=np.array([0, 4, 105]))
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--data", str(data))
    assert f"{data}: 'labels' contains 1 value(s) outside [0, 5)" in err
    assert "output 'y', shape [1, 5]), first 105 at example 2" in err


def test_run_unknown_input_name(artifact, inputs, tmp_path, capsys):
    err = fails(["run", str(artifact), "--input", f"image={inputs}"], capsys, watch=tmp_path)
    assert f"--input image={inputs}: the model has no input named 'image'; its inputs: x" in err


def test_run_checks_output_path_first(artifact, inputs, tmp_path, capsys):
    folder = tmp_path / "outputs"
    folder.mkdir()
    for target in (folder, tmp_path / "missing" / "y.npz"):
        assert main(["run", str(artifact), "--input", f"x={inputs}", "-o", str(target)]) == 2
        captured = capsys.readouterr()
        assert f"-o {target}:" in captured.err
        assert captured.out == ""  # rejected before the model ran and printed its outputs


# --- integer inputs outside the table they index ------------------------------------------------


EMBEDDING_MODULE = """
    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(10, 4)

        def forward(self, ids):
            return self.table(ids).sum(1)

    def build():
        return Lookup().eval(), (torch.zeros(1, 5, dtype=torch.int64),)
"""


@pytest.fixture(scope="module")
def embedding_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    module = write_module(folder, EMBEDDING_MODULE)
    out = folder / "out"
    assert main(["compile", f"{module}:build", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("bad_id", [10, 1000, -1])
def test_run_rejects_id_outside_table(embedding_artifact, bad_id, tmp_path, capsys):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 2, bad_id, 3, 9]], np.int64))
    err = fails(["run", str(embedding_artifact), "--input", str(ids), "-o",
                 str(tmp_path / "y.npz")], capsys, watch=tmp_path)
    assert f"--input {ids}: input 'ids' contains 1 index(es) outside [0, 10)" in err
    assert f"first {bad_id} at [0, 2]" in err
    assert "node 'table' (op embedding)" in err


def test_run_accepts_ids_inside_table(embedding_artifact, tmp_path, capsys):
    import torch

    ids = np.array([[0, 2, 5, 3, 9]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "y.npz"
    assert main(["run", str(embedding_artifact), "--input", str(tmp_path / "ids.npy"),
                 "-o", str(out)]) == 0
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4).weight.detach().numpy()
    np.testing.assert_allclose(np.load(out)["output"], table[ids[0]].sum(0)[None], atol=1e-6)


def test_run_casts_int32_ids(embedding_artifact, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([[0, 2, 5, 3, 9]], np.int32))
    assert main(["run", str(embedding_artifact), "--input", str(tmp_path / "ids.npy")]) == 0
    assert "casting input 'ids' from int32 to int64" in capsys.readouterr().err


def test_run_rejects_float_ids(embedding_artifact, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([[0, 2, 5, 3, 9]], np.float32))
    err = fails(["run", str(embedding_artifact), "--input", str(tmp_path / "ids.npy")], capsys,
                watch=tmp_path)
    assert "input 'ids' is float32, but the model expects int64" in err


def test_compile_rejects_data_outside_table(tmp_path, capsys):
    module = write_module(tmp_path, EMBEDDING_MODULE)
    data = tmp_path / "data.npz"
    np.savez(data, ids=np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 12]], np.int64))
    err = compile_fails(f"{module}:build", tmp_path / "out", capsys, "--data", str(data))
    assert "data.npz: input 'ids' contains 1 index(es) outside [0, 10), first 12" in err


@pytest.mark.slow
def test_minilm_ids_above_vocabulary(tmp_path, capsys):
    ids = np.full((1, 32), 101, np.int64)
    ids[0, 5] = 30522  # the vocabulary has 30,522 tokens
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones((1, 32), np.int64))
    err = compile_fails("zoo:minilm", tmp_path / "out", capsys, "--passes", "none",
                        "--data", str(data))
    assert "tokens.npz: input 'input_ids' contains 1 index(es) outside [0, 30522)" in err
    assert "node 'bert.embeddings.word_embeddings' (op embedding)" in err


# --- conflicting or missing paths in options -----------------------------------------------------


def test_report_output_is_folder(artifact, tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    err = fails(["report", str(artifact), "-o", str(folder)], capsys, watch=tmp_path)
    assert f"cannot write {folder}: it is a folder; give a file name such as" in err


def test_report_output_unwritable(artifact, capsys):
    err = fails(["report", str(artifact), "-o", "/proc/graphcomp-report.html"], capsys)
    assert "cannot write /proc/graphcomp-report.html (" in err


@pytest.mark.parametrize("dump, out", [("o", "o"), ("o/dump", "o"), ("d", "d/out")])
def test_dump_dir_overlapping_output(dump, out, model_file, tmp_path, capsys):
    err = fails(["compile", str(model_file), *SHAPE, "--dump-dir", str(tmp_path / dump),
                 "-o", str(tmp_path / out)], capsys, watch=tmp_path)
    assert f"--dump-dir {tmp_path / dump} and -o {tmp_path / out} overlap" in err
    assert "choose a dump folder outside it" in err


@pytest.mark.parametrize("pipeline", ["", ",", "dce,,dce"])
def test_empty_pass_names(pipeline, model_file, tmp_path, capsys):
    err = compile_fails(model_file, tmp_path / "out", capsys, *SHAPE, "--passes", pipeline)
    assert "write 'none' to run no passes" in err


def test_inspect_empty_pipeline(model_file, capsys):
    err = fails(["inspect", str(model_file), *SHAPE, "--after", ""], capsys)
    assert "the pipeline is empty; write 'none'" in err


@pytest.mark.parametrize("position", ["before", "after"])
def test_tune_db_missing_folder(position, tmp_path, capsys):
    missing = tmp_path / "no-such-db"
    option = ["--tuning-db", str(missing)]
    for action in (["list"], ["prune", "--keep", "1"]):
        args = ["tune-db", *option, *action] if position == "before" else \
            ["tune-db", *action, *option]
        err = fails(args, capsys, watch=tmp_path)
        assert f"--tuning-db {missing}: folder not found" in err


def test_tune_db_option_after_action(tmp_path, capsys):
    # tune-db takes --tuning-db after its action as well as before it.
    db = tmp_path / "db"
    db.mkdir()
    assert main(["tune-db", "list", "--tuning-db", str(db)]) == 0
    assert f"no tuning records in {db}" in " ".join(capsys.readouterr().out.split())
