"""Run an aarch64 artifact on a host of another architecture, under qemu-aarch64.

1. Read the artifact folder and check that its target is aarch64, that model.so is aarch64
   code exporting TVM's entry points, and that the feeds match its inputs.
2. Write the inputs, then the weights in the order ``main`` takes them, as .npy files.
3. Run the cross-compiled runner (runner.cc) under qemu; it writes one .npy per output.
4. Read the outputs back and check them against the manifest.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from graphcomp.errors import ArtifactError, BackendError

from ..artifact import ArtifactContents, check_feeds, read_artifact, read_manifest
from .elf import EM_AARCH64, read_header, read_symbols
from .runtime import EmulationRuntime, prepare_runtime

logger = logging.getLogger(__name__)

# The serialized Relax VM executable that vm_load_executable reads. Each compiled kernel is
# exported next to it as a function named __tvm_ffi_<kernel>.
LIBRARY_BLOB_SYMBOL = "__tvm_ffi__library_bin"
KERNEL_SYMBOL_PREFIX = "__tvm_ffi_"
RUN_TIMEOUT_S = 600


def is_aarch64_target(target_json: Mapping) -> bool:
    """Return whether a TVM target JSON (an artifact manifest's) builds aarch64 code."""
    return str(target_json.get("mtriple", "")).startswith("aarch64")


def needs_emulation(path: Path) -> bool:
    """Return whether the artifact at ``path`` is aarch64 code and this host is not aarch64,
    so that ``run_artifact`` and not ``load_artifact(...).run`` runs it."""
    manifest = read_manifest(Path(path))
    host_is_aarch64 = platform.machine().lower() in ("aarch64", "arm64")
    return is_aarch64_target(manifest["target"]["json"]) and not host_is_aarch64


def check_aarch64_library(path: Path) -> list[str]:
    """Check that ``path`` is an aarch64 shared library with TVM's entry points; return the
    names of its kernel functions. Raises ArtifactError naming what is wrong."""
    data = Path(path).read_bytes()
    try:
        header = read_header(data)
        symbols = read_symbols(data, dynamic=True)
    except ValueError as exc:
        raise ArtifactError(f"{path}: not a readable 64-bit ELF library: {exc}") from exc
    if header.machine != EM_AARCH64:
        raise ArtifactError(
            f"{path}: ELF machine is {header.machine}, expected {EM_AARCH64} (aarch64); "
            "build the model again for target 'arm'"
        )
    exported = {symbol.name: symbol for symbol in symbols if symbol.defined}
    if LIBRARY_BLOB_SYMBOL not in exported:
        raise ArtifactError(
            f"{path}: symbol {LIBRARY_BLOB_SYMBOL} is missing, so the library contains no "
            "Relax VM executable; export the model again"
        )
    kernels = [
        name.removeprefix(KERNEL_SYMBOL_PREFIX)
        for name, symbol in exported.items()
        if symbol.kind == "func" and name.startswith(KERNEL_SYMBOL_PREFIX)
    ]
    return sorted(kernels)


def run_artifact(
    path: Path,
    feeds: Mapping[str, np.ndarray],
    runtime: EmulationRuntime | None = None,
    timeout_s: float = RUN_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """Run an aarch64 artifact under qemu-aarch64 and return its outputs by name.

    ``runtime`` defaults to ``prepare_runtime()``, which may download the aarch64 TVM wheels
    on first use. Raises ArtifactError for an artifact that is not aarch64 or is corrupt,
    ShapeError for wrong feeds, EmulatorUnavailableError when a tool is missing, and
    BackendError when the runner fails or times out.
    """
    contents = read_artifact(Path(path))
    target_json = contents.manifest["target"]["json"]
    if not is_aarch64_target(target_json):
        raise ArtifactError(
            f"{contents.folder} is built for target '{contents.target_name}', not aarch64; "
            "run it with load_artifact(path).run(feeds)"
        )
    check_aarch64_library(contents.library_path)
    check_feeds(contents.inputs, feeds)
    runtime = runtime if runtime is not None else prepare_runtime()

    with tempfile.TemporaryDirectory(prefix="graphcomp-aarch64-") as scratch:
        folder = Path(scratch)
        arguments = _write_arguments(folder, contents, feeds)
        _run_runner(runtime, [str(contents.library_path), str(folder), *arguments], timeout_s)
        return _read_outputs(folder, contents)


def _write_arguments(folder: Path, contents: ArtifactContents,
                     feeds: Mapping[str, np.ndarray]) -> list[str]:
    arrays = [feeds[spec.name] for spec in contents.inputs] + list(contents.weights.values())
    paths = []
    for index, array in enumerate(arrays):
        path = folder / f"argument_{index}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        paths.append(str(path))
    return paths


def _run_runner(runtime: EmulationRuntime, arguments: list[str], timeout_s: float) -> None:
    command = runtime.command(arguments)
    # The .npy arguments live in a folder deleted on return; the message leaves them out.
    command_text = " ".join(command[:5]) + " OUT_DIR ARG.npy..."
    started = time.perf_counter()
    try:
        result = subprocess.run(command, env=runtime.environment(), capture_output=True,
                                text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BackendError(
            f"the aarch64 runner timed out after {timeout_s} s under qemu: {command_text}"
        ) from exc
    if result.returncode != 0:
        raise BackendError(
            f"the aarch64 runner failed with exit code {result.returncode} under qemu: "
            f"{result.stderr.strip()[-2000:]}\ncommand: {command_text}"
        )
    logger.info("ran the aarch64 artifact under qemu in %.2f s", time.perf_counter() - started)


def _read_outputs(folder: Path, contents: ArtifactContents) -> dict[str, np.ndarray]:
    written = list(folder.glob("output_*.npy"))
    if len(written) != len(contents.outputs):
        raise ArtifactError(
            f"{contents.library_path} returned {len(written)} outputs, the manifest lists "
            f"{len(contents.outputs)}"
        )
    outputs = {}
    for index, spec in enumerate(contents.outputs):
        array = np.load(folder / f"output_{index}.npy", allow_pickle=False)
        if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            raise ArtifactError(
                f"{contents.library_path}: output '{spec.name}' is "
                f"{array.dtype}{list(array.shape)}, the manifest says "
                f"{spec.dtype}{list(spec.shape)}"
            )
        outputs[spec.name] = array
    return outputs
