"""Targets without their hardware: ARM artifacts checked as aarch64 ELF files and run under
qemu-aarch64, CUDA artifacts checked for machine code and PTX of the requested architecture.

What skips when:
- ARM export tests need aarch64-linux-gnu-gcc. The qemu tests also need qemu-aarch64,
  aarch64-linux-gnu-g++ and the aarch64 TVM wheels, which are downloaded on first use
  unless the cache already has them. Each skip names what is missing.
- CUDA export tests need nvcc; running CUDA code needs a GPU and skips without one.

Tolerances: outputs run under qemu or on a GPU must match the reference executor to 1e-5
relative to the output scale (max |expected|), the PP-OCR classifier to 1e-4.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.errors import ArtifactError, BackendError, OptionError, ShapeError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.shapes import infer_shapes

tvm = pytest.importorskip("tvm")
from graphcomp.backends.tvm import build, list_targets, load_artifact, resolve_target  # noqa: E402
from graphcomp.backends.tvm import aarch64_runner  # noqa: E402
from graphcomp.backends.tvm.aarch64_runner import elf  # noqa: E402
from graphcomp.backends.tvm.cuda_binary import (  # noqa: E402
    cubin_kernels,
    cuda_modules,
    fatbin_entries,
)
from graphcomp.backends.tvm.targets import target_descriptions  # noqa: E402

RNG = np.random.default_rng(11)
ARM_GCC = "aarch64-linux-gnu-gcc"
needs_arm_gcc = pytest.mark.skipif(
    shutil.which(ARM_GCC) is None,
    reason=f"exporting for arm needs {ARM_GCC} (Debian package gcc-aarch64-linux-gnu)",
)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual - expected))) / scale


def weight(name: str, *shape, scale: float = 0.3) -> Constant:
    return Constant(name, (RNG.standard_normal(shape) * scale).astype(np.float32))


def conv_net() -> Graph:
    """Two outputs, so that the runner's tuple handling is exercised:

    x[1,3,12,12] -> conv 3x3 (6) -> batch_norm -> relu -> max_pool 2x2 -> pool[1,6,6,6]
    pool -> global_avg_pool -> flatten -> linear (5) -> logits[1,5]
    """
    x = Value("x", (1, 3, 12, 12))
    conv, bn, relu, pool, gap, flat, logits = (Value(n, ()) for n in (
        "conv", "bn", "relu", "pool", "gap", "flat", "logits"))
    stats = [weight("bn.scale", 6), weight("bn.bias", 6), weight("bn.mean", 6),
             Constant("bn.var", RNG.uniform(0.5, 2.0, 6).astype(np.float32))]
    nodes = [
        Node("conv", "conv2d", [x, weight("conv.w", 6, 3, 3, 3), weight("conv.b", 6)], [conv],
             {"pads": [1, 1, 1, 1]}),
        Node("bn", "batch_norm", [conv, *stats], [bn], {"eps": 1e-5}),
        Node("relu", "relu", [bn], [relu]),
        Node("pool", "max_pool2d", [relu], [pool], {"kernel": [2, 2]}),
        Node("gap", "global_avg_pool", [pool], [gap]),
        Node("flatten", "flatten", [gap], [flat], {"axis": 1}),
        Node("fc", "linear", [flat, weight("fc.w", 5, 6), weight("fc.b", 5)], [logits]),
    ]
    graph = Graph("conv_net", [x], [pool, logits], nodes)
    infer_shapes(graph)
    return graph


@pytest.fixture(scope="module")
def net():
    graph = conv_net()
    feeds = {"x": RNG.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    return graph, feeds, executor.run(graph, feeds)


@pytest.fixture(scope="module")
def arm_artifact(net, tmp_path_factory) -> Path:
    if shutil.which(ARM_GCC) is None:
        pytest.skip(f"exporting for arm needs {ARM_GCC} (Debian package gcc-aarch64-linux-gnu)")
    folder = tmp_path_factory.mktemp("arm") / "artifact"
    build(net[0], "arm").export(folder)
    return folder


@pytest.fixture(scope="module")
def cpu_artifact(net, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cpu") / "artifact"
    build(net[0], "cpu").export(folder)
    return folder


@pytest.fixture(scope="module")
def emulator():
    try:
        return aarch64_runner.prepare_runtime()
    except aarch64_runner.EmulatorUnavailableError as exc:
        pytest.skip(f"cannot run aarch64 code here: {exc}")


# --- target names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda:sm_1", "cuda:foo", "cuda:sm_075", "cuda:SM_80",
                                  "cuda:sm_80x"])
def test_invalid_cuda_arch_rejected(name):
    with pytest.raises(OptionError, match=r"invalid CUDA architecture .*expected cuda:sm_XY"):
        resolve_target(name)


@pytest.mark.parametrize("arch", ["sm_75", "sm_90a", "sm_100f", "sm_120"])
def test_valid_cuda_arch_accepted(arch):
    assert str(resolve_target(f"cuda:{arch}").attrs["arch"]) == arch


def test_arm_target_is_aarch64_neon():
    target = resolve_target("arm")
    assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert "+neon" in list(target.attrs["mattr"])
    assert "arm_cpu" in list(target.keys)


def test_descriptions_match_listed_targets():
    descriptions = target_descriptions()
    targets = list_targets()
    assert list(descriptions) == list(targets)
    for name, text in descriptions.items():
        assert text and "\n" not in text, name
    for name, target_json in targets.items():
        assert json.loads(json.dumps(target_json)) == target_json
        assert tvm.target.Target(target_json).kind.name == target_json["kind"], name


# --- ARM: the library file --------------------------------------------------------------------


def test_arm_library_is_aarch64_elf(arm_artifact):
    data = (arm_artifact / "model.so").read_bytes()
    assert elf.read_header(data).machine == elf.EM_AARCH64 == 183


def test_arm_library_exports_entry_points(arm_artifact):
    kernels = aarch64_runner.check_aarch64_library(arm_artifact / "model.so")
    assert "conv2d" in kernels
    assert "max_pool2d" in kernels
    exported = {s.name for s in elf.read_symbols((arm_artifact / "model.so").read_bytes())
                if s.defined}
    assert "__tvm_ffi__library_bin" in exported


def readelf_tool() -> str | None:
    return shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")


@pytest.mark.skipif(readelf_tool() is None, reason="needs readelf (binutils)")
def test_elf_reader_matches_readelf(arm_artifact):
    path = arm_artifact / "model.so"
    listing = subprocess.run([readelf_tool(), "--dyn-syms", "-W", str(path)],
                             capture_output=True, text=True, check=True).stdout
    # Columns: Num: Value Size Type Bind Vis Ndx Name; imported symbols have Ndx UND.
    expected = {
        fields[7] for fields in (line.split() for line in listing.splitlines())
        if len(fields) >= 8 and fields[0].rstrip(":").isdigit() and fields[6] != "UND"
        and fields[3] != "SECTION"
    }
    ours = {s.name for s in elf.read_symbols(path.read_bytes())
            if s.defined and s.kind != "section"}
    assert ours == expected
    assert "__tvm_ffi_conv2d" in ours


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-objdump") is None,
    reason="needs aarch64-linux-gnu-objdump (Debian package binutils-aarch64-linux-gnu)",
)
def test_arm_library_uses_neon(arm_artifact):
    disassembly = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(arm_artifact / "model.so")],
        capture_output=True, text=True, check=True,
    ).stdout
    assert re.search(r"\bv\d+\.4s\b", disassembly)  # four float32 lanes in a NEON register


def test_check_rejects_x86_library(cpu_artifact):
    with pytest.raises(ArtifactError, match=r"ELF machine is 62, expected 183"):
        aarch64_runner.check_aarch64_library(cpu_artifact / "model.so")


def test_needs_emulation_only_for_arm(arm_artifact, cpu_artifact):
    assert aarch64_runner.needs_emulation(arm_artifact)
    assert not aarch64_runner.needs_emulation(cpu_artifact)


def test_run_artifact_rejects_cpu_artifact(cpu_artifact, net):
    with pytest.raises(ArtifactError, match="built for target 'cpu', not aarch64"):
        aarch64_runner.run_artifact(cpu_artifact, net[1])


def test_run_artifact_rejects_wrong_feed_shape(arm_artifact):
    with pytest.raises(ShapeError, match=r"input 'x' is float32\[1, 3, 8, 8\]"):
        aarch64_runner.run_artifact(arm_artifact, {"x": np.zeros((1, 3, 8, 8), np.float32)})


# --- ARM: setting up the emulator -------------------------------------------------------------


def test_prepare_names_missing_tools(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(aarch64_runner.EmulatorUnavailableError,
                       match=r"qemu-aarch64 \(Debian package qemu-user\).*"
                             r"aarch64-linux-gnu-g\+\+ \(Debian package g\+\+-aarch64"):
        aarch64_runner.prepare_runtime(cache_dir=tmp_path)


def test_prepare_offline_names_missing_wheel(tmp_path):
    if aarch64_runner.missing_tools():
        pytest.skip(f"host tools missing: {', '.join(aarch64_runner.missing_tools())}")
    with pytest.raises(aarch64_runner.EmulatorUnavailableError,
                       match=r"aarch64 wheel of apache-tvm==\S+ is not in .*pip download"):
        aarch64_runner.prepare_runtime(cache_dir=tmp_path, download=False)


# --- ARM: running under qemu ------------------------------------------------------------------


def test_arm_artifact_runs_under_qemu(arm_artifact, emulator, net):
    _, feeds, expected = net
    actual = aarch64_runner.run_artifact(arm_artifact, feeds, runtime=emulator)
    assert list(actual) == ["pool", "logits"]
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert relative_error(expected[name], actual[name]) <= 1e-5, name


def test_runner_failure_reported(arm_artifact, emulator, tmp_path):
    # The manifest and feeds agree on an input shape the library was not built for, so
    # only the runtime's own check inside the VM can catch it.
    folder = tmp_path / "edited"
    shutil.copytree(arm_artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [1, 3, 8, 8]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    feeds = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    with pytest.raises(BackendError, match=r"runner failed with exit code 1 .*mismatch"):
        aarch64_runner.run_artifact(folder, feeds, runtime=emulator)


@needs_arm_gcc
def test_runner_round_trips_dtypes(emulator, tmp_path):
    # ids[2,4] int64 -> embedding(table[10,3]) -> e float32 -> cast -> h float16, b bool
    # ids -> cast -> i int32, u uint8
    ids = Value("ids", (2, 4), "int64")
    e, h, i, u, b = (Value(name, ()) for name in "ehiub")
    nodes = [Node("embed", "embedding", [ids, weight("table", 10, 3)], [e]),
             Node("to_half", "cast", [e], [h], {"dtype": "float16"}),
             Node("to_int32", "cast", [ids], [i], {"dtype": "int32"}),
             Node("to_uint8", "cast", [ids], [u], {"dtype": "uint8"}),
             Node("to_bool", "cast", [e], [b], {"dtype": "bool"})]
    graph = Graph("dtypes", [ids], [e, h, i, u, b], nodes)
    infer_shapes(graph)
    build(graph, "arm").export(tmp_path / "dtypes")
    feeds = {"ids": RNG.integers(0, 10, (2, 4)).astype(np.int64)}
    expected = executor.run(graph, feeds)
    actual = aarch64_runner.run_artifact(tmp_path / "dtypes", feeds, runtime=emulator)
    for name in "ehiub":
        assert actual[name].dtype == expected[name].dtype, name
        assert np.array_equal(actual[name], expected[name]), name


@pytest.mark.slow
@needs_arm_gcc
def test_ppocr_cls_runs_under_qemu(emulator, tmp_path):
    onnx_frontend = pytest.importorskip("graphcomp.frontends.onnx_frontend")
    from graphcomp.zoo import PPOCR_SHAPES, ppocr_path

    graph = onnx_frontend.import_onnx(ppocr_path("cls"), PPOCR_SHAPES["cls"])
    feeds = {name: RNG.uniform(-1, 1, shape).astype(np.float32)
             for name, shape in PPOCR_SHAPES["cls"].items()}
    expected = executor.run(graph, feeds)
    build(graph, "arm").export(tmp_path / "cls")
    actual = aarch64_runner.run_artifact(tmp_path / "cls", feeds, runtime=emulator)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert relative_error(expected[name], actual[name]) <= 1e-4, name


# --- CUDA -------------------------------------------------------------------------------------


def kernel_names(model) -> set[str]:
    """Names of the kernels in a freshly built CUDA model's CUDA C source."""
    names = set()
    for module in cuda_modules(model.library.mod):
        source = module.inspect_source()
        names |= set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(",
                                source))
    return names


@pytest.fixture(scope="module", params=["cuda:sm_90", "cuda:sm_75"])
def cuda_build(request, net, tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc on PATH")
    model = build(net[0], request.param)
    folder = tmp_path_factory.mktemp("cuda") / "artifact"
    model.export(folder)
    return int(request.param.removeprefix("cuda:sm_")), model, folder


def test_cuda_artifact_has_code_for_arch(cuda_build):
    arch, _, folder = cuda_build
    entries = fatbin_entries((folder / "model.so").read_bytes())
    assert sorted((entry.kind, entry.arch) for entry in entries) == [("ptx", arch),
                                                                       ("sass", arch)]


def test_cuda_cubin_holds_every_kernel(cuda_build):
    arch, model, folder = cuda_build
    entries = fatbin_entries((folder / "model.so").read_bytes())
    cubin = next(entry.payload for entry in entries if entry.kind == "sass")
    header = elf.read_header(cubin)
    assert header.machine == elf.EM_CUDA
    # Measured with nvcc 13.0: cubins of ELF ABI version 8 keep the sm version in bits 8-15
    # of e_flags.
    if header.abi_version == 8:
        assert (header.flags >> 8) & 0xFF == arch
    expected = kernel_names(model)
    assert expected
    assert set(cubin_kernels(cubin)) == expected


@needs_nvcc
def test_cuda_export_rejects_arch_nvcc_lacks(net, tmp_path):
    model = build(net[0], "cuda:sm_99")  # well formed, but no such GPU exists
    with pytest.raises(BackendError, match=r"Unsupported gpu architecture 'compute_99'"
                                           r".*this nvcc builds for sm_\d+"):
        model.export(tmp_path / "sm_99")


@pytest.mark.skipif(not tvm.cuda(0).exist, reason="running CUDA code needs a GPU")
def test_cuda_artifact_runs_on_gpu(net, tmp_path):
    graph, feeds, expected = net
    device = tvm.cuda(0)
    name = "cuda:sm_" + device.compute_version.replace(".", "")
    build(graph, name).export(tmp_path / "gpu")
    actual = load_artifact(tmp_path / "gpu").run(feeds)
    for output in expected:
        assert relative_error(expected[output], actual[output]) <= 1e-5, output


@pytest.mark.slow
def test_cli_compiles_verifies_and_runs_arm(emulator, tmp_path, capsys):
    """compile --target arm verifies under qemu-aarch64, and graphcomp run emulates too."""
    import json

    from graphcomp import executor
    from graphcomp.cli import main
    from graphcomp.models import digits_data
    from graphcomp.models_io import load_model

    out = tmp_path / "arm"
    assert main(["compile", "zoo:digits-cnn", "--target", "arm", "--max-samples", "2",
                 "-o", str(out)]) == 0
    verify = json.loads((out / "report.json").read_text())["verify"]
    assert verify["emulated"] == "qemu-aarch64"
    assert verify["relative_error"] <= 1e-5

    image = digits_data()["input"][:1]
    np.save(tmp_path / "image.npy", image)
    outputs = tmp_path / "outputs.npz"
    assert main(["run", str(out), "--input", f"input={tmp_path / 'image.npy'}",
                 "-o", str(outputs)]) == 0
    graph = load_model("zoo:digits-cnn").graph
    expected = executor.run(graph, {"input": image})[graph.outputs[0].name]
    actual = np.load(outputs)[graph.outputs[0].name]
    assert relative_error(expected, actual) <= 1e-5
