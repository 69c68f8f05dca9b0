"""Latency of ONNX Runtime, PyTorch eager and graphcomp (TVM, untuned) on the real models.

All figures come from one run of this script on one machine, so their ratios are comparable.
Usage:

    .venv/bin/python benchmarks/run.py [--models ppocr-det,ppocr-rec,...] [--repeat 10]

It prints a Markdown table and writes it, with the date and the machine, to
benchmarks/results.md (through a temporary file and a rename).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from graphcomp.backends import tvm as tvm_backend
from graphcomp.data import random_feeds
from graphcomp.models_io import ZOO, load_model
from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager, parse_pipeline
from graphcomp.serialize import write_text_atomic

from common import machine_description, median_ms  # noqa: E402  (this folder)

RESULTS = Path(__file__).with_name("results.md")




THREADS: int | None = None  # set by --threads; None leaves each library's default


def set_threads(count: int) -> None:
    """Run ONNX Runtime, PyTorch and TVM on ``count`` threads. TVM reads TVM_NUM_THREADS when
    its thread pool starts, so this must run before the first TVM model runs."""
    global THREADS
    import torch

    THREADS = count
    os.environ["TVM_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)


def ort_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if THREADS is not None:
        options.intra_op_num_threads = THREADS
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def onnxruntime_ms(path: str, feeds, repeat: int) -> float:
    session = ort_session(path)
    return median_ms(lambda: session.run(None, feeds), repeat)


def measure(name: str, repeat: int, tuning=None) -> dict:
    loaded = load_model(f"zoo:{name}")
    feeds = (loaded.default_data or random_feeds(loaded.graph, 0, 1)).batches[0]
    report = PassManager(parse_pipeline(DEFAULT_PIPELINE), verify=False).run(loaded.graph)
    start = time.perf_counter()
    built = tvm_backend.build(report.graph, "cpu")
    build_seconds = time.perf_counter() - start

    row = {"model": name, "build_s": build_seconds}
    if loaded.reference_name == "onnxruntime":
        from graphcomp.zoo import ppocr_path

        row["onnxruntime"] = onnxruntime_ms(str(ppocr_path(name.split("-")[1])), feeds, repeat)
    else:
        row["torch"] = loaded.time_reference(feeds, repeat)
        row["onnxruntime"] = _torch_via_onnxruntime(loaded, feeds, repeat)
    row["graphcomp"] = built.benchmark(feeds, repeat=repeat)
    if tuning is not None:
        start = time.perf_counter()
        result = tvm_backend.tune(report.graph, "cpu", tuning)
        tuned = tvm_backend.build(report.graph, "cpu", tuning_database=result.database)
        row["tune_s"] = time.perf_counter() - start
        row["tuned"] = tuned.benchmark(feeds, repeat=repeat)
        row["tuned_trials"] = result.to_report()["trials"]
    expected = loaded.reference(feeds)
    actual = built.run(feeds)
    row["max_abs_error"] = max(
        float(np.abs(np.asarray(e) - actual[v.name]).max())
        for v, e in zip(report.graph.outputs, expected)
    )
    return row


def _torch_via_onnxruntime(loaded, feeds, repeat: int) -> float | None:
    """ONNX Runtime on the graph exported back to ONNX, when an ONNX exporter is available."""
    try:
        from graphcomp.backends.onnx_export import export_onnx_bytes
    except ImportError:
        return None
    session = ort_session(export_onnx_bytes(loaded.graph))
    return median_ms(lambda: session.run(None, feeds), repeat)


def format_table(rows: list[dict], repeat: int) -> str:
    def cell(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine_description()}, "
        f"{'default threads' if THREADS is None else f'{THREADS} thread(s) per library'}, "
        f"median of {repeat} runs, "
        "batch 1, fp32, default pass pipeline. 'graphcomp' is untuned (default TVM schedules); "
        "'tuned' uses MetaSchedule records of the tuning database (tuning time in 'tune s', 0 "
        "when every kernel was already tuned). For PyTorch models, ONNX Runtime runs "
        "graphcomp's ONNX export of the imported graph.",
        "",
        "| model | ONNX Runtime ms | PyTorch eager ms | graphcomp ms | tuned ms | tuned / ORT | "
        "graphcomp / ORT | graphcomp / PyTorch | build s | tune s | max abs error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ort_ms, torch_ms, ours = row.get("onnxruntime"), row.get("torch"), row["graphcomp"]
        tuned = row.get("tuned")
        lines.append(
            f"| {row['model']} | {cell(ort_ms)} | {cell(torch_ms)} | {cell(ours)} | "
            f"{cell(tuned)} | {cell(tuned / ort_ms if tuned and ort_ms else None)} | "
            f"{cell(ours / ort_ms if ort_ms else None)} | "
            f"{cell(ours / torch_ms if torch_ms else None)} | {cell(row['build_s'], 1)} | "
            f"{cell(row.get('tune_s'), 1)} | {row['max_abs_error']:.2g} |"
        )
    return "\n".join(lines) + "\n"




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo names")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per figure")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"Markdown file to write (default {RESULTS.name} in this folder)")
    parser.add_argument("--tune", action="store_true",
                        help="also measure a MetaSchedule-tuned build (reuses --tuning-db)")
    parser.add_argument("--trials", type=int, default=8, help="tuning trials per kernel")
    parser.add_argument("--tuning-db", type=Path, default=None,
                        help="tuning database folder (default: the user's cache folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of ONNX Runtime, PyTorch and TVM (default: each one's "
                             "own default, all cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    tuning = None
    if args.tune:
        tuning = tvm_backend.TuningOptions(trials=args.trials, database=args.tuning_db)
    rows = []
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.repeat, tuning))
    table = format_table(rows, args.repeat)
    print(table)
    if not args.no_write:
        write_text_atomic(args.results, "# Benchmark results\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
