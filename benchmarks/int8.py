"""Int8 against float on the real models: latency, weight size and output difference.

For each model, in one run of this script on one machine:

- float ONNX Runtime latency (the original PP-OCR file; graphcomp's ONNX export of the
  imported graph for the PyTorch models),
- ONNX Runtime on graphcomp's QDQ/integer ONNX export of the int8 graph,
- the TVM int8 build, untuned, and tuned when ``--tuning-db`` is given,
- weight bytes of the float and the int8 graph,
- the output difference from float on real inputs held out from calibration. For PP-OCRv4
  det it is the mean absolute difference of the probability map on rendered text pages. For
  rec it is the relative error and the agreement of the per-step argmax and of the decoded
  character sequence. For MiniLM it is the cosine similarity of the embeddings, and for the
  digits CNN the test accuracy.

Usage:

    .venv/bin/python benchmarks/int8.py [--models ppocr-det,ppocr-rec,minilm,digits-cnn]
        [--repeat 5] [--tuning-db DIR --trials 8]

Every library runs on one thread (the machine is shared). The script prints a Markdown table
and writes it, with the date, the machine and its load average, to
benchmarks/int8_results.md (through a temporary file and a rename).
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy, torch and tvm start their thread pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from graphcomp import executor  # noqa: E402
from graphcomp.analysis import graph_stats  # noqa: E402
from graphcomp.backends import tvm as tvm_backend  # noqa: E402
from graphcomp.backends.onnx_export import export_onnx_bytes  # noqa: E402
from graphcomp.ir import Graph  # noqa: E402
from graphcomp.models import digits_data  # noqa: E402
from graphcomp.models_io import load_model  # noqa: E402
from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager  # noqa: E402
from graphcomp.serialize import write_text_atomic  # noqa: E402
from graphcomp.zoo import ppocr_inputs, ppocr_path  # noqa: E402

from common import machine_description, median_ms  # noqa: E402  (this folder)

RESULTS = Path(__file__).with_name("int8_results.md")
MODELS = ("ppocr-det", "ppocr-rec", "ppocr-rec-matmul", "minilm", "digits-cnn")
DET_THRESHOLD = 0.3  # the DB head's usual binarization threshold

Feeds = dict[str, np.ndarray]


@dataclass
class Case:
    """One int8 setting of one model: its pipeline, calibration and evaluation feeds, and
    how its output is compared with float."""

    title: str
    zoo: str
    pipeline: str
    calibration: list[Feeds]
    evaluation: list[Feeds]
    compare: Callable[[list[np.ndarray], list[np.ndarray]], str]
    labels: np.ndarray | None = None
    row: dict = field(default_factory=dict)


# --- output comparisons -----------------------------------------------------------------------


def compare_det(floats: list[np.ndarray], int8s: list[np.ndarray]) -> str:
    float_maps, int8_maps = np.concatenate(floats), np.concatenate(int8s)
    difference = float(np.abs(float_maps - int8_maps).mean())
    agree = float(np.mean((float_maps > DET_THRESHOLD) == (int8_maps > DET_THRESHOLD)))
    return (f"map mean abs diff {difference:.4f} (map mean {float_maps.mean():.4f}); "
            f"{agree:.2%} of pixels agree at {DET_THRESHOLD}")


def ctc_decode(steps: np.ndarray) -> tuple[int, ...]:
    """Collapse repeats and drop the blank (class 0) of one line's per-step argmax."""
    kept = [int(c) for i, c in enumerate(steps) if c != 0 and (i == 0 or c != steps[i - 1])]
    return tuple(kept)


def compare_rec(floats: list[np.ndarray], int8s: list[np.ndarray]) -> str:
    float_out, int8_out = np.concatenate(floats), np.concatenate(int8s)
    relative = float(np.abs(float_out - int8_out).max() / np.abs(float_out).max())
    float_steps, int8_steps = float_out.argmax(axis=-1), int8_out.argmax(axis=-1)
    steps_agree = float(np.mean(float_steps == int8_steps))
    lines_agree = np.mean([ctc_decode(f) == ctc_decode(q)
                           for f, q in zip(float_steps, int8_steps)])
    return (f"relative error {relative:.3f}; argmax agrees on {steps_agree:.2%} of steps, "
            f"decoded text on {lines_agree:.0%} of {len(float_out)} lines")


def compare_embeddings(floats: list[np.ndarray], int8s: list[np.ndarray]) -> str:
    cosines = []
    for expected, actual in zip(floats, int8s):
        for e, a in zip(expected.reshape(len(expected), -1), actual.reshape(len(actual), -1)):
            cosines.append(float(e @ a / (np.linalg.norm(e) * np.linalg.norm(a))))
    return f"cosine min {min(cosines):.4f}, mean {np.mean(cosines):.4f} ({len(cosines)} sentences)"


def compare_accuracy(labels: np.ndarray) -> Callable[[list[np.ndarray], list[np.ndarray]], str]:
    def compare(floats: list[np.ndarray], int8s: list[np.ndarray]) -> str:
        float_accuracy = np.mean(np.concatenate(floats).argmax(axis=1) == labels)
        int8_accuracy = np.mean(np.concatenate(int8s).argmax(axis=1) == labels)
        return f"accuracy {int8_accuracy:.2%} (float {float_accuracy:.2%}, {len(labels)} digits)"
    return compare


# --- the cases --------------------------------------------------------------------------------


def batches_of(name: str, images: np.ndarray) -> list[Feeds]:
    return [{name: images[i:i + 1]} for i in range(len(images))]


def make_case(name: str) -> Case:
    static = f"{DEFAULT_PIPELINE},quantize:int8,dce"
    with_matmul = name.endswith("-matmul")
    if name == "ppocr-det":
        # Calibration pages: other sentences and layouts than the evaluation pages.
        return Case("PP-OCRv4 det", name, static, batches_of("x", ppocr_inputs("det", 8, 4)[4:]),
                    batches_of("x", ppocr_inputs("det", 4, 0)), compare_det)
    if name in ("ppocr-rec", "ppocr-rec-matmul"):
        pipeline = static.replace("quantize:int8", "quantize:int8:matmul=true") if with_matmul \
            else static
        title = "PP-OCRv4 rec" + (" (matmul=true)" if with_matmul else "")
        return Case(title, "ppocr-rec", pipeline, batches_of("x", ppocr_inputs("rec", 8, 20)),
                    batches_of("x", ppocr_inputs("rec", 12, 0)), compare_rec)
    if name == "minilm":
        # Dynamic quantization needs no calibration; the 40 sentences are the evaluation.
        loaded = load_model("zoo:minilm")
        return Case("all-MiniLM-L6-v2 (dynamic)", name, f"{DEFAULT_PIPELINE},quantize:dynamic,dce",
                    [], loaded.default_data.batches, compare_embeddings)
    if name == "digits-cnn":
        train, test = digits_data("train"), digits_data("test")
        return Case("digits CNN", name, "fold-bn,quantize:int8,dce",
                    batches_of("input", train["input"][:512]),
                    batches_of("input", test["input"]), compare_accuracy(test["labels"]))
    raise SystemExit(f"unknown model '{name}'; choose from {', '.join(MODELS)}")


# --- measuring --------------------------------------------------------------------------------


def session_of(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def outputs_of(run: Callable[[Feeds], list[np.ndarray]], batches: list[Feeds]) -> list[np.ndarray]:
    return [run(feeds)[0] for feeds in batches]


def measure(case: Case, repeat: int, tuning) -> dict:
    loaded = load_model(f"zoo:{case.zoo}")
    float_graph = PassManager(DEFAULT_PIPELINE, verify=False).run(loaded.graph).graph
    start = time.perf_counter()
    int8_graph = PassManager(case.pipeline, verify=False,
                             calibration=case.calibration).run(loaded.graph).graph
    row = {"model": case.title, "pipeline": case.pipeline,
           "quantize_s": time.perf_counter() - start,
           "float_bytes": graph_stats(float_graph).bytes,
           "int8_bytes": graph_stats(int8_graph).bytes}
    first = case.evaluation[0]

    if loaded.reference_name == "onnxruntime":
        float_session = session_of(str(ppocr_path(case.zoo.split("-")[1])))
    else:
        float_session = session_of(export_onnx_bytes(float_graph))
    int8_session = session_of(export_onnx_bytes(int8_graph))
    row["float_ort_ms"] = median_ms(lambda: float_session.run(None, first), repeat)
    row["int8_ort_ms"] = median_ms(lambda: int8_session.run(None, first), repeat)

    built = tvm_backend.build(int8_graph, "cpu")
    row["int8_tvm_ms"] = built.benchmark(first, repeat=repeat)
    output_name = int8_graph.outputs[0].name
    tvm_outputs = outputs_of(lambda feeds: [built.run(feeds)[output_name]], case.evaluation)
    reference = outputs_of(lambda feeds: [executor.run(int8_graph, feeds)[output_name]],
                           case.evaluation[:2])
    row["tvm_vs_reference"] = max(float(np.abs(a - b).max())
                                  for a, b in zip(reference, tvm_outputs))
    if tuning is not None:
        result = tvm_backend.tune(int8_graph, "cpu", tuning)
        tuned = tvm_backend.build(int8_graph, "cpu", tuning_database=result.database)
        row["int8_tuned_ms"] = tuned.benchmark(first, repeat=repeat)

    floats = outputs_of(lambda feeds: float_session.run(None, feeds), case.evaluation)
    ort_outputs = outputs_of(lambda feeds: int8_session.run(None, feeds), case.evaluation)
    row["quality_tvm"] = case.compare(floats, tvm_outputs)
    row["quality_ort"] = case.compare(floats, ort_outputs)
    return row


# --- the table --------------------------------------------------------------------------------


def format_table(rows: list[dict], repeat: int, loads: tuple[tuple[float, ...], ...]) -> str:
    def cell(value):
        if value is None:
            return "n/a"
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"

    start, end = loads
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine_description()}, one thread "
        f"for every library, median of {repeat} runs, batch 1. The machine was shared: load "
        f"average (1, 5, 15 min) {start[0]:.1f}, {start[1]:.1f}, {start[2]:.1f} at the start and "
        f"{end[0]:.1f}, {end[1]:.1f}, {end[2]:.1f} at the end, so latencies are approximate.",
        "",
        "'float ORT' runs the original ONNX file (PP-OCR) or graphcomp's ONNX export of the "
        "imported float graph; 'int8 ORT' runs graphcomp's ONNX export of the int8 graph "
        "(QuantizeLinear/DequantizeLinear, QLinearConv, MatMulInteger); 'int8 TVM' is the "
        "untuned TVM build. Sizes are the weight bytes of the graph. The output difference is "
        "measured against float ONNX Runtime on inputs held out from calibration.",
        "",
        "| model | float ORT ms | int8 ORT ms | int8 TVM ms | int8 TVM tuned ms | "
        "weights float -> int8 | int8 TVM vs float | int8 ORT vs float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = (f"{row['float_bytes'] / 1e6:.2f} MB -> {row['int8_bytes'] / 1e6:.2f} MB "
                f"({row['float_bytes'] / row['int8_bytes']:.1f}x)")
        lines.append(
            f"| {row['model']} | {cell(row['float_ort_ms'])} | {cell(row['int8_ort_ms'])} | "
            f"{cell(row['int8_tvm_ms'])} | {cell(row.get('int8_tuned_ms'))} | {size} | "
            f"{row['quality_tvm']} | {row['quality_ort']} |"
        )
    lines += ["", "Pipelines:", ""]
    lines += [f"- {row['model']}: `{row['pipeline']}`" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated cases (default: {','.join(MODELS)})")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (default 5)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"Markdown file to write (default {RESULTS.name} in this folder)")
    parser.add_argument("--tuning-db", type=Path, default=None,
                        help="also measure a MetaSchedule-tuned int8 build, with this tuning "
                             "database folder")
    parser.add_argument("--trials", type=int, default=8, help="tuning trials per kernel")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tuning = None
    if args.tuning_db is not None:
        tuning = tvm_backend.TuningOptions(trials=args.trials, database=args.tuning_db)
    cases = [make_case(name) for name in args.models.split(",")]
    start_load = os.getloadavg()
    rows = []
    for case in cases:
        print(f"measuring {case.title} ...", file=sys.stderr, flush=True)
        rows.append(measure(case, args.repeat, tuning))
        print(rows[-1], file=sys.stderr, flush=True)
    table = format_table(rows, args.repeat, (start_load, os.getloadavg()))
    print(table)
    if not args.no_write:
        write_text_atomic(args.results, "# Int8 benchmark results\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
