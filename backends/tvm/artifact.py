"""The artifact folder: a compiled library, its weights and a manifest that describes both.

Layout of a folder written by ``write_artifact``:

- ``model.so``: the library from TVM's ``export_library``; its ``main`` takes the inputs,
  then the weights, and returns a tuple of the outputs.
- ``weights.npz``: one array per weight, named as in the graph.
- ``manifest.json``: the format name and version, graphcomp and TVM versions, the target
  (name and TVM target JSON), and the inputs, outputs and weights (name, shape, dtype), the
  weights in the order ``main`` takes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

import graphcomp
from graphcomp.errors import ArtifactError, BackendError, ShapeError
from graphcomp.index_ranges import IndexRange

from .lower import TensorSpec
from .targets import check_runs_here

if TYPE_CHECKING:
    from .model import BuiltModel

logger = logging.getLogger(__name__)

FORMAT_NAME = "graphcomp-tvm-artifact"
FORMAT_VERSION = 1
LIBRARY_FILE = "model.so"
WEIGHTS_FILE = "weights.npz"
MANIFEST_FILE = "manifest.json"
ARM_COMPILER = "aarch64-linux-gnu-gcc"


def write_artifact(model: "BuiltModel", out_dir: Path) -> None:
    """Write model.so, weights.npz and manifest.json into ``out_dir`` (created if missing)."""
    import tvm

    out_dir.mkdir(parents=True, exist_ok=True)
    library_path = write_library(model, out_dir)
    _save_npz(out_dir / WEIGHTS_FILE, model.weights)
    weight_specs = [
        TensorSpec(name, tuple(array.shape), str(array.dtype))
        for name, array in model.weights.items()
    ]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "graphcomp_version": graphcomp.__version__,
        "tvm_version": tvm.__version__,
        "target": {"name": model.target_name, "json": model.target_json},
        # Checked before loading: a truncated library crashes the process inside dlopen.
        "library": {"file": LIBRARY_FILE, **_file_digest(library_path)},
        "inputs": [spec.to_json() for spec in model.inputs],
        "outputs": [spec.to_json() for spec in model.outputs],
        "weights": [spec.to_json() for spec in weight_specs],
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("wrote artifact for target %s to %s", model.target_name, out_dir)


def write_library(model: "BuiltModel", out_dir: Path) -> Path:
    """Export the model's compiled library to ``out_dir/model.so`` and return its path."""
    path = out_dir / LIBRARY_FILE
    if model.library_path is not None:
        # A model loaded from an artifact: its library file is already the export.
        if model.library_path.resolve() != path.resolve():
            shutil.copyfile(model.library_path, path)
        return path

    options: dict[str, Any] = {}
    kind = model.target.kind.name
    if kind == "cuda":
        from .cuda_binary import fpack_imports_with_fatbins

        options["fpack_imports"] = fpack_imports_with_fatbins(model.target)
    elif str(model.target.attrs.get("mtriple", "")).startswith("aarch64"):
        if shutil.which(ARM_COMPILER) is None:
            raise BackendError(
                f"exporting for target '{model.target_name}' needs the cross compiler "
                f"{ARM_COMPILER}; install Debian's gcc-aarch64-linux-gnu package"
            )
        options["cc"] = ARM_COMPILER
    try:
        with capture_native_stderr():
            model.library.export_library(str(path), **options)
    except BackendError:
        raise
    except Exception as exc:  # compiler and linker failures surface as several types
        raise BackendError(f"exporting the library to {path} failed: {exc}") from exc
    return path


@contextlib.contextmanager
def capture_native_stderr():
    """Keep what native code writes to file descriptor 2 off the terminal and log it at debug
    level. TVM 0.27's VM executable writes a "Scope Saving" warning per function there while
    a library is exported."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace").strip()
            if text:
                logger.debug("native output while exporting:\n%s", text)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # np.savez takes names as keyword arguments, so a weight named "file" or "allow_pickle"
    # would collide with its parameters; write the same zip layout directly.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


@dataclasses.dataclass
class ArtifactContents:
    """An artifact folder's manifest, tensor specs and weights, checked against each other
    but with the library neither loaded nor checked against this host."""

    folder: Path
    manifest: dict[str, Any]
    target_name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: dict[str, np.ndarray]

    @property
    def library_path(self) -> Path:
        return self.folder / LIBRARY_FILE


def read_artifact(path: Path) -> ArtifactContents:
    """Read an artifact folder without loading its library, for any target.

    Raises ArtifactError when a file is missing, the manifest is corrupt or of another
    format version, or the weights do not match it.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    return ArtifactContents(
        folder=folder,
        manifest=manifest,
        target_name=manifest["target"]["name"],
        inputs=[_spec(folder, item) for item in manifest["inputs"]],
        outputs=[_spec(folder, item) for item in manifest["outputs"]],
        weights=_load_weights(folder, manifest),
    )


def load_artifact(path: Path) -> "BuiltModel":
    """Load an artifact folder written by ``BuiltModel.export``.

    Raises ArtifactError when a file is missing, the manifest is corrupt or of another
    format version, the weights do not match it, or its target cannot run on this host.
    """
    import tvm

    from .model import BuiltModel

    contents = read_artifact(path)
    folder = contents.folder
    target = _manifest_target(folder, contents.manifest)
    check_runs_here(target, f"artifact {folder} (target '{contents.target_name}')")
    _check_library_digest(contents.library_path, contents.manifest)
    try:
        with capture_native_stderr():
            library = tvm.runtime.load_module(str(contents.library_path))
    except Exception as exc:  # the loader reports bad files with several exception types
        raise ArtifactError(
            f"{contents.library_path}: cannot load the library: {exc}"
        ) from exc

    return BuiltModel(
        library=library,
        target_name=contents.target_name,
        target=target,
        inputs=contents.inputs,
        outputs=contents.outputs,
        weights=contents.weights,
        library_path=contents.library_path,
    )


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _check_library_digest(path: Path, manifest: dict[str, Any]) -> None:
    expected = manifest.get("library")
    if not isinstance(expected, dict) or "sha256" not in expected:
        raise ArtifactError(
            f"{path.parent / MANIFEST_FILE}: no library checksum; export the artifact again "
            "with this graphcomp version"
        )
    actual = _file_digest(path)
    if actual != {"bytes": expected.get("bytes"), "sha256": expected["sha256"]}:
        recorded = expected.get("bytes")
        if actual["bytes"] == recorded:
            size = "the size is unchanged"
        elif isinstance(recorded, int) and actual["bytes"] < recorded:
            size = f"truncated to {actual['bytes']} of {recorded} bytes"
        else:
            size = f"{actual['bytes']} bytes, the manifest records {recorded}"
        raise ArtifactError(
            f"{path} does not match the checksum in {MANIFEST_FILE}: the file changed after "
            f"compile ({size}); compile the model again"
        )


def check_feeds(inputs: list[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Raise ShapeError unless ``feeds`` has exactly ``inputs``, with their shapes and dtypes."""
    expected = [spec.name for spec in inputs]
    missing = [name for name in expected if name not in feeds]
    unexpected = [name for name in feeds if name not in expected]
    if missing or unexpected:
        raise ShapeError(
            f"the model expects inputs {expected}; missing {missing}, unexpected {unexpected}"
        )
    for spec in inputs:
        array = np.asarray(feeds[spec.name])
        if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            raise ShapeError(
                f"input '{spec.name}' is {array.dtype}{list(array.shape)}, but the model "
                f"expects {spec.dtype}{list(spec.shape)}"
            )


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; raises ArtifactError naming the fault."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found")
    required = (LIBRARY_FILE, WEIGHTS_FILE, MANIFEST_FILE)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ArtifactError(
            f"{folder}: artifact is missing {', '.join(missing)}; export the model again"
        )
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: corrupt manifest, not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: corrupt manifest, expected a JSON object")

    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{manifest_path}: not a graphcomp TVM artifact (format is "
            f"{manifest.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: artifact format version {manifest.get('format_version')!r} is "
            f"not supported; this graphcomp reads version {FORMAT_VERSION}. Export the model "
            "again with this graphcomp version."
        )
    _check_fields(manifest_path, manifest)
    _warn_on_version_change(manifest_path, manifest)
    return manifest


def _check_fields(manifest_path: Path, manifest: dict[str, Any]) -> None:
    expected = {
        "graphcomp_version": str,
        "tvm_version": str,
        "target": dict,
        "inputs": list,
        "outputs": list,
        "weights": list,
    }
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(
                f"{manifest_path}: corrupt manifest, field '{key}' is missing or not a "
                f"{kind.__name__}"
            )
    target = manifest["target"]
    if not isinstance(target.get("name"), str) or not isinstance(target.get("json"), dict):
        raise ArtifactError(
            f"{manifest_path}: corrupt manifest, 'target' needs a 'name' and a 'json' object"
        )


# Manifests already warned about, so that a command reading one twice warns once.
_warned_manifests: set[tuple[Path, str, str]] = set()


def _warn_on_version_change(manifest_path: Path, manifest: dict[str, Any]) -> None:
    import tvm

    key = (manifest_path.resolve(), manifest["graphcomp_version"], manifest["tvm_version"])
    if key in _warned_manifests:
        return
    _warned_manifests.add(key)
    if manifest["graphcomp_version"] != graphcomp.__version__:
        logger.warning(
            "%s was written by graphcomp %s; this is graphcomp %s",
            manifest_path, manifest["graphcomp_version"], graphcomp.__version__,
        )
    if manifest["tvm_version"] != tvm.__version__:
        logger.warning(
            "%s was built with TVM %s; this runtime is TVM %s",
            manifest_path, manifest["tvm_version"], tvm.__version__,
        )


def record_index_ranges(folder: Path, ranges: list[IndexRange]) -> None:
    """Add the valid ranges of the model's index inputs (see ``graphcomp.index_ranges``) to
    the manifest in ``folder``, for ``graphcomp run`` to check its inputs against."""
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["index_ranges"] = [item.to_json() for item in ranges]
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_index_ranges(folder: Path) -> list[IndexRange]:
    """Return the index input ranges in the manifest of the artifact in ``folder``; none for
    an artifact exported without them (``BuiltModel.export`` records none). Call it after
    ``read_manifest`` has checked the manifest."""
    path = folder / MANIFEST_FILE
    items = json.loads(path.read_text()).get("index_ranges", [])
    try:
        return [IndexRange.from_json(item) for item in items]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: corrupt manifest, bad 'index_ranges' entry ({type(exc).__name__}: {exc})"
        ) from exc


def _manifest_target(folder: Path, manifest: dict[str, Any]):
    from tvm.target import Target

    try:
        return Target(manifest["target"]["json"])
    except Exception as exc:  # TVM rejects bad target JSON with several exception types
        raise ArtifactError(
            f"{folder / MANIFEST_FILE}: invalid target JSON {manifest['target']['json']}: {exc}"
        ) from exc


def _spec(folder: Path, item: Any) -> TensorSpec:
    try:
        return TensorSpec(str(item["name"]), tuple(int(d) for d in item["shape"]),
                          str(np.dtype(item["dtype"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{folder / MANIFEST_FILE}: corrupt manifest, bad tensor entry {item!r}: {exc}"
        ) from exc


def _load_weights(folder: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    path = folder / WEIGHTS_FILE
    specs = [_spec(folder, item) for item in manifest["weights"]]
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: cannot read the weights: {exc}") from exc

    expected = [spec.name for spec in specs]
    if sorted(stored) != sorted(expected):
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        raise ArtifactError(
            f"{path}: weights do not match the manifest; missing {missing}, "
            f"unexpected {unexpected}"
        )
    for spec in specs:
        array = stored[spec.name]
        if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            raise ArtifactError(
                f"{path}: weight '{spec.name}' is {array.dtype}{list(array.shape)}, the "
                f"manifest says {spec.dtype}{list(spec.shape)}"
            )
    return {spec.name: stored[spec.name] for spec in specs}
