"""The main job: import, run passes, build for a target, verify against the original, write.

``compile_model`` does these steps:

1. Reserve a staging folder next to the output folder (fails early if it cannot be written).
2. Pick the inputs: the user's dataset, the model's own real data (zoo models), or seeded
   random feeds.
3. Run the pass pipeline, verifying each pass with the reference executor.
4. With ``tune``: tune the final graph's kernels with MetaSchedule, reusing the records of
   the tuning database. Build the final graph with the TVM backend (and the tuned schedules).
5. ``verify``: the built artifact against the final graph in the reference executor (is the
   backend right?). ``drift``: the final graph against the original model (what did the passes
   cost?).
6. Time the original model and the artifact on the first batch.
7. Write the artifact, the final graph, report.json and report.html into the staging folder,
   then rename it to the output folder, so no partial output folder is ever left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphcomp import __version__, executor
from graphcomp.analysis import graph_stats
from graphcomp.data import Dataset, load_dataset, random_feeds, split_dataset
from graphcomp.errors import GraphcompError, OptionError, VerificationError
from graphcomp.ir import Graph
from graphcomp.index_ranges import check_index_inputs, index_ranges
from graphcomp.models_io import LoadedModel, load_model
from graphcomp.serialize import current_umask, format_graph, save_graph, write_text_atomic

log = logging.getLogger(__name__)

HOST_TARGETS = ("cpu",)
CALIBRATION_BATCHES = 32  # most dataset batches given to passes that calibrate
REPORT_NAME = "report.json"
# Errors of the file system rather than of graphcomp: a full disk or quota, a read-only file
# system, missing permissions, a file above the size limit.
WRITE_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
})


@dataclass
class CompileOptions:
    """Everything ``graphcomp compile`` can set besides the model and the output folder."""

    target: str = "cpu"
    passes: str | None = None  # None means the default pipeline
    input_shapes: dict[str, tuple[int, ...]] | None = None
    data: Path | None = None
    seed: int = 0
    samples: int = 2  # random batches when no dataset is given
    max_samples: int = 1000  # cap on dataset batches used for verification and accuracy
    tolerance: float = 1e-3  # relative to the output scale
    verify_passes: bool = True
    dump_dir: Path | None = None
    benchmark_repeat: int = 5
    tune: bool = False  # tune the kernels with MetaSchedule before building
    trials: int = 8  # tuning trials per task (kernel), on average
    trial_allocation: str = "time"  # "time", "flops": more trials for slow/heavy kernels; "even"
    tuning_db: Path | None = None  # tuning database folder; None is the user's cache folder
    rpc_tracker: str | None = None  # HOST:PORT of a TVM RPC tracker to measure on
    rpc_key: str | None = None  # device key registered at that tracker
    recover: Path | None = None  # .npz training data for distillation after the passes
    recover_epochs: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[str], None]
# Receives a label, the units done and the units in total from long work inside a pass.
WorkProgress = Callable[[str, int, int], None]
# Receives a graphcomp.backends.tvm.TuningProgress after each tuning batch.
TuningProgressCallback = Callable[[Any], None]


def compile_model(
    model: Any, out_dir: str | Path, options: CompileOptions | None = None,
    progress: Progress | None = None, tuning_progress: TuningProgressCallback | None = None,
    work_progress: WorkProgress | None = None,
) -> dict[str, Any]:
    """Compile ``model`` (a spec or a LoadedModel) into ``out_dir``; return the report."""
    from graphcomp.backends import tvm as tvm_backend
    from graphcomp.backends.tvm.artifact import record_index_ranges
    from graphcomp.inspect import PipelineTrace, pass_rows, trace_report
    from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager, parse_pipeline
    from graphcomp.report import write_report

    options = options or CompileOptions()
    step = progress or (lambda message: log.info("%s", message))
    out_dir = Path(out_dir)
    passes_text = DEFAULT_PIPELINE if options.passes is None else options.passes
    passes = parse_pipeline(passes_text)  # bad pass names fail before any slow work
    tvm_backend.resolve_target(options.target)
    tuning_options = _tuning_options(options)
    if options.dump_dir is not None:
        _check_dump_dir_apart(Path(options.dump_dir), out_dir)
        _prepare_dump_dir(Path(options.dump_dir))
    staging = reserve_output(out_dir)
    try:
        step("importing model")
        loaded = model if isinstance(model, LoadedModel) else load_model(
            model, options.input_shapes
        )
        original = loaded.graph
        dataset = _pick_dataset(loaded, options)
        ranges = index_ranges(original)
        for batch in dataset.batches:
            check_index_inputs(ranges, batch, dataset.source)
        calibration, dataset, data_split = split_calibration(dataset, passes)

        step(f"running passes: {passes_text or 'none'}")
        trace = PipelineTrace(original)
        manager = PassManager(
            passes, verify=options.verify_passes, tolerance=options.tolerance,
            feeds=calibration.batches[0], dump_dir=options.dump_dir,
            calibration=calibration.batches[:CALIBRATION_BATCHES], target=options.target,
            tuning_db=options.tuning_db,
            work_progress=work_progress, after_pass=trace.after_pass,
        )
        pipeline_report = manager.run(original)
        final = pipeline_report.graph
        recovery = None
        if options.recover is not None:
            step(f"recovering accuracy by distillation on {options.recover}")
            final, recovery = _recover(original, final, options)
            trace.add_step("recover", final)

        tuning = None
        if tuning_options is not None:
            step(f"tuning for target '{options.target}'")
            tuning = tvm_backend.tune(final, options.target, tuning_options, tuning_progress)
        step(f"building for target '{options.target}'")
        start = time.perf_counter()
        built = tvm_backend.build(
            final, options.target, tuning_database=tuning.database if tuning else None
        )
        build_seconds = time.perf_counter() - start

        report = _base_report(loaded, options, passes_text, original, final, dataset)
        report["data"].update(data_split)
        # The records of PipelineReport.to_dict(), with the totals and the nodes each pass
        # removed, added and changed; "nodes" has both graphs node by node for report.html.
        report["passes_run"] = pass_rows(trace)
        report["nodes"] = trace_report(trace)
        if recovery is not None:
            report["recovery"] = recovery
        report["build_seconds"] = round(build_seconds, 3)
        if tuning is not None:
            report["tuning"] = tuning.to_report()  # after the build, which counts applied tasks
        if options.target in HOST_TARGETS:
            step("verifying against the reference executor and the original model")
            _verify_and_measure(report, loaded, final, built, dataset, options)
        else:
            reason = f"target '{options.target}' does not run on this host"
            report["verify"] = {"skipped": reason}
            report["drift"] = _drift(loaded, final, dataset)
            report["latency_ms"] = {"skipped": reason}

        step(f"writing {out_dir}")
        built.export(staging)
        record_index_ranges(staging, index_ranges(final))
        if options.target not in HOST_TARGETS:
            _verify_emulated(report, final, staging, dataset, options)
        save_graph(final, staging / "graph.json")
        write_text_atomic(staging / "graph.txt", format_graph(final))
        report["artifact"] = str(out_dir)
        write_text_atomic(staging / REPORT_NAME, _to_json(report))
        write_report(staging)
        publish_output(staging, out_dir)
        return report
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in WRITE_ERRNOS:
            raise GraphcompError(
                f"{exc.filename or out_dir}: cannot write ({exc.strerror}); {out_dir} was left "
                "as it was. Free some space or choose a writable -o path"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _tuning_options(options: CompileOptions):
    """Return the backend's TuningOptions for ``options.tune``, else None; checks the RPC
    options first so that bad ones fail before any slow work."""
    from graphcomp.backends.tvm import RpcOptions, TuningOptions

    rpc = None
    if options.rpc_tracker is not None:
        rpc = RpcOptions.parse(options.rpc_tracker, options.rpc_key)
    elif options.rpc_key is not None:
        raise OptionError("--rpc-key needs --rpc-tracker HOST:PORT")
    if not options.tune:
        if rpc is not None:
            raise OptionError("--rpc-tracker measures tuning candidates; add --tune")
        return None
    tuning = TuningOptions(trials=options.trials, database=options.tuning_db, rpc=rpc,
                           allocation=options.trial_allocation)
    tuning.check()
    return tuning


def _recover(original: Graph, compressed: Graph, options: CompileOptions):
    """Fine-tune ``compressed`` against ``original`` (the teacher) on the --recover data."""
    from graphcomp.finetune import FinetuneOptions, finetune

    arrays = _read_training_arrays(Path(options.recover), original)
    result = finetune(compressed, original, arrays,
                      FinetuneOptions(epochs=options.recover_epochs, lr=1e-2))
    summary = {
        "data": str(options.recover),
        "examples": int(len(next(iter(arrays.values())))),
        "epochs": options.recover_epochs,
        "seconds": round(result.seconds, 3),
        "loss": result.loss,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }
    return result.graph, summary


def _read_training_arrays(path: Path, graph: Graph) -> dict[str, np.ndarray]:
    """Whole arrays (not batches) of a .npz file, checked as --data files are."""
    dataset = load_dataset(path, graph)
    arrays = {
        value.name: np.concatenate([batch[value.name] for batch in dataset.batches])
        for value in graph.inputs
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    return arrays


def split_calibration(dataset: Dataset, passes) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Return the calibration data, the verification data and their description for
    report.json.

    When a pass derives what it computes from data (quantize:int8 ranges, taylor pruning
    scores), measuring drift and accuracy on the same batches would flatter the result. The
    first half of the batches (at most ``CALIBRATION_BATCHES``) then calibrates, and the rest
    is held out for verify and drift. A single batch cannot be split, so it serves both, and
    the returned description carries a note about it.
    """
    users = [item.name for item in passes if item.uses_calibration()]
    if dataset.random and users:
        log.warning(
            "%s calibrate(s) on seeded random inputs, which are not representative of real "
            "inputs: ranges and scores fitted to them may not suit real data; give real samples "
            "with --data", ", ".join(users),
        )
    if not users:
        return dataset, dataset, {"calibration_batches": 0, "held_out": False}
    count = len(dataset.batches)
    if count < 2:
        note = (f"only {count} batch: calibration and verification use the same data, so drift "
                "and accuracy are optimistic; give at least 2 batches with --data")
        log.warning("%s", note)
        return dataset, dataset, {"calibration_batches": count, "held_out": False, "note": note}
    calibration, verification = split_dataset(dataset, min(CALIBRATION_BATCHES, count // 2))
    return calibration, verification, {
        "calibration_batches": len(calibration.batches), "held_out": True,
    }


def _pick_dataset(loaded: LoadedModel, options: CompileOptions) -> Dataset:
    if options.data is not None:
        return load_dataset(options.data, loaded.graph, options.max_samples)
    if loaded.default_data is not None:
        data = loaded.default_data
        return Dataset(data.batches[: options.max_samples], _cap_labels(data, options), data.source)
    log.warning(
        "no --data given: verifying on %d seeded random input batch(es), which say nothing "
        "about accuracy", options.samples,
    )
    return random_feeds(loaded.graph, options.seed, options.samples)


def _cap_labels(data: Dataset, options: CompileOptions):
    if data.labels is None:
        return None
    batch = len(data.labels) // max(len(data.batches), 1)
    return data.labels[: options.max_samples * batch]


def _base_report(loaded, options, passes_text, original, final, dataset) -> dict[str, Any]:
    return {
        "graphcomp_version": __version__,
        "model": loaded.source,
        "target": options.target,
        "passes": passes_text,
        "inputs": {v.name: {"shape": list(v.shape), "dtype": v.dtype} for v in final.inputs},
        "data": {"source": dataset.source, "batches": len(dataset.batches)},
        "graph": {
            "before": graph_stats(original).to_dict(),
            "after": graph_stats(final).to_dict(),
        },
    }


def _verify_and_measure(report, loaded, final, built, dataset, options) -> None:
    verify = ErrorStats()
    for feeds in dataset.batches:
        expected = executor.run(final, feeds)
        actual = built.run(feeds)
        for value in final.outputs:
            verify.add(expected[value.name], actual[value.name])
    report["verify"] = verify.to_dict()
    report["drift"] = _drift(loaded, final, dataset)
    if verify.mismatch:
        # Inputs are finite (load_dataset rejects NaN and infinity), so the NaN came from
        # inside the graph, where TVM's relu, clip and hardsigmoid turn NaN into numbers.
        raise VerificationError(
            "the built artifact and the reference executor disagree on NaN or infinite output "
            "values: one side computes NaN or infinity where the other has a number. This "
            "happens when the graph computes NaN from finite inputs (from an infinite weight "
            "or an overflow), which TVM's relu, clip and hardsigmoid turn into numbers. If "
            "the weights are finite, rerun with --passes none to isolate the op, and report "
            "the model"
        )
    if verify.relative_error > options.tolerance:
        raise VerificationError(
            f"the built artifact differs from the reference executor by "
            f"{verify.relative_error:.3g} (relative to the output scale), above the tolerance "
            f"{options.tolerance:g}; the backend lowered an op wrongly: rerun with "
            f"--passes none to isolate it, and report the model"
        )
    feeds = dataset.batches[0]
    report["latency_ms"] = {
        loaded.reference_name: round(loaded.time_reference(feeds, options.benchmark_repeat), 4),
        "graphcomp": round(built.benchmark(feeds, repeat=options.benchmark_repeat), 4),
    }


EMULATED_BATCHES = 4  # qemu runs take about 0.3 to 1 s each


def _verify_emulated(report, final: Graph, folder: Path, dataset: Dataset, options) -> None:
    """Verify an aarch64 artifact under qemu-aarch64 when this host can emulate it."""
    from graphcomp.backends.tvm.aarch64_runner import (
        EmulatorUnavailableError, needs_emulation, prepare_runtime, run_artifact,
    )

    if not needs_emulation(folder):
        return
    try:
        runtime = prepare_runtime()
    except EmulatorUnavailableError as exc:
        report["verify"] = {"skipped": f"cannot emulate aarch64 here: {exc}"}
        return
    verify = ErrorStats()
    for feeds in dataset.batches[:EMULATED_BATCHES]:
        expected = executor.run(final, feeds)
        actual = run_artifact(folder, feeds, runtime=runtime)
        for value in final.outputs:
            verify.add(expected[value.name], actual[value.name])
    report["verify"] = {**verify.to_dict(), "emulated": "qemu-aarch64",
                        "batches": min(len(dataset.batches), EMULATED_BATCHES)}
    if verify.mismatch or verify.relative_error > options.tolerance:
        raise VerificationError(
            f"the aarch64 artifact, run under qemu-aarch64, differs from the reference executor "
            f"by {verify.relative_error:.3g} (relative), above the tolerance {options.tolerance:g}"
        )


def _drift(loaded: LoadedModel, final: Graph, dataset: Dataset) -> dict[str, Any]:
    drift = ErrorStats()
    predictions, reference_predictions = [], []
    for feeds in dataset.batches:
        outputs = executor.run(final, feeds)
        reference = loaded.reference(feeds)
        for value, expected in zip(final.outputs, reference):
            drift.add(expected, outputs[value.name])
        first = outputs[final.outputs[0].name]
        predictions.append(first.reshape(first.shape[0], -1).argmax(axis=1))
        reference_predictions.append(reference[0].reshape(first.shape[0], -1).argmax(axis=1))
    if drift.nonfinite_on_both_sides:
        log.warning(
            "%d of %d output values are NaN or infinite in the original model and in the "
            "compiled graph alike; the error figures leave them out, so they show nothing "
            "about those values", drift.nonfinite_on_both_sides, drift.count,
        )
    result = drift.to_dict()
    if dataset.labels is not None:
        labels = dataset.labels
        result["accuracy"] = float(np.mean(np.concatenate(predictions) == labels))
        reference = np.concatenate(reference_predictions)
        result["reference_accuracy"] = float(np.mean(reference == labels))
    return result


class ErrorStats:
    """Accumulates error figures over batches and outputs: max and mean absolute error, the
    output scale (max |expected|), and the lowest cosine similarity of one output batch."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.scale = 0.0
        self.min_cosine = 1.0
        # NaN or infinite elements equal on both sides: they pass but prove nothing.
        self.nonfinite_on_both_sides = 0

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        expected = np.asarray(expected, np.float64)
        actual = np.asarray(actual, np.float64)
        if expected.shape != actual.shape:
            raise VerificationError(
                f"output shapes differ: expected {expected.shape}, got {actual.shape}"
            )
        # NaN where the other side has a number is an infinite error, so that a backend that
        # returns NaN (or loses the model's NaN) never passes; NaN on both sides agrees, and so
        # does the same infinity on both sides (inf - inf would be NaN).
        expected_nan, actual_nan = np.isnan(expected), np.isnan(actual)
        both = (expected_nan & actual_nan) | (np.isinf(expected) & (expected == actual))
        self.nonfinite_on_both_sides += int(both.sum())
        with np.errstate(invalid="ignore"):  # inf - inf, replaced where both agree
            diff = np.abs(np.where(both, 0.0, expected - actual))
        diff[expected_nan ^ actual_nan] = np.inf
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        finite = np.abs(expected[np.isfinite(expected)])
        self.scale = max(self.scale, float(finite.max(initial=0.0)))
        expected, actual = np.where(both, 0.0, expected), np.where(both, 0.0, actual)
        norms = np.linalg.norm(expected) * np.linalg.norm(actual)
        if not np.isfinite(norms):
            self.min_cosine = float("nan")
        elif norms > 0:
            cosine = float(expected.ravel() @ actual.ravel() / norms)
            self.min_cosine = min(self.min_cosine, cosine)

    @property
    def relative_error(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    @property
    def mismatch(self) -> bool:
        """True when an error is infinite or NaN, which no tolerance accepts."""
        return not np.isfinite(self.max_abs) or np.isnan(self.min_cosine)

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.count, 1),
            "output_scale": self.scale,
            "relative_error": self.relative_error,
            "cosine": self.min_cosine,
        }


def _to_json(report: dict[str, Any]) -> str:
    import json

    def default(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot write {type(value).__name__} to report.json")

    return json.dumps(_finite(report), indent=2, default=default, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    """Replace NaN and infinity, which JSON cannot hold, by the strings "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return str(float(value))
    return value


# --- output folders ---------------------------------------------------------------------------


def reserve_output(out_dir: Path) -> Path:
    """Create an empty staging folder beside ``out_dir``; check ``out_dir`` may be replaced."""
    if out_dir.resolve() == Path(out_dir.resolve().anchor) or out_dir.resolve() == Path.cwd():
        raise GraphcompError(
            f"{out_dir}: the output folder would replace the current folder or the file "
            "system root; choose a new folder such as out/model"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise GraphcompError(f"{out_dir}: exists and is not a folder; choose another -o path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_graphcomp_output(out_dir):
        raise GraphcompError(
            f"{out_dir}: folder exists and is not a graphcomp output (no manifest.json written "
            "by graphcomp); choose an empty or new folder"
        )
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        # The process id in the name lets a later run check whether this folder's run is gone.
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.",
                                        suffix=".tmp", dir=parent))
        # mkdtemp makes the folder private; the artifact gets the usual permissions instead.
        staging.chmod(0o777 & ~current_umask())
        return staging
    except OSError as exc:
        raise GraphcompError(
            f"{out_dir}: cannot write the output folder ({exc.strerror}); choose a writable -o path"
        ) from None


def remove_stale_staging(out_dir: Path) -> None:
    """Clean up after compiles into ``out_dir`` that were killed (SIGKILL, power loss).

    Their staging folders (``.NAME.PID.*.tmp``) are removed. A replaced output folder
    (``.NAME.PID.old``) is left when a run died between the two renames of
    ``publish_output``: it is complete, so it becomes ``out_dir`` again when that is missing,
    and is removed otherwise. Folders of runs whose process is still alive are left alone.
    """
    parent = out_dir.absolute().parent
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)\.(?:.+\.tmp|old)")
    for entry in sorted(parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or not entry.is_dir() or _process_alive(int(found.group(1))):
            continue
        if entry.name.endswith(".old") and not out_dir.exists():
            log.warning("restoring %s from %s, left by a compile that was killed", out_dir, entry)
            entry.rename(out_dir)
        else:
            log.info("removing %s, left by a compile that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish_output(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the complete ``staging`` folder (old contents are removed)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_dump_dir_apart(dump_dir: Path, out_dir: Path) -> None:
    """Raise OptionError when the dump folder and the output folder are the same or one lies
    inside the other. Publishing the output replaces the whole -o folder, so it would delete the
    dumps or make the output look like a folder that is not graphcomp's."""
    dump, out = dump_dir.resolve(), out_dir.resolve()
    if dump == out or out in dump.parents or dump in out.parents:
        raise OptionError(
            f"--dump-dir {dump_dir} and -o {out_dir} overlap (the same folder, or one inside "
            "the other); compile replaces the whole -o folder, so choose a dump folder outside "
            "it, such as a sibling folder"
        )


def _prepare_dump_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OptionError(f"--dump-dir {folder}: a file is in the way; choose a folder") from None
    except OSError as exc:
        raise OptionError(
            f"--dump-dir {folder}: cannot create the folder ({exc.strerror})"
        ) from None


def _is_graphcomp_output(folder: Path) -> bool:
    """True when ``folder`` contains a manifest written by graphcomp (another tool's
    manifest.json must not get its folder replaced)."""
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("graphcomp")
