"""The TVM backend end to end: build for this CPU, run, export an artifact, load it back, and
reject bad artifacts and bad inputs; CUDA and ARM builds on a machine without their hardware.

Tolerances: a small hand-made graph must match the reference executor to 1e-5 relative to
the output scale (max |expected|), a real model to 1e-4; the 1-channel convolutions must
match PyTorch to a max abs error of 1e-5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from graphcomp import executor
from graphcomp.errors import ArtifactError, BackendError, OptionError, ShapeError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.ops import registry
from graphcomp.shapes import infer_shapes

tvm = pytest.importorskip("tvm")
from graphcomp.backends.tvm import (  # noqa: E402
    build,
    list_targets,
    load_artifact,
    lower_to_relax,
    resolve_target,
)
from graphcomp.backends.tvm.cuda_binary import fatbin_architectures  # noqa: E402
from graphcomp.backends.tvm.gpu import _apply_first_rule, gpu_schedule_rules  # noqa: E402

RNG = np.random.default_rng(7)


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual - expected))) / scale


def weight(name: str, *shape, scale: float = 0.3) -> Constant:
    return Constant(name, (RNG.standard_normal(shape) * scale).astype(np.float32))


def small_cnn() -> Graph:
    """x[1,3,16,16] -> conv 3x3 (8) -> batch_norm -> relu -> max_pool 2x2 -> global_avg_pool
    -> flatten -> linear (10) -> logits[1,10]."""
    x = Value("x", (1, 3, 16, 16))
    conv, bn, relu, pool, gap, flat, logits = (Value(n, ()) for n in (
        "conv", "bn", "relu", "pool", "gap", "flat", "logits"))
    stats = [weight("bn.scale", 8), weight("bn.bias", 8), weight("bn.mean", 8),
             Constant("bn.var", RNG.uniform(0.5, 2.0, 8).astype(np.float32))]
    nodes = [
        Node("conv", "conv2d", [x, weight("conv.w", 8, 3, 3, 3), weight("conv.b", 8)], [conv],
             {"pads": [1, 1, 1, 1]}),
        Node("bn", "batch_norm", [conv, *stats], [bn], {"eps": 1e-5}),
        Node("relu", "relu", [bn], [relu]),
        Node("pool", "max_pool2d", [relu], [pool], {"kernel": [2, 2]}),
        Node("gap", "global_avg_pool", [pool], [gap]),
        Node("flatten", "flatten", [gap], [flat], {"axis": 1}),
        Node("fc", "linear", [flat, weight("fc.w", 10, 8), weight("fc.b", 10)], [logits]),
    ]
    graph = Graph("small_cnn", [x], [logits], nodes)
    infer_shapes(graph)
    return graph


@pytest.fixture(scope="module")
def cnn():
    graph = small_cnn()
    feeds = {"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    return graph, feeds, executor.run(graph, feeds)


@pytest.fixture(scope="module")
def cnn_model(cnn):
    return build(cnn[0], "cpu")


@pytest.fixture
def artifact(cnn_model, tmp_path) -> Path:
    folder = tmp_path / "artifact"
    cnn_model.export(folder)
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


# --- build, run, export, load ---------------------------------------------------------------


def test_weights_become_main_parameters(cnn):
    graph = cnn[0]
    main = lower_to_relax(graph)["main"]
    names = [param.name for param in main.params]
    assert names[0] == "x"
    assert sorted(names[1:]) == sorted(c.name.replace(".", "_") for c in graph.constants())


def test_build_matches_reference(cnn, cnn_model):
    _, feeds, expected = cnn
    actual = cnn_model.run(feeds)
    assert list(actual) == ["logits"]
    assert relative_error(expected["logits"], actual["logits"]) <= 1e-5


def test_benchmark_returns_milliseconds(cnn, cnn_model):
    milliseconds = cnn_model.benchmark(cnn[1], number=2, repeat=3)
    assert 0 < milliseconds < 1000


def test_export_writes_artifact(cnn, artifact):
    assert sorted(p.name for p in artifact.iterdir()) == [
        "manifest.json", "model.so", "weights.npz"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format"] == "graphcomp-tvm-artifact"
    assert manifest["format_version"] == 1
    assert manifest["target"]["name"] == "cpu"
    assert manifest["target"]["json"]["kind"] == "llvm"
    assert manifest["tvm_version"] == tvm.__version__
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    weight_names = [item["name"] for item in manifest["weights"]]
    with np.load(artifact / "weights.npz") as stored:
        assert sorted(stored.files) == sorted(weight_names)
    graph_constants = {c.name: c.data for c in cnn[0].constants()}
    assert set(weight_names) == set(graph_constants)


def test_loaded_artifact_matches_reference(cnn, artifact):
    _, feeds, expected = cnn
    model = load_artifact(artifact)
    actual = model.run(feeds)
    assert relative_error(expected["logits"], actual["logits"]) <= 1e-5


def test_loaded_artifact_exports_again(cnn, artifact, tmp_path):
    copy = tmp_path / "copy"
    load_artifact(artifact).export(copy)
    actual = load_artifact(copy).run(cnn[1])
    assert relative_error(cnn[2]["logits"], actual["logits"]) <= 1e-5


def test_weight_names_needing_care_round_trip(tmp_path):
    # "file" collides with np.savez's parameter; "a/b" becomes a folder inside the zip.
    x, y, z = Value("x", (2, 4)), Value("y", ()), Value("z", ())
    nodes = [Node("fc", "linear", [x, weight("file", 3, 4)], [y]),
             Node("add", "add", [y, weight("a/b", 3)], [z])]
    graph = Graph("names", [x], [z], nodes)
    infer_shapes(graph)
    feeds = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}
    build(graph).export(tmp_path / "names")
    actual = load_artifact(tmp_path / "names").run(feeds)
    assert relative_error(executor.run(graph, feeds)["z"], actual["z"]) <= 1e-5


def relu_graph() -> Graph:
    x, y = Value("x", (2, 3)), Value("y", ())
    graph = Graph("relu", [x], [y], [Node("act", "relu", [x], [y])])
    infer_shapes(graph)
    return graph


def replace_relu_lowering(monkeypatch, lowering) -> None:
    op = registry.get_op("relu")
    monkeypatch.setitem(registry._REGISTRY, "relu", dataclasses.replace(op, relax=lowering))


def test_lowering_failure_names_node(monkeypatch):
    def broken(node, x):
        raise ValueError("bad attribute")

    replace_relu_lowering(monkeypatch, broken)
    with pytest.raises(BackendError, match=r"lowering node 'act' \(op relu\).*bad attribute"):
        lower_to_relax(relu_graph())


def test_lowering_with_wrong_shape_rejected(monkeypatch):
    replace_relu_lowering(monkeypatch, lambda node, x: tvm.relax.op.reshape(x, (3, 2)))
    with pytest.raises(BackendError, match=r"gives float32\[3,2\] for output 'y'.*float32\[2,3\]"):
        lower_to_relax(relu_graph())


# --- bad artifacts and bad inputs -------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.so", "weights.npz", "manifest.json"])
def test_load_rejects_missing_file(artifact, name):
    (artifact / name).unlink()
    with pytest.raises(ArtifactError, match=f"missing {name}"):
        load_artifact(artifact)


def test_load_rejects_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        load_artifact(tmp_path / "nowhere")


def test_load_rejects_corrupt_manifest(artifact):
    (artifact / "manifest.json").write_text('{"format": "graphcomp-tvm-artifact", ')
    with pytest.raises(ArtifactError, match="corrupt manifest, not valid JSON"):
        load_artifact(artifact)


def test_load_rejects_manifest_without_inputs(artifact):
    edit_manifest(artifact, inputs=None)
    with pytest.raises(ArtifactError, match="field 'inputs' is missing"):
        load_artifact(artifact)


def test_load_rejects_other_format_version(artifact):
    edit_manifest(artifact, format_version=99)
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        load_artifact(artifact)


def test_load_rejects_other_format(artifact):
    edit_manifest(artifact, format="onnx")
    with pytest.raises(ArtifactError, match="not a graphcomp TVM artifact"):
        load_artifact(artifact)


def test_load_rejects_aarch64_target_on_x86(artifact):
    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this host is aarch64")
    edit_manifest(artifact, target={"name": "arm", "json": list_targets()["arm"]})
    with pytest.raises(ArtifactError, match="built for aarch64"):
        load_artifact(artifact)


def test_load_rejects_cuda_target_without_gpu(artifact):
    if tvm.cuda(0).exist:
        pytest.skip("this host has a CUDA GPU")
    edit_manifest(artifact, target={"name": "cuda", "json": list_targets()["cuda:sm_80"]})
    with pytest.raises(ArtifactError, match="built for a CUDA GPU, and this host has none"):
        load_artifact(artifact)


def test_load_rejects_missing_cpu_features(artifact):
    from tvm.target import codegen

    cpu = resolve_target("cpu")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 host")
    if "amx-tile" in codegen.llvm_get_cpu_features(cpu):
        pytest.skip("this host has AMX, which code for graniterapids may use")
    json_target = {"kind": "llvm", "mcpu": "graniterapids", "num-cores": 2}
    edit_manifest(artifact, target={"name": "cpu", "json": json_target})
    with pytest.raises(ArtifactError, match="needs CPU features this host lacks: .*amx-tile"):
        load_artifact(artifact)


def test_load_rejects_weights_not_in_manifest(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["weights"][0]["shape"] = [99]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"weight '{manifest['weights'][0]['name']}'"):
        load_artifact(artifact)


def test_load_rejects_corrupt_library(artifact):
    (artifact / "model.so").write_bytes(b"not a shared library")
    with pytest.raises(ArtifactError, match="does not match the checksum in manifest.json"):
        load_artifact(artifact)


def test_load_rejects_truncated_library(artifact):
    # dlopen of a truncated library crashes the process, so the checksum must catch it first.
    library = artifact / "model.so"
    library.write_bytes(library.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"truncated to 1000 of \d+ bytes"):
        load_artifact(artifact)


def test_load_rejects_unloadable_library(artifact):
    # A library whose checksum matches the manifest but which the loader rejects.
    library = artifact / "model.so"
    library.write_bytes(b"not a shared library")
    manifest = json.loads((artifact / "manifest.json").read_text())
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    manifest["library"] = {"file": "model.so", "bytes": library.stat().st_size, "sha256": digest}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot load the library"):
        load_artifact(artifact)


def test_run_rejects_wrong_input_name(cnn_model):
    with pytest.raises(ShapeError, match=r"missing \['x'\], unexpected \['image'\]"):
        cnn_model.run({"image": np.zeros((1, 3, 16, 16), np.float32)})


def test_run_rejects_wrong_input_shape(artifact):
    model = load_artifact(artifact)
    given_and_expected = r"input 'x' is float32\[1, 3, 8, 8\].*float32\[1, 3, 16, 16\]"
    with pytest.raises(ShapeError, match=given_and_expected):
        model.run({"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_run_rejects_wrong_input_dtype(cnn_model):
    with pytest.raises(ShapeError, match=r"input 'x' is float64"):
        cnn_model.run({"x": np.zeros((1, 3, 16, 16), np.float64)})


# --- targets ----------------------------------------------------------------------------------


def test_cpu_target_describes_host():
    from tvm.target import codegen

    target = resolve_target("cpu")
    assert target.kind.name == "llvm"
    assert target.attrs["mcpu"] == codegen.llvm_get_system_cpu()
    assert int(target.attrs["num-cores"]) == os.cpu_count()


def test_named_targets():
    assert str(resolve_target("cuda:sm_86").attrs["arch"]) == "sm_86"
    if not tvm.cuda(0).exist:
        assert str(resolve_target("cuda").attrs["arch"]) == "sm_80"
    assert str(resolve_target("arm").attrs["mtriple"]) == "aarch64-linux-gnu"
    targets = list_targets()
    assert {"cpu", "cuda", "arm"} <= set(targets)
    assert json.loads(json.dumps(targets)) == targets


@pytest.mark.parametrize("name", ["tpu", "cuda:80", "cuda:"])
def test_unknown_target_rejected(name):
    with pytest.raises(OptionError, match="target|architecture"):
        resolve_target(name)


def test_arm_build_cannot_run_here(cnn):
    model = build(cnn[0], "arm")
    with pytest.raises(BackendError, match="cannot run here: it was built for aarch64"):
        model.run(cnn[1])


def test_arm_export_needs_cross_compiler(cnn, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("the aarch64 cross compiler is installed")
    with pytest.raises(BackendError, match="needs the cross compiler aarch64-linux-gnu-gcc"):
        build(cnn[0], "arm").export(tmp_path / "arm")


# --- 1-channel convolutions with 1x2 and 3x1 kernels, for CPU and CUDA ------------------------

TINY_CONVS = [((1, 1, 3, 10), (1, 2)), ((1, 1, 8, 10), (1, 2)), ((2, 1, 4, 20), (3, 1))]


def tiny_conv(input_shape, kernel) -> tuple[Graph, torch.nn.Conv2d]:
    module = torch.nn.Conv2d(1, 1, kernel, bias=False).eval()
    x, y = Value("x", input_shape), Value("y", ())
    conv_weight = Constant("w", module.weight.detach().numpy().copy())
    graph = Graph("tiny_conv", [x], [y], [Node("conv", "conv2d", [x, conv_weight], [y])])
    infer_shapes(graph)
    return graph, module


def cuda_entry_format(library: bytes) -> bytes:
    """Return the format string of the CUDA module serialized in an exported library."""
    key = struct.pack("<Q", 4) + b"cuda"
    at = library.index(key) + len(key) + 8  # skip the type key and the payload length
    (length,) = struct.unpack_from("<Q", library, at)
    return library[at + 8:at + 8 + length]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("input_shape,kernel", TINY_CONVS)
def test_tiny_conv_cuda_library_has_sass(input_shape, kernel, tmp_path):
    graph, _ = tiny_conv(input_shape, kernel)
    build(graph, "cuda:sm_90").export(tmp_path)
    library = (tmp_path / "model.so").read_bytes()
    assert cuda_entry_format(library) == b"fatbin"
    assert ("sass", 90) in fatbin_architectures(library)
    assert ("ptx", 90) in fatbin_architectures(library)
    assert b"__global__" not in library  # CUDA C source is replaced by the fatbin


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_library_follows_requested_arch(tmp_path):
    graph, _ = tiny_conv(*TINY_CONVS[2])
    build(graph, "cuda:sm_75").export(tmp_path)
    architectures = fatbin_architectures((tmp_path / "model.so").read_bytes())
    assert sorted(architectures) == [("ptx", 75), ("sass", 75)]


def packed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def test_patch_entry_swaps_source_for_fatbin():
    from graphcomp.backends.tvm.cuda_binary import _patch_entry

    payload = packed(b"cuda") + b"KERNEL-TABLE" + packed(b"__global__ void k() {}")
    body = b"HEAD" + packed(b"cuda") + struct.pack("<Q", len(payload)) + payload + b"TAIL"
    blob = struct.pack("<Q", len(body)) + body

    patched = _patch_entry(blob, b"__global__ void k() {}", b"FATBIN")
    new_payload = packed(b"fatbin") + b"KERNEL-TABLE" + packed(b"FATBIN")
    new_body = b"HEAD" + packed(b"cuda") + struct.pack("<Q", len(new_payload)) + new_payload
    assert patched == struct.pack("<Q", len(new_body) + 4) + new_body + b"TAIL"


def test_patch_entry_rejects_unknown_layout():
    from graphcomp.backends.tvm.cuda_binary import _patch_entry

    blob = struct.pack("<Q", 8) + packed(b"cuda")
    with pytest.raises(BackendError, match="cannot find the CUDA kernel module"):
        _patch_entry(blob, b"__global__ void k() {}", b"FATBIN")


class RaisingRule:
    """A GPU schedule rule that always raises, as dlight's GEMV does on some kernels."""

    def apply(self, func, target, tunable):
        raise RuntimeError("rule broke")


def test_gpu_scheduling_skips_raising_rule(caplog):
    graph, _ = tiny_conv(*TINY_CONVS[0])
    target = resolve_target("cuda:sm_80")
    with target:
        module = tvm.relax.transform.LegalizeOps()(lower_to_relax(graph))
    kernel = next(f for _, f in module.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    scheduled = _apply_first_rule("conv", kernel, target, [RaisingRule(),
                                                           *gpu_schedule_rules()])
    assert scheduled is not None
    assert int(scheduled.attrs["tirx.is_scheduled"]) == 1
    assert "RaisingRule failed on kernel 'conv'" in caplog.text


# --- a real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ppocr_cls_artifact_matches_reference(tmp_path):
    onnx_frontend = pytest.importorskip("graphcomp.frontends.onnx_frontend")
    from graphcomp.zoo import PPOCR_SHAPES, ppocr_path

    graph = onnx_frontend.import_onnx(ppocr_path("cls"), PPOCR_SHAPES["cls"])
    feeds = {name: RNG.uniform(-1, 1, shape).astype(np.float32)
             for name, shape in PPOCR_SHAPES["cls"].items()}
    expected = executor.run(graph, feeds)
    build(graph, "cpu").export(tmp_path / "cls")
    actual = load_artifact(tmp_path / "cls").run(feeds)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert relative_error(expected[name], actual[name]) <= 1e-4
