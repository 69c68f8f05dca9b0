"""Size, MACs, latency and output quality of low-rank decomposed models against the originals.

For each model and each ``lowrank`` setting, in one run on one machine: the decomposed graph
against the original (both after the default lossless pipeline), built with TVM (untuned) and
exported to ONNX for ONNX Runtime. Ratios are decomposed / original on the same backend.
Usage:

    .venv/bin/python benchmarks/lowrank.py [--models digits-cnn,minilm,ppocr-rec] [--repeat 10]
        [--threads 1]

It prints a Markdown table and writes it to benchmarks/lowrank_results.md (through a temporary
file and a rename). Quality is measured with ONNX Runtime on the model's own data: test-split
accuracy (digits-cnn, without fine-tuning), mean cosine similarity of the sentence embeddings
with the original's (minilm), and max / mean absolute difference of the output probabilities
and the share of time steps whose top class is unchanged (ppocr-rec).

Settings with ``measure=true`` keep a layer's chain only when it measures faster on ``cpu``
(each layer and its chain built alone with TVM, untuned); the layers column then shows how
many layers the chain made faster out of those it gave fewer MACs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from graphcomp.analysis import graph_stats
from graphcomp.backends import tvm as tvm_backend
from graphcomp.backends.onnx_export import export_onnx_bytes
from graphcomp.ir import Graph
from graphcomp.models_io import load_model
from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager
from graphcomp.serialize import write_text_atomic

from common import machine_description, median_ms  # noqa: E402  (this folder)

RESULTS = Path(__file__).with_name("lowrank_results.md")

SETTINGS = {
    "digits-cnn": ["lowrank:ratio=0.5", "lowrank:ratio=0.5:measure=true", "lowrank:ratio=0.25"],
    "minilm": ["lowrank:svd:energy=0.9", "lowrank:svd:energy=0.9:measure=true",
               "lowrank:svd:energy=0.95", "lowrank:svd:energy=0.99"],
    "ppocr-rec": ["lowrank:energy=0.99:min_macs=10000000", "lowrank:energy=0.9:min_macs=10000000",
                  "lowrank:ratio=0.5:min_macs=10000000",
                  "lowrank:ratio=0.5:min_macs=10000000:measure=true"],
}




def one_blas_thread():
    """Limit OpenBLAS to one thread while decomposing, when threadpoolctl is installed (it
    comes with scikit-learn). On a shared 2-core machine, numpy's SVDs ran about 30 times
    slower with two threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


class Backends:
    """One graph built with TVM and loaded in ONNX Runtime, timed on the same feeds."""

    def __init__(self, graph: Graph, feeds, repeat: int, threads: int):
        import onnxruntime as ort

        start = time.perf_counter()
        built = tvm_backend.build(graph, "cpu")
        self.tvm_ms = built.benchmark(feeds, repeat=repeat)
        self.build_s = time.perf_counter() - start
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(export_onnx_bytes(graph), session_options,
                                            providers=["CPUExecutionProvider"])
        self.output = graph.outputs[0].name
        self.ort_ms = median_ms(lambda: self.session.run([self.output], feeds), repeat)

    def outputs(self, batches) -> np.ndarray:
        return np.concatenate([self.session.run([self.output], b)[0] for b in batches])


def quality(name: str, loaded, original: np.ndarray, decomposed: np.ndarray) -> str:
    if name == "digits-cnn":
        labels = loaded.default_data.labels
        before = float(np.mean(original.argmax(-1) == labels))
        after = float(np.mean(decomposed.argmax(-1) == labels))
        return f"accuracy {before:.4f} -> {after:.4f}"
    if name == "minilm":
        cosine = np.sum(original * decomposed, axis=1) / (
            np.linalg.norm(original, axis=1) * np.linalg.norm(decomposed, axis=1))
        return f"cosine mean {cosine.mean():.4f}, min {cosine.min():.4f}"
    difference = np.abs(decomposed - original)
    same_top = float(np.mean(decomposed.argmax(-1) == original.argmax(-1)))
    return (f"max abs diff {difference.max():.3g}, mean {difference.mean():.3g}, "
            f"top class kept {same_top:.3f}")


def measure(name: str, repeat: int, threads: int) -> list[dict]:
    loaded = load_model(f"zoo:{name}")
    original = PassManager(DEFAULT_PIPELINE, verify=False).run(loaded.graph).graph
    batches = loaded.default_data.batches
    feeds = batches[0]
    base = Backends(original, feeds, repeat, threads)
    base_outputs = base.outputs(batches)
    base_stats = graph_stats(original)
    rows = [{"model": name, "passes": "(original)", "decomposed": 0, "stats": base_stats,
             "tvm_ms": base.tvm_ms, "ort_ms": base.ort_ms, "build_s": base.build_s,
             "quality": quality(name, loaded, base_outputs, base_outputs)}]
    if loaded.reference_name == "torch":
        rows[0]["reference_ms"] = loaded.time_reference(feeds, repeat)
    for setting in SETTINGS[name]:
        print(f"  {setting}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with one_blas_thread():
            report = PassManager(setting, verify=False).run(original)
        seconds = time.perf_counter() - start
        backends = Backends(report.graph, feeds, repeat, threads)
        details = report.records[0].details
        for record in details["skipped"]:
            if "speedup" in record:
                print(f"    {record['layer']} left alone: {record['reason']}", file=sys.stderr)
        rows.append({
            "model": name, "passes": setting, "pass_s": seconds,
            "decomposed": details["decomposed"],
            "fewer_macs": details["fewer_macs"] if details["timed_on"] else None,
            "stats": graph_stats(report.graph), "tvm_ms": backends.tvm_ms,
            "ort_ms": backends.ort_ms, "build_s": backends.build_s,
            "quality": quality(name, loaded, base_outputs, backends.outputs(batches)),
        })
    for row in rows:
        row["base"] = rows[0]
    return rows


def format_table(rows: list[dict], repeat: int, threads: int) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine_description()}, "
        f"{threads} thread(s), median of {repeat} "
        "runs, batch 1, fp32. TVM untuned (default schedules). Ratios are decomposed / "
        "original on the same backend. Quality is measured without fine-tuning. "
        "Layers: decomposed layers; with `measure=true`, those whose chain measured faster "
        "of those whose chain had fewer MACs. Pass s: the lowrank pass, layer timing included.",
        "",
        "| model | passes | layers | pass s | params | weight bytes | MACs | TVM ms | TVM ratio "
        "| ORT ms | ORT ratio | quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base, stats = row["base"], row["stats"]

        def ratio(key: str) -> float:
            return getattr(stats, key) / getattr(base["stats"], key)

        layers = str(row["decomposed"])
        if row.get("fewer_macs") is not None:
            layers = f"{row['decomposed']} of {row['fewer_macs']}"
        pass_s = f"{row['pass_s']:.1f}" if "pass_s" in row else "-"
        lines.append(
            f"| {row['model']} | `{row['passes']}` | {layers} | {pass_s} | "
            f"{stats.params:,} ({ratio('params'):.2f}) | {ratio('bytes'):.2f} | "
            f"{stats.macs:,} ({ratio('macs'):.2f}) | {row['tvm_ms']:.2f} | "
            f"{row['tvm_ms'] / base['tvm_ms']:.2f} | {row['ort_ms']:.3f} | "
            f"{row['ort_ms'] / base['ort_ms']:.2f} | {row['quality']} |"
        )
    if any(row["decomposed"] == 0 and row["passes"] != "(original)" for row in rows):
        lines += ["", "A setting that decomposes no layer runs the original graph again, so its "
                  "ratios show the run-to-run noise of this shared machine."]
    references = [f"{r['model']} {r['reference_ms']:.2f} ms" for r in rows if "reference_ms" in r]
    if references:
        lines += ["", "PyTorch eager reference of the originals: "
                  + ", ".join(references) + "."]
    return "\n".join(lines) + "\n"




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SETTINGS),
                        help=f"comma-separated zoo names out of {', '.join(SETTINGS)}")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per figure")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of TVM, ONNX Runtime and PyTorch")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    # TVM reads its thread count when its runtime starts, at the first build.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    # PyTorch's two intra-op threads on a shared 2-core machine timed the eager reference
    # erratically (100 ms instead of 0.2 ms for the digits CNN); one thread is the default.
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        if name not in SETTINGS:
            parser.error(f"unknown model '{name}'; choose from {', '.join(SETTINGS)}")
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.extend(measure(name, args.repeat, args.threads))
    table = format_table(rows, args.repeat, args.threads)
    print(table)
    if not args.no_write:
        write_text_atomic(RESULTS, "# Low-rank decomposition benchmark\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
