"""The ``graphcomp`` command line: a thin layer over the Python API.

Exit codes: 0 on success, 2 for errors caused by the input (bad model, option, file), 1 for
internal errors (with a hint to report them), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from graphcomp import __version__
from graphcomp.errors import GraphcompError, OptionError

log = logging.getLogger("graphcomp")
console = Console()
error_console = Console(stderr=True)

ISSUES_URL = "the graphcomp issue tracker"


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except GraphcompError as exc:
        error_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        error_console.print("interrupted; no output was written")
        return 130
    except Exception as exc:  # noqa: BLE001 (the last line of defence of a command-line tool)
        if args.verbose:
            error_console.print_exception()
        error_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
            f"This is a bug in graphcomp. Rerun with -v for the traceback and report it to "
            f"{ISSUES_URL} with the command line and the model.",
            highlight=False, soft_wrap=True,
        )
        return 1


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
    inspect.set_defaults(handler=_cmd_inspect)

    compile_ = commands.add_parser("compile", help="run passes, build, verify, write an artifact")
    _add_model_arguments(compile_)
    compile_.add_argument("--target", default="cpu", help="build target (see 'graphcomp targets')")
    compile_.add_argument("--passes", metavar="PIPELINE", default=None,
                          help="comma-separated passes, options after colons "
                               "(e.g. 'fold-bn,fuse,dce'); 'none' for no passes; "
                               "default: the lossless default pipeline")
    compile_.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR",
                          help="output folder for the artifact and report.json")
    compile_.add_argument("--data", type=Path, metavar="FILE.npz",
                          help="inputs named after the graph inputs (N x input shape), "
                               "optional 'labels' for accuracy")
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
                          help="write the IR text form after each pass into this folder")
    compile_.add_argument("--repeat", type=int, default=5,
                          help="timed runs for the latency figures (default 5)")
    compile_.set_defaults(handler=_cmd_compile)

    run = commands.add_parser("run", help="run a compiled artifact on .npy inputs")
    run.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    run.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                     help="an input array; NAME may be left out when the model has one input")
    run.add_argument("-o", "--output", type=Path, metavar="FILE.npz",
                     help="write the outputs to this .npz file")
    run.add_argument("--benchmark", type=int, default=0, metavar="N",
                     help="also time N runs and print the median latency")
    run.set_defaults(handler=_cmd_run)

    passes = commands.add_parser("passes", help="list the available passes")
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
    from graphcomp.inspect import compare_graphs, node_rows
    from graphcomp.models_io import load_model
    from graphcomp.serialize import format_graph

    loaded = load_model(args.model, _input_shapes(args))
    graph = loaded.graph
    after = None
    records = []
    if args.after is not None:
        after, records = _run_after(graph, args.after)

    if args.json:
        payload = {"before": node_rows(graph)}
        if after is not None:
            payload["after"] = node_rows(after)
            payload["passes"] = records
            payload["difference"] = compare_graphs(graph, after)
        console.print_json(json.dumps(payload))
        return 0
    if args.text:
        console.print(format_graph(after if after is not None else graph), highlight=False,
                      markup=False)
        return 0
    _print_node_table(graph, f"{graph.name} ({loaded.source})")
    if after is not None:
        _print_node_table(after, f"{graph.name} after {args.after}")
        _print_pass_table(records)
        _print_difference(compare_graphs(graph, after))
    return 0


def _run_after(graph, pipeline_text):
    from graphcomp.data import random_feeds
    from graphcomp.pipeline import PassManager, parse_pipeline

    passes = parse_pipeline(pipeline_text)
    manager = PassManager(passes, feeds=random_feeds(graph, 0, 1).batches[0])
    report = manager.run(graph)
    return report.graph, report.to_dict()["records"]


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


def _print_pass_table(records) -> None:
    table = Table(title="passes", title_justify="left")
    for column in ("pass", "seconds", "nodes before", "nodes after", "changed", "max error"):
        table.add_column(column)
    for record in records:
        error = record.get("max_abs_error")
        table.add_row(record["name"], f"{record['seconds']:.3f}", str(record["nodes_before"]),
                      str(record["nodes_after"]), str(record["changed"]),
                      "-" if error is None else f"{error:.3g}")
    console.print(table)


def _print_difference(difference) -> None:
    for key in ("nodes", "params", "macs", "bytes"):
        before, after = difference["totals"][key]
        change = f"{(after - before) / before:+.1%}" if before else "n/a"
        console.print(f"{key:>7}: {before:,} -> {after:,} ({change})")
    console.print(f"removed {len(difference['removed'])} node(s), "
                  f"added {len(difference['added'])}, changed {len(difference['changed'])}")


# --- compile ----------------------------------------------------------------------------------


def _cmd_compile(args) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from graphcomp.compiler import CompileOptions, compile_model

    if args.samples < 1 or args.max_samples < 1 or args.repeat < 1:
        raise OptionError("--samples, --max-samples and --repeat must be at least 1")
    if not args.tolerance > 0:
        raise OptionError(f"--tolerance must be positive, got {args.tolerance}")
    options = CompileOptions(
        target=args.target, passes=args.passes, input_shapes=_input_shapes(args),
        data=args.data, seed=args.seed, samples=args.samples, max_samples=args.max_samples,
        tolerance=args.tolerance, verify_passes=not args.no_verify_passes,
        dump_dir=args.dump_dir, benchmark_repeat=args.repeat,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=error_console, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def step(message: str) -> None:
            log.info("%s", message)
            progress.update(task, description=message)

        report = compile_model(args.model, args.output, options, progress=step)
    _print_summary(report)
    return 0


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
        lines.append(f"  verify   artifact vs reference executor: max abs error "
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
        lines.append(f"  latency  {reference} {latency[reference]:.3f} ms, graphcomp "
                     f"{latency['graphcomp']:.3f} ms (ratio {ratio:.2f}, untuned)")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


# --- run, passes, targets ---------------------------------------------------------------------


def _cmd_run(args) -> int:
    from graphcomp.backends.tvm import load_artifact
    from graphcomp.serialize import write_bytes_atomic

    model = load_artifact(args.artifact)
    feeds = _read_inputs(args.input, [spec.name for spec in model.inputs])
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
        write_bytes_atomic(args.output, buffer.getvalue())
        console.print(f"wrote {args.output}")
    return 0


def _read_inputs(specs: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs:
        name, sep, file_name = spec.partition("=")
        if not sep:
            if len(input_names) != 1:
                raise OptionError(
                    f"--input {spec}: the model has inputs {input_names}; write NAME=FILE.npy"
                )
            name, file_name = input_names[0], spec
        path = Path(file_name)
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise OptionError(f"--input {spec}: {path} not found") from None
        except (OSError, ValueError) as exc:
            raise OptionError(f"--input {spec}: {path} is not a readable .npy file ({exc})") from None
    missing = [name for name in input_names if name not in feeds]
    if missing:
        raise OptionError(f"missing --input for {missing}; the model's inputs are {input_names}")
    return feeds


def _cmd_passes(args) -> int:
    from graphcomp.pipeline import DEFAULT_PIPELINE, available_passes

    table = Table(title="passes", title_justify="left")
    for column in ("name", "lossless", "options", "summary"):
        table.add_column(column)
    for name, cls in sorted(available_passes().items()):
        options = ", ".join(f"{key}:{kind.__name__}" for key, kind in cls.options.items())
        table.add_row(name, "yes" if cls.lossless else "no", options, cls.summary)
    console.print(table)
    console.print(f"default pipeline: {DEFAULT_PIPELINE}")
    return 0


def _cmd_targets(args) -> int:
    from graphcomp.backends.tvm import list_targets

    for name, target_json in list_targets().items():
        console.print(f"[bold]{name}[/]: {json.dumps(target_json)}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
