"""The ``graphcomp`` command line: a thin layer over the Python API.

Exit codes: 0 on success, 2 for errors caused by the input (bad model, option, file), 1 for
internal errors (with a hint to report them), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn
from rich.table import Table
from rich.text import Text

from graphcomp import __version__
from graphcomp.errors import GraphcompError, OptionError

log = logging.getLogger("graphcomp")
# Output piped to a file is not wrapped at 80 columns (rich's default without a terminal), so
# that lines of IR text and table totals stay whole.
console = Console(width=None if sys.stdout.isatty() else 200)
error_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.handler(args)
    except GraphcompError as exc:
        _print_error("error:", str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        error_console.print("interrupted; no output was written")
        return 130
    except Exception as exc:  # noqa: BLE001 (the last line of defence of a command-line tool)
        if _terminated:
            # The interrupt landed inside an extension module's import, which turns it into
            # another exception (ImportError: initialization failed).
            error_console.print("interrupted; no output was written")
            return 130
        if args.verbose:
            error_console.print_exception()
        _print_error(
            "internal error:",
            f"{type(exc).__name__}: {exc}\nThis is a bug in graphcomp. Rerun with -v for the "
            "traceback and report it in the graphcomp repository's issues, with the command "
            "line and the model.",
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


_terminated = False


def _raise_interrupt(signum, frame) -> None:
    # SIGTERM takes the same path as Ctrl-C, so staging folders are removed on the way out.
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _print_error(label: str, message: str) -> None:
    # The message is plain text: square brackets in it (shapes, names) are not rich markup.
    error_console.print(Text.assemble((label, "bold red"), " ", message), soft_wrap=True)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphcomp",
        description="Import a model, compress it with verified passes, build it with TVM.",
    )
    parser.add_argument("--version", action="version", version=f"graphcomp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="show a graph node by node, with totals")
    _add_model_arguments(inspect)
    inspect.add_argument("--after", metavar="PIPELINE",
                         help="also run these passes and show the graph after them")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--text", action="store_true",
                         help="print the IR text form instead of the table")
    inspect.add_argument("--dump-dir", type=Path,
                         help="write the IR text form before and after each pass into this "
                              "folder (00-input.txt, 01-PASS.txt, ...)")
    inspect.set_defaults(handler=_cmd_inspect)

    report = commands.add_parser(
        "report", help="write the HTML report of a compile output folder (compile writes it too)"
    )
    report.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="output folder of 'graphcomp compile', with its report.json")
    report.add_argument("-o", "--output", type=Path, metavar="FILE.html",
                        help="where to write the page (default: OUT_DIR/report.html)")
    report.set_defaults(handler=_cmd_report)

    compile_ = commands.add_parser("compile", help="run passes, build, verify, write an artifact")
    _add_model_arguments(compile_)
    compile_.add_argument("--target", default="cpu", help="build target (see 'graphcomp targets')")
    compile_.add_argument("--passes", metavar="PIPELINE", default=None,
                          help="comma-separated passes, options after colons "
                               "(e.g. 'fold-bn,fuse,dce'); 'none' for no passes; "
                               "default: the lossless default pipeline")
    compile_.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR",
                          help="output folder for the artifact and report.json")
    compile_.add_argument("--data", type=Path, metavar="FILE.npz|DIR",
                          help="inputs: a .npz with one array per graph input, named after it, "
                               "or a folder with NAME.npy per graph input; each array stacks "
                               "the examples on its leading axis (N x the input shape without "
                               "its batch dim). Optional 'labels' (labels.npy), one class "
                               "index per example, gives accuracy. Passes that calibrate use "
                               "the first half, verification the rest")
    compile_.add_argument("--seed", type=int, default=0, help="seed of random inputs")
    compile_.add_argument("--samples", type=int, default=2,
                          help="random input batches when no --data is given (default 2)")
    compile_.add_argument("--max-samples", type=int, default=1000,
                          help="most dataset batches used to verify (default 1000)")
    compile_.add_argument("--tolerance", type=float, default=1e-3,
                          help="allowed error relative to the output scale (default 1e-3)")
    compile_.add_argument("--no-verify-passes", action="store_true",
                          help="skip the numerical check after each pass")
    compile_.add_argument("--dump-dir", type=Path,
                          help="write the IR text form after each pass into this folder, "
                               "which must lie outside OUT_DIR")
    compile_.add_argument("--repeat", type=int, default=5,
                          help="timed runs for the latency figures (default 5)")
    compile_.add_argument("--recover", type=Path, metavar="FILE.npz",
                          help="after lossy passes, fine-tune the result against the original "
                               "model (knowledge distillation) on this training data, named "
                               "like --data, optional 'labels'")
    compile_.add_argument("--recover-epochs", type=int, default=10, metavar="N",
                          help="epochs of --recover fine-tuning (default 10)")
    tuning = compile_.add_argument_group("tuning")
    tuning.add_argument("--tune", action="store_true",
                        help="tune every kernel with MetaSchedule before building; kernels "
                             "with enough records in the tuning database are reused")
    tuning.add_argument("--trials", type=int, default=8, metavar="N",
                        help="measured candidates per kernel, on average (default 8)")
    tuning.add_argument("--trial-allocation", choices=("time", "flops", "even"),
                        default="time",
                        help="'time' (default) spends N/2 per kernel as 'flops' does, then "
                             "N/2 in proportion to each kernel's measured time; 'flops' "
                             "gives a kernel with k times the average FLOPs about k times "
                             "the trials (N/2 to 16N); 'even' gives each kernel N")
    _add_tuning_db_argument(tuning)
    tuning.add_argument("--rpc-tracker", metavar="HOST:PORT",
                        help="measure candidates on the devices of this TVM RPC tracker")
    tuning.add_argument("--rpc-key", metavar="KEY",
                        help="device key the RPC servers registered at the tracker")
    compile_.set_defaults(handler=_cmd_compile)

    tune_db = commands.add_parser("tune-db", help="list or prune the tuning database")
    _add_tuning_db_argument(tune_db)
    tune_db_commands = tune_db.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = tune_db_commands.add_parser(
        "list", help="per target: workloads, records and the slowest tuned kernels"
    )
    listing.add_argument("--limit", type=int, default=10, metavar="N",
                         help="kernels shown per target, slowest first; 0 shows all "
                              "(default 10)")
    _add_tuning_db_argument(listing, default=argparse.SUPPRESS)
    listing.set_defaults(handler=_cmd_tune_db_list)
    prune = tune_db_commands.add_parser(
        "prune", help="keep the N fastest records per kernel; --keep 0 removes the records"
    )
    prune.add_argument("--keep", type=int, required=True, metavar="N",
                       help="records kept per kernel; 0 removes the target's file")
    prune.add_argument("--target", metavar="KEY",
                       help="prune only this target: its key as 'list' shows it, or a target "
                            "name such as cpu (default: all targets)")
    _add_tuning_db_argument(prune, default=argparse.SUPPRESS)
    prune.set_defaults(handler=_cmd_tune_db_prune)

    run = commands.add_parser("run", help="run a compiled artifact on .npy inputs")
    run.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    run.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                     help="an input array; NAME may be left out when the model has one input")
    run.add_argument("-o", "--output", type=Path, metavar="FILE.npz",
                     help="write the outputs to this .npz file")
    run.add_argument("--benchmark", type=int, default=0, metavar="N",
                     help="also time N runs and print the median latency")
    run.add_argument("--allow-non-finite", action="store_true",
                     help="run inputs that contain NaN or infinity (rejected by default: "
                          "compiled relu, clip and hardsigmoid may turn NaN into numbers)")
    run.set_defaults(handler=_cmd_run)

    passes = commands.add_parser("passes", help="list the available passes, plugins included")
    passes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    passes.set_defaults(handler=_cmd_passes)
    targets = commands.add_parser("targets", help="list the named build targets")
    targets.set_defaults(handler=_cmd_targets)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="MODEL.onnx, MODEL.pt2, a graphcomp GRAPH.json, FILE.py:FUNCTION returning "
             "(module, example_inputs), or zoo:NAME (ppocr-det, ppocr-rec, ppocr-cls, "
             "digits-cnn, minilm)",
    )
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
        help="fix the dims of an input with dynamic dims, e.g. x=1,3,640,640 (repeatable)",
    )


def _add_tuning_db_argument(parser, default=None) -> None:
    # tune-db takes the option before and after its action. The action's copy defaults to
    # SUPPRESS, because a default there would overwrite a value given before the action.
    parser.add_argument("--tuning-db", type=Path, metavar="PATH", default=default,
                        help="tuning database folder (default: $XDG_CACHE_HOME/graphcomp/"
                             "tuning, else ~/.cache/graphcomp/tuning)")


def _configure_logging(verbose: bool) -> None:
    handler = RichHandler(console=error_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s",
                        force=True)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def _input_shapes(args) -> dict[str, tuple[int, ...]] | None:
    if not args.input_shape:
        return None
    from graphcomp.frontends.onnx_frontend import parse_input_shapes

    return parse_input_shapes(args.input_shape)


# --- inspect ----------------------------------------------------------------------------------


def _cmd_inspect(args) -> int:
    from graphcomp.inspect import compare_graphs, node_changes, node_rows, pass_rows
    from graphcomp.models_io import load_model
    from graphcomp.serialize import format_graph

    loaded = load_model(args.model, _input_shapes(args))
    graph = loaded.graph
    after = trace = None
    if args.after is not None or args.dump_dir is not None:
        # With --dump-dir alone, the empty pipeline writes only 00-input.txt.
        pipeline_text = args.after if args.after is not None else "none"
        final, trace = _run_after(graph, pipeline_text, args.dump_dir)
        after = final if args.after is not None else None

    if args.json:
        payload = {"before": node_rows(graph)}
        if after is not None:
            payload["after"] = node_rows(after)
            payload["passes"] = pass_rows(trace)
            payload["nodes"] = node_changes(trace)
            payload["difference"] = compare_graphs(graph, after)
        console.print_json(json.dumps(payload))
        return 0
    if args.text:
        console.print(format_graph(after if after is not None else graph), highlight=False,
                      markup=False)
        return 0
    if after is None:
        _print_node_table(graph, f"{graph.name} ({loaded.source})")
        return 0
    _print_change_table(node_changes(trace), f"{graph.name} ({loaded.source}) after {args.after}")
    _print_pass_table(pass_rows(trace))
    _print_difference(compare_graphs(graph, after))
    return 0


def _run_after(graph, pipeline_text: str, dump_dir: Path | None):
    """Run the pipeline on ``graph`` with one seeded random batch; return the final graph and
    the trace of the graph after each pass."""
    from graphcomp.compiler import _prepare_dump_dir
    from graphcomp.data import random_feeds
    from graphcomp.inspect import PipelineTrace
    from graphcomp.pipeline import PassManager, parse_pipeline

    passes = parse_pipeline(pipeline_text)
    if dump_dir is not None:
        _prepare_dump_dir(dump_dir)
    trace = PipelineTrace(graph)
    manager = PassManager(passes, feeds=random_feeds(graph, 0, 1).batches[0], dump_dir=dump_dir,
                          after_pass=trace.after_pass)
    return manager.run(graph).graph, trace


def _print_node_table(graph, title: str) -> None:
    from graphcomp.inspect import node_rows, totals

    table = Table(title=title, title_justify="left")
    for column in ("node", "op", "inputs", "output", "params", "MACs", "created by"):
        table.add_column(column, justify="right" if column in ("params", "MACs") else "left")
    for row in node_rows(graph):
        table.add_row(row["node"], row["op"], " ".join(row["inputs"]), row["output"],
                      f"{row['params']:,}", f"{row['macs']:,}", row["created_by"])
    total = totals(graph)
    table.add_section()
    table.add_row(f"{total['nodes']} nodes", "", "", "", f"{total['params']:,}",
                  f"{total['macs']:,}", f"{total['bytes']:,} bytes")
    console.print(table)


_STATUS_STYLES = {"kept": "dim", "changed": "yellow", "added": "green", "removed": "red"}


def _print_change_table(rows, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("node", "status", "op", "output", "params", "MACs", "pass", "what changed"):
        table.add_column(column, justify="right" if column in ("params", "MACs") else "left")
    for row in rows:
        table.add_row(
            row["node"], Text(row["status"], style=_STATUS_STYLES[row["status"]]), row["op"],
            _before_after(row["output"]), _before_after(row["params"], "{:,}"),
            _before_after(row["macs"], "{:,}"), ", ".join(row["passes"]),
            "; ".join(row["changes"]),
        )
    console.print(table)


def _before_after(pair, template: str = "{}") -> str:
    old, new = (("-" if value is None else template.format(value)) for value in pair)
    return old if old == new else f"{old} -> {new}"


def _print_pass_table(records) -> None:
    table = Table(title="passes", title_justify="left")
    for column in ("pass", "seconds", "nodes", "params", "MACs", "max error", "removed",
                   "added", "changed"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for record in records:
        error = record.get("max_abs_error")
        table.add_row(record["name"], f"{record['seconds']:.3f}",
                      f"{record['nodes_before']} -> {record['nodes_after']}",
                      f"{record['params']:,}", f"{record['macs']:,}",
                      "-" if error is None else f"{error:.3g}", str(len(record["removed"])),
                      str(len(record["added"])), str(len(record["changed_nodes"])))
    console.print(table)


def _print_difference(difference) -> None:
    for key in ("nodes", "params", "macs", "bytes"):
        before, after = difference["totals"][key]
        change = f"{(after - before) / before:+.1%}" if before else "n/a"
        console.print(f"{key:>7}: {before:,} -> {after:,} ({change})")
    console.print(f"removed {len(difference['removed'])} node(s), "
                  f"added {len(difference['added'])}, changed {len(difference['changed'])}")


# --- report -----------------------------------------------------------------------------------


def _cmd_report(args) -> int:
    from graphcomp.report import write_report

    console.print(f"wrote {write_report(args.out_dir, args.output)}", highlight=False)
    return 0


# --- compile ----------------------------------------------------------------------------------


def _cmd_compile(args) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from graphcomp.compiler import CompileOptions, compile_model

    for flag, value in (("--samples", args.samples), ("--max-samples", args.max_samples),
                        ("--repeat", args.repeat), ("--recover-epochs", args.recover_epochs)):
        if value < 1:
            raise OptionError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.tolerance < float("inf"):
        raise OptionError(f"--tolerance must be a positive finite number, got {args.tolerance}")
    options = CompileOptions(
        target=args.target, passes=args.passes, input_shapes=_input_shapes(args),
        data=args.data, seed=args.seed, samples=args.samples, max_samples=args.max_samples,
        tolerance=args.tolerance, verify_passes=not args.no_verify_passes,
        dump_dir=args.dump_dir, benchmark_repeat=args.repeat, tune=args.tune,
        trials=args.trials, trial_allocation=args.trial_allocation,
        tuning_db=args.tuning_db, rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key, recover=args.recover, recover_epochs=args.recover_epochs,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), _OptionalBarColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        task = progress.add_task("starting", total=None, detail="")
        tuning_task = progress.add_task("tuning", total=None, detail="", visible=False)
        work_task = progress.add_task("", total=None, detail="", visible=False)

        def step(message: str) -> None:
            log.info("%s", message)
            progress.update(task, description=message)
            progress.update(tuning_task, visible=False)
            progress.update(work_task, visible=False)

        def show_work(label: str, done: int, total: int) -> None:
            progress.update(work_task, visible=True, description=label, total=max(total, 1),
                            completed=done, detail=f"batches {done}/{total}")

        def show_tuning(state) -> None:
            progress.update(tuning_task, visible=True, total=max(state.trials_planned, 1),
                            completed=state.trials_done, detail=_tuning_detail(state))

        report = compile_model(args.model, args.output, options, progress=step,
                               tuning_progress=show_tuning, work_progress=show_work)
    _print_summary(report)
    return 0


class _OptionalBarColumn(BarColumn):
    """A bar for progress tasks with a total; nothing for the plain step messages."""

    def render(self, task):
        return super().render(task) if task.total is not None else Text("")


def _tuning_detail(state) -> str:
    """Format the tuning bar's line: tasks, trials, the last task's and the model's best."""
    parts = [f"tasks {state.tasks_done}/{state.tasks_total}"]
    if state.reused_tasks:
        parts[0] += f" ({state.reused_tasks} reused)"
    parts.append(f"trials {state.trials_done}/{state.trials_planned}")
    if state.task_best_ms is not None:
        parts.append(f"{state.task_name} best {state.task_best_ms:.3f} ms")
    if state.estimated_ms is not None:
        parts.append(f"kernels total {state.estimated_ms:.2f} ms")
    return ", ".join(parts)


def _print_summary(report) -> None:
    before, after = report["graph"]["before"], report["graph"]["after"]
    lines = [
        f"[bold]{report['model']}[/] -> {report['artifact']} (target {report['target']})",
        f"  passes   {report['passes'] or 'none'}",
        f"  graph    nodes {before['nodes']} -> {after['nodes']}, params {before['params']:,} -> "
        f"{after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}",
    ]
    verify, drift = report["verify"], report["drift"]
    if "skipped" in verify:
        lines.append(f"  verify   skipped: {verify['skipped']}")
    else:
        emulated = f" (under {verify['emulated']})" if "emulated" in verify else ""
        lines.append(f"  verify   artifact{emulated} vs reference executor: max abs error "
                     f"{verify['max_abs_error']:.3g} (relative {verify['relative_error']:.3g})")
    drift_line = (f"  drift    final graph vs original: max abs error {drift['max_abs_error']:.3g} "
                  f"(relative {drift['relative_error']:.3g}), cosine {drift['cosine']:.6f}")
    if "accuracy" in drift:
        drift_line += (f", accuracy {drift['accuracy']:.2%} "
                       f"(original {drift['reference_accuracy']:.2%})")
    lines.append(drift_line)
    latency = report["latency_ms"]
    if "skipped" not in latency:
        reference = next(k for k in latency if k != "graphcomp")
        ratio = latency["graphcomp"] / latency[reference] if latency[reference] else float("nan")
        state = "tuned" if "tuning" in report else "untuned"
        lines.append(f"  latency  {reference} {latency[reference]:.3f} ms, graphcomp "
                     f"{latency['graphcomp']:.3f} ms (ratio {ratio:.2f}, {state})")
    if "tuning" in report:
        tuning = report["tuning"]
        lines.append(
            f"  tuning   {tuning['trials']} trials in {tuning['seconds']:.0f} s "
            f"({tuning['trials_per_minute']:.0f}/min), {tuning['tasks']} kernels: "
            f"{tuning['reused_tasks']} reused, {tuning['applied_tasks']} applied; "
            f"database {tuning['database']}"
        )
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


# --- tune-db ----------------------------------------------------------------------------------


def _cmd_tune_db_list(args) -> int:
    if args.limit < 0:
        raise OptionError(f"--limit must be 0 or more, got {args.limit}")
    database = _open_tuning_db(args.tuning_db)
    summaries = database.summaries()
    if not summaries:
        console.print(f"no tuning records in {database.folder}")
        return 0
    for summary in summaries:
        target = summary.target
        console.print(
            f"[bold]{summary.key}[/] ({target.get('kind')}, "
            f"{target.get('mcpu') or target.get('arch') or 'generic'}, "
            f"{target.get('num-cores', '?')} cores): {len(summary.workloads)} workloads, "
            f"{summary.tuned_workloads} with a working schedule, {summary.records} records",
            highlight=False,
        )
        _print_workload_table(summary.workloads, args.limit)
    return 0


def _open_tuning_db(folder: Path | None):
    """Open the database that tune-db reads; an explicit --tuning-db folder must exist, so
    that a mistyped path is not reported as an empty database."""
    from graphcomp.backends.tvm.tuning_db import TuningDatabase

    if folder is not None and not folder.exists():
        raise OptionError(f"--tuning-db {folder}: folder not found; give the folder that "
                          "'compile --tune --tuning-db' wrote, or leave the option out to use "
                          "the default database")
    return TuningDatabase(folder)


def _print_workload_table(workloads, limit: int) -> None:
    table = Table(title_justify="left")
    for column in ("kernel", "records", "best ms"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    # Kernels without a working schedule (infinite best time) come first.
    slowest_first = sorted(workloads, key=lambda w: w.best_seconds(), reverse=True)
    shown = slowest_first if limit == 0 else slowest_first[:limit]
    for workload in shown:
        best = workload.best_seconds()
        table.add_row(workload.name or f"workload {workload.index}", str(len(workload.records)),
                      "failed" if best == float("inf") else f"{best * 1000:.4g}")
    if len(shown) < len(workloads):
        table.caption = f"{len(workloads) - len(shown)} faster kernels not shown (--limit 0)"
    console.print(table)


def _cmd_tune_db_prune(args) -> int:
    database = _open_tuning_db(args.tuning_db)
    key = args.target
    if key is not None and not any(path.stem == key for path in database.files()):
        key = _target_key_of_name(key)
    for path, before, after in database.prune(args.keep, key):
        if args.keep == 0:
            console.print(f"removed {path} ({before} records)")
        else:
            console.print(f"{path}: kept {after} of {before} records")
    return 0


def _target_key_of_name(name: str) -> str:
    from graphcomp.backends.tvm import resolve_target
    from graphcomp.backends.tvm.targets import export_json
    from graphcomp.backends.tvm.tuning_db import target_key

    return target_key(export_json(resolve_target(name)))


# --- run, passes, targets ---------------------------------------------------------------------


def _cmd_run(args) -> int:
    from graphcomp.backends.tvm import load_artifact
    from graphcomp.serialize import write_bytes_atomic

    if args.benchmark < 0:
        raise OptionError(f"--benchmark must be 0 or more runs, got {args.benchmark}")
    if args.output is not None:
        _check_output_file(args.output)
    from graphcomp.backends.tvm.aarch64_runner import needs_emulation, run_artifact
    from graphcomp.backends.tvm.artifact import read_artifact

    if args.artifact.is_dir() and (args.artifact / "manifest.json").is_file() \
            and needs_emulation(args.artifact):
        # An aarch64 artifact on another host runs under qemu-aarch64.
        if args.benchmark:
            raise OptionError("--benchmark times native runs; emulated aarch64 timings mean "
                              "nothing, so run this artifact on an aarch64 machine to time it")
        contents = read_artifact(args.artifact)
        feeds = _read_inputs(args.input, contents.inputs, args.allow_non_finite)
        _check_index_inputs(args.artifact, args.input, feeds)
        outputs = run_artifact(args.artifact, feeds)
        model = None
    else:
        model = load_artifact(args.artifact)
        feeds = _read_inputs(args.input, model.inputs, args.allow_non_finite)
        _check_index_inputs(args.artifact, args.input, feeds)
        outputs = model.run(feeds)
    for name, array in outputs.items():
        console.print(f"{name}: {array.dtype}{list(array.shape)} min {array.min():.6g} "
                      f"max {array.max():.6g} mean {array.mean():.6g}", highlight=False)
    if args.benchmark > 0:
        console.print(f"median latency over {args.benchmark} runs: "
                      f"{model.benchmark(feeds, repeat=args.benchmark):.3f} ms")
    if args.output is not None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        try:
            write_bytes_atomic(args.output, buffer.getvalue())
        except OSError as exc:
            raise OptionError(f"-o {args.output}: cannot write the file ({exc.strerror})") from None
        console.print(f"wrote {args.output}")
    return 0


def _check_output_file(path: Path) -> None:
    """Reject an unusable ``run -o`` path before the model runs."""
    if path.is_dir():
        raise OptionError(f"-o {path}: is a folder; give a file name such as out.npz")
    if not path.parent.is_dir():
        raise OptionError(f"-o {path}: folder {path.parent} not found; create it first")


def _check_index_inputs(artifact: Path, specs: list[str], feeds: dict[str, np.ndarray]) -> None:
    """Raise InputRangeError for token ids or other indices outside their table, which the
    compiled library would clamp or wrap instead of failing as PyTorch does."""
    from graphcomp.backends.tvm.artifact import manifest_index_ranges
    from graphcomp.index_ranges import check_index_inputs

    ranges = manifest_index_ranges(artifact)
    for name, array in feeds.items():
        spec = next((s for s in specs if s.partition("=")[0] == name), specs[0] if specs else "")
        check_index_inputs(ranges, {name: array}, f"--input {spec}")


def _read_inputs(specs: list[str], inputs, allow_non_finite: bool) -> dict[str, np.ndarray]:
    """Load the ``--input`` arrays for the artifact's ``inputs`` (TensorSpecs), cast within a
    dtype kind and checked for NaN and infinity as ``compile --data`` arrays are."""
    from graphcomp.data import cast_input, check_finite

    input_names = [spec.name for spec in inputs]
    dtypes = {spec.name: spec.dtype for spec in inputs}
    feeds = {}
    for spec in specs:
        name, sep, file_name = spec.partition("=")
        if not sep:
            if len(input_names) != 1:
                raise OptionError(
                    f"--input {spec}: the model has inputs {input_names}; write NAME=FILE.npy"
                )
            name, file_name = input_names[0], spec
        if name not in dtypes:
            raise OptionError(f"--input {spec}: the model has no input named '{name}'; its "
                              f"inputs: {', '.join(input_names)}")
        if name in feeds:
            raise OptionError(f"--input {spec}: input '{name}' is given twice")
        path = Path(file_name)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise OptionError(f"--input {spec}: {path} not found") from None
        except (OSError, ValueError) as exc:
            raise OptionError(
                f"--input {spec}: {path} is not a readable .npy file ({exc})"
            ) from None
        feeds[name] = cast_input(array, name, dtypes[name], f"--input {spec}")
        if not allow_non_finite:
            check_finite(feeds[name], name, f"--input {spec}", per_example=False,
                         remedy="replace them, or pass --allow-non-finite to run them anyway")
    missing = [name for name in input_names if name not in feeds]
    if missing:
        raise OptionError(f"missing --input for {missing}; the model's inputs are {input_names}")
    return feeds


def _cmd_passes(args) -> int:
    from graphcomp.pipeline import DEFAULT_PIPELINE, available_passes, pass_package

    rows = []
    for name, cls in sorted(available_passes().items()):
        contract = "; ".join(f"{word} {', '.join(getattr(cls, word))}"
                             for word in ("requires", "establishes", "invalidates")
                             if getattr(cls, word))
        rows.append({"name": name, "package": pass_package(cls),
                     "lossless": cls.lossless, "contract": contract,
                     "options": ", ".join(f"{key}:{cls.option_kind(key)}"
                                          for key in cls.options),
                     "summary": cls.summary})
    if args.json:
        print(json.dumps({"passes": rows, "default_pipeline": DEFAULT_PIPELINE}, indent=2))
        return 0
    table = Table(title="passes", title_justify="left")
    for column in ("name", "package", "lossless", "contract", "options", "summary"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["package"], "yes" if row["lossless"] else "no",
                      row["contract"], row["options"], row["summary"])
    console.print(table)
    console.print(f"default pipeline: {DEFAULT_PIPELINE}")
    return 0


def _cmd_targets(args) -> int:
    from graphcomp.backends.tvm import list_targets

    for name, target_json in list_targets().items():
        line = Text.assemble((name, "bold"), f": {json.dumps(target_json)}")
        console.print(line, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
