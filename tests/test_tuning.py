"""Auto-tuning with MetaSchedule: tuned builds are correct and faster, the tuning database is
reused across runs and models, survives a killed run, rejects corrupt files, lists and
prunes, and candidates can be measured through TVM's RPC tracker and server.

The model is one matmul kernel (x[64,256] @ w[256,256] -> relu), tuned with 4 to 8 trials:
a tuning run takes 15 to 40 s on 2 cores. Tolerance: tuned outputs equal the reference
executor to 1e-5 relative to the output scale.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from graphcomp import executor
from graphcomp.cli import main
from graphcomp.errors import OptionError
from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.serialize import save_graph
from graphcomp.shapes import infer_shapes

tvm = pytest.importorskip("tvm")
from graphcomp.backends.tvm import (  # noqa: E402
    RpcOptions,
    TuningOptions,
    build,
    resolve_target,
    tune,
)
from graphcomp.backends.tvm.tuning import (  # noqa: E402
    MAX_BUDGET_FACTOR,
    extract_tasks,
    first_round_trials,
    time_budgets,
    trial_budgets,
)
from graphcomp.backends.tvm.tuning_db import (  # noqa: E402
    TargetDatabase,
    TuningDatabase,
    TuningDatabaseError,
    default_folder,
)

TESTS = Path(__file__).parent


def matmul_relu(seed: int = 0) -> Graph:
    """x[64,256] -> matmul w[256,256] -> relu -> y[64,256]: one tuning task."""
    rng = np.random.default_rng(seed)
    x, product, y = Value("x", (64, 256)), Value("product", ()), Value("y", ())
    weight = Constant("w", (rng.standard_normal((256, 256)) * 0.1).astype(np.float32))
    nodes = [Node("mm", "matmul", [x, weight], [product]), Node("relu", "relu", [product], [y])]
    graph = Graph("matmul_relu", [x], [y], nodes)
    infer_shapes(graph)
    return graph


def two_matmuls() -> Graph:
    """matmul_relu's kernel, then a second matmul (w2[256,128]): one task shared with
    matmul_relu and one new."""
    graph = matmul_relu(seed=1)
    rng = np.random.default_rng(2)
    hidden, out = graph.outputs[0], Value("out", ())
    weight = Constant("w2", (rng.standard_normal((256, 128)) * 0.1).astype(np.float32))
    graph = Graph("two_matmuls", graph.inputs, [out],
                  [*graph.nodes, Node("mm2", "matmul", [hidden, weight], [out])])
    infer_shapes(graph)
    return graph


def feeds_for(graph: Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in graph.inputs}


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual - expected))) / scale


def database_file(folder: Path) -> Path:
    files = TuningDatabase(folder).files()
    assert len(files) == 1
    return files[0]


def record_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if "record" in line]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run of matmul_relu with 8 trials, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("tuning-db")
    graph = matmul_relu()
    events = []
    result = tune(graph, "cpu", TuningOptions(trials=8, database=folder),
                  progress=events.append)
    return graph, folder, result, events


# --- tuning and the tuned build --------------------------------------------------------------


def test_tuned_build_matches_reference(tuned):
    graph, _, result, _ = tuned
    feeds = feeds_for(graph)
    built = build(graph, "cpu", tuning_database=result.database)
    expected = executor.run(graph, feeds)["y"]
    assert relative_error(expected, built.run(feeds)["y"]) <= 1e-5
    assert result.database.hits == 1  # the build applied the tuned schedule


def test_tuned_build_is_faster(tuned):
    graph, _, result, _ = tuned
    feeds = feeds_for(graph)
    untuned_ms = build(graph, "cpu").benchmark(feeds, number=10)
    tuned_ms = build(graph, "cpu", tuning_database=result.database).benchmark(feeds, number=10)
    # Measured here: 3.9 ms untuned, 0.09 ms after 8 trials; 2x leaves room for a busy machine.
    assert tuned_ms * 2 < untuned_ms


def test_tuning_writes_records_and_progress(tuned):
    _, folder, result, events = tuned
    assert result.trials == 8
    assert result.tuned_tasks == 1
    assert result.reused_tasks == 0
    assert len(record_lines(database_file(folder))) == 8
    last = events[-1]
    assert (last.tasks_done, last.tasks_total) == (1, 1)
    assert (last.trials_done, last.trials_planned) == (8, 8)
    assert last.estimated_ms is not None and last.estimated_ms > 0
    assert any(event.task_best_ms is not None for event in events)


def test_second_tune_reuses_database(tuned):
    graph, folder, first, _ = tuned
    result = tune(graph, "cpu", TuningOptions(trials=8, database=folder))
    assert result.trials == 0
    assert result.reused_tasks == 1
    assert result.estimated_ms == pytest.approx(first.estimated_ms)
    assert len(record_lines(database_file(folder))) == 8


def test_other_model_reuses_shared_workload(tuned, tmp_path):
    _, folder, _, _ = tuned
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    graph = two_matmuls()
    assert len(extract_tasks(graph, resolve_target("cpu"))) == 2
    # Even allocation: under "flops" the lighter second matmul would get fewer trials.
    result = tune(graph, "cpu", TuningOptions(trials=4, database=copy, allocation="even"))
    assert result.reused_tasks == 1
    assert result.tuned_tasks == 1
    assert result.trials == 4
    feeds = feeds_for(graph)
    built = build(graph, "cpu", tuning_database=result.database)
    expected = executor.run(graph, feeds)["out"]
    assert relative_error(expected, built.run(feeds)["out"]) <= 1e-5
    assert result.database.hits == 2


def test_compile_cli_reuses_records(tuned, tmp_path):
    graph, folder, _, _ = tuned
    model = tmp_path / "matmul.json"
    save_graph(graph, model)
    out = tmp_path / "out"
    code = main(["compile", str(model), "-o", str(out), "--passes", "none", "--tune",
                 "--trials", "8", "--tuning-db", str(folder)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tuning"]["trials"] == 0
    assert report["tuning"]["tasks"] == 1
    assert report["tuning"]["reused_tasks"] == 1
    assert report["tuning"]["applied_tasks"] == 1
    assert report["tuning"]["database"] == str(database_file(folder))
    assert {"seconds", "trials_per_minute"} <= set(report["tuning"])
    assert report["verify"]["relative_error"] <= 1e-5


# --- a killed run, damaged files ----------------------------------------------------------------

KILLED_RUN = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell ignores SIGINT
sys.path.insert(0, {tests!r})
from test_tuning import matmul_relu
from graphcomp.backends.tvm import TuningOptions, tune
tune(matmul_relu(), "cpu", TuningOptions(trials=8, trials_per_batch=2, database={folder!r}))
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes(tmp_path, stop_signal):
    folder = tmp_path / "db"
    script = KILLED_RUN.format(tests=str(TESTS), folder=str(folder))
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            files = TuningDatabase(folder).files()
            if files and record_lines(files[0]):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the tuning run ended before any record was written"
        if stop_signal == signal.SIGKILL:
            os.killpg(process.pid, signal.SIGKILL)  # the run and its builder and runner workers
        else:
            os.kill(process.pid, signal.SIGINT)  # as Ctrl-C: the run stops its workers itself
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    path = database_file(folder)
    database = TargetDatabase(path, json.loads(path.read_text().splitlines()[0])["target"])
    database.load()  # readable after the kill
    kept = len(database.workloads[0].records)
    assert 2 <= kept < 8

    result = tune(matmul_relu(), "cpu", TuningOptions(trials=8, database=folder))
    assert result.trials == 8 - kept
    assert len(record_lines(path)) == 8


def test_cut_last_line_skipped_then_removed(tuned, tmp_path, caplog):
    _, folder, _, _ = tuned
    path = tmp_path / database_file(folder).name
    shutil.copyfile(database_file(folder), path)
    with open(path, "a") as handle:
        handle.write('{"record":0,"json":[[["Sample')  # what a kill during a write leaves
    target_json = json.loads(path.read_text().splitlines()[0])["target"]
    database = TargetDatabase(path, target_json)
    with caplog.at_level(logging.WARNING):
        database.load()
    assert "incomplete last line" in caplog.text
    assert len(database.workloads[0].records) == 8
    database.mark_done(database.workloads[0], 100)  # the next append cuts the broken line
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert json.loads(lines[-1]) == {"done": 0, "trials": 100}


def corrupt_copy(folder: Path, tmp_path: Path, line_number: int, text: str) -> Path:
    copy = tmp_path / "corrupt-db"
    shutil.copytree(folder, copy)
    path = database_file(copy)
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return copy


def test_corrupt_database_fails_with_file_name(tuned, tmp_path, capsys):
    graph, folder, _, _ = tuned
    copy = corrupt_copy(folder, tmp_path, 3, "not json")
    path = database_file(copy)
    with pytest.raises(TuningDatabaseError, match=f"{path}: corrupt tuning database at line 3"):
        tune(graph, "cpu", TuningOptions(trials=8, database=copy))
    model = tmp_path / "matmul.json"
    save_graph(graph, model)
    code = main(["compile", str(model), "-o", str(tmp_path / "out"), "--passes", "none",
                 "--tune", "--tuning-db", str(copy)])
    assert code == 2
    message = capsys.readouterr().err
    assert "tune-db" in message
    assert "prune" in message


def test_other_format_version_rejected(tuned, tmp_path):
    graph, folder, _, _ = tuned
    header = json.loads(database_file(folder).read_text().splitlines()[0])
    header["version"] = 99
    copy = corrupt_copy(folder, tmp_path, 1, json.dumps(header))
    with pytest.raises(TuningDatabaseError, match="format version 99.*reads version 1"):
        tune(graph, "cpu", TuningOptions(trials=8, database=copy))


# --- tune-db list and prune --------------------------------------------------------------------


def test_tune_db_list(tuned, capsys):
    _, folder, _, _ = tuned
    assert main(["tune-db", "--tuning-db", str(folder), "list"]) == 0
    output = capsys.readouterr().out
    assert database_file(folder).stem in output
    assert "1 workloads" in output
    assert "8 records" in output
    assert "fused_matmul_relu" in output


def test_tune_db_prune_keeps_fastest(tuned, tmp_path):
    graph, folder, _, _ = tuned
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    path = database_file(copy)
    times = sorted(np.mean(line["json"][1]) for line in record_lines(path))
    assert main(["tune-db", "--tuning-db", str(copy), "prune", "--keep", "2"]) == 0
    kept = sorted(np.mean(line["json"][1]) for line in record_lines(path))
    assert kept == pytest.approx(times[:2])
    # The pruned records still count against the trial budget: nothing is tuned again.
    assert tune(graph, "cpu", TuningOptions(trials=8, database=copy)).trials == 0


def test_tune_db_prune_target(tuned, tmp_path, capsys):
    _, folder, _, _ = tuned
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    assert main(["tune-db", "--tuning-db", str(copy), "prune", "--target", "arm",
                 "--keep", "0"]) == 2
    assert "no tuning records for target" in capsys.readouterr().err
    assert main(["tune-db", "--tuning-db", str(copy), "prune", "--target", "cpu",
                 "--keep", "0"]) == 0
    assert TuningDatabase(copy).files() == []


def test_default_folder_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_folder() == tmp_path / "graphcomp" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_folder() == Path.home() / ".cache" / "graphcomp" / "tuning"


# --- options and RPC ---------------------------------------------------------------------------


@pytest.mark.parametrize("tracker, key, message", [
    ("localhost", "k", "expected HOST:PORT"),
    ("localhost:99999", "k", "expected HOST:PORT"),
    ("127.0.0.1:9190", None, "needs --rpc-key"),
])
def test_rpc_options_rejected(tracker, key, message):
    with pytest.raises(OptionError, match=message):
        RpcOptions.parse(tracker, key)


def test_flops_allocation_gives_heavy_tasks_more_trials():
    # Four tasks: one with 13/16 of the FLOPs, so 3.25x the average share -> 4x (a power of
    # two); the lightest is 1/16 of the average -> floored at trials / 2.
    budgets = trial_budgets([13.0, 2.0, 0.75, 0.25], trials=8)
    assert budgets == [32, 4, 4, 4]


def test_flops_budgets_capped_single_task_kept():
    assert trial_budgets([1.0], trials=8) == [8]
    assert trial_budgets([5.0, 5.0], trials=8) == [8, 8]
    many = [1000.0] + [0.001] * 99
    assert trial_budgets(many, trials=8)[0] == 8 * MAX_BUDGET_FACTOR
    # Too few trials to halve: the floor is min(trials, 2).
    assert trial_budgets([9.0, 1.0], trials=2) == [4, 2]
    assert trial_budgets([9.0, 1.0], trials=1) == [2, 1]


def test_even_allocation_and_uncountable_flops_give_trials_each():
    assert trial_budgets([13.0, 2.0, 1.0], trials=8, allocation="even") == [8, 8, 8]
    assert trial_budgets([0.0, 0.0], trials=8) == [8, 8]
    with pytest.raises(OptionError, match="trial allocation must be one of time, flops, even"):
        TuningOptions(allocation="greedy").check()


def test_negative_trials_rejected():
    with pytest.raises(OptionError, match="--trials must be 0 or more"):
        TuningOptions(trials=-1).check()


def test_target_of_other_machine_needs_rpc(tmp_path):
    with pytest.raises(OptionError, match="cannot run here.*--rpc-tracker"):
        tune(matmul_relu(), "arm", TuningOptions(trials=4, database=tmp_path))


def test_rpc_tracker_without_tune_rejected(tmp_path, capsys):
    model = tmp_path / "matmul.json"
    save_graph(matmul_relu(), model)
    code = main(["compile", str(model), "-o", str(tmp_path / "out"),
                 "--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "k"])
    assert code == 2
    assert "add --tune" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracker_rejected(tmp_path):
    rpc = RpcOptions("127.0.0.1", free_port(), "k")
    with pytest.raises(OptionError, match="cannot reach the RPC tracker"):
        tune(matmul_relu(), "cpu", TuningOptions(trials=4, database=tmp_path, rpc=rpc))


def start(arguments: list[str]) -> subprocess.Popen:
    # A new session, so the test can stop the process and the workers it starts.
    return subprocess.Popen([sys.executable, "-m", *arguments], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_for_key(port: int, key: str, timeout_s: float = 60) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            if key in rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]:
                return
        except (OSError, RuntimeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no RPC server with key {key} registered within {timeout_s} s")


def test_tuning_through_rpc_tracker(tmp_path):
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    tracker_port, server_port = free_port(), free_port()
    tracker = start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                     str(tracker_port), "--port-end", str(tracker_port + 1), "--silent"])
    server = None
    try:
        server = start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                        str(server_port), "--port-end", str(server_port + 1), "--tracker",
                        f"127.0.0.1:{tracker_port}", "--key", "graphcomp-test", "--silent"])
        wait_for_key(tracker_port, "graphcomp-test")
        rpc = RpcOptions("127.0.0.1", tracker_port, "graphcomp-test")
        graph = matmul_relu()
        result = tune(graph, "cpu", TuningOptions(trials=4, database=tmp_path, rpc=rpc))
    finally:
        if server is not None:
            stop(server)
        stop(tracker)
    assert result.trials == 4
    assert result.untuned == []  # candidates ran on the RPC server
    feeds = feeds_for(graph)
    built = build(graph, "cpu", tuning_database=result.database)
    expected = executor.run(graph, feeds)["y"]
    assert relative_error(expected, built.run(feeds)["y"]) <= 1e-5


# --- TVM's native log lines --------------------------------------------------------------------


NATIVE_LOGGER = "graphcomp.backends.tvm.native_log"


@pytest.fixture
def captured_log_only(caplog, monkeypatch):
    """Keep only caplog's handler on the root logger, so that a handler that an earlier CLI
    call installed does not print the logged lines to stderr."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [caplog.handler])
    return caplog


def test_native_schedule_warning_goes_to_log(capfd, captured_log_only):
    # MetaSchedule warns "Unknown schedule rule meta_schedule.pool_max" from C++ straight to
    # file descriptor 2 while it generates the search space of a max-pool kernel.
    from tvm import te, topi
    from tvm.s_tir import meta_schedule as ms

    from graphcomp.backends.tvm.native_log import native_log_to_logger
    from graphcomp.backends.tvm.targets import export_json
    from graphcomp.backends.tvm.tuning_workers import register_tensor_intrinsics

    target = resolve_target("cpu")
    # Without this, TuneContext imports every target's tensor intrinsics (tens of seconds).
    register_tensor_intrinsics(export_json(target))
    x = te.placeholder((1, 4, 8, 8), name="x")
    y = topi.nn.pool2d(x, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), "max")
    module = tvm.IRModule({"main": te.create_prim_func([x, y])})
    context = ms.TuneContext(mod=module, target=target,
                             space_generator="post-order-apply", task_name="pool", num_threads=1)
    with captured_log_only.at_level(logging.INFO, logger=NATIVE_LOGGER), \
            native_log_to_logger():
        spaces = context.generate_design_space()

    assert spaces
    assert "Unknown schedule rule" not in capfd.readouterr().err
    logged = [record.getMessage() for record in captured_log_only.records
              if record.name == NATIVE_LOGGER]
    assert any("Unknown schedule rule" in line for line in logged)
    assert any("cpu.meta_schedule.pool_max" in line for line in logged)  # continuation line


def test_native_log_passes_other_output_on(capfd, captured_log_only):
    from graphcomp.backends.tvm.native_log import native_log_to_logger

    with captured_log_only.at_level(logging.INFO, logger=NATIVE_LOGGER), \
            native_log_to_logger():
        os.write(2, b"\r\x1b[2Kbar 3/10")  # a progress bar redraw, no newline
        os.write(2, b"[00:01:02] /src/rule.cc:64: Warning: native\n  continued\n")
        os.write(2, b"[warning] a Python line\n  indented, not TVM's\n")

    err = capfd.readouterr().err
    assert err == "\r\x1b[2Kbar 3/10[warning] a Python line\n  indented, not TVM's\n"
    logged = [record.getMessage() for record in captured_log_only.records
              if record.name == NATIVE_LOGGER]
    assert logged == ["TVM: [00:01:02] /src/rule.cc:64: Warning: native", "TVM:   continued"]


def test_time_allocation_gives_slow_tasks_more_trials():
    # Times 10, 4, 1, 1 ms: relative to the 4 ms average 2.5 -> 2x, 1 -> 1x, 0.25 -> none.
    assert time_budgets([0.010, 0.004, 0.001, 0.001], trials=4) == [8, 4, 0, 0]
    # A task without a working schedule gets the average.
    assert time_budgets([0.002, float("inf")], trials=4) == [4, 4]
    many = [1.0] + [1e-6] * 99
    assert time_budgets(many, trials=4)[0] == 4 * MAX_BUDGET_FACTOR


def test_time_allocation_splits_trials_in_two_rounds():
    assert first_round_trials(16, "time") == 8
    assert first_round_trials(1, "time") == 1
    assert first_round_trials(16, "flops") == 16


def same_matmul_twice() -> Graph:
    """relu(x @ w1) and x @ w2 with the same shapes: two tasks, one anchor block."""
    rng = np.random.default_rng(4)
    x = Value("x", (64, 256))
    p1, y1, y2 = Value("p1", ()), Value("y1", ()), Value("y2", ())
    w1, w2 = (Constant(name, (rng.standard_normal((256, 256)) * 0.1).astype(np.float32))
              for name in ("w1", "w2"))
    nodes = [Node("mm1", "matmul", [x, w1], [p1]), Node("relu", "relu", [p1], [y1]),
             Node("mm2", "matmul", [x, w2], [y2])]
    graph = Graph("same_matmul_twice", [x], [y1, y2], nodes)
    infer_shapes(graph)
    return graph


@pytest.fixture(scope="module")
def same_anchor_database(tmp_path_factory):
    """same_matmul_twice tuned with 2 trials per task."""
    folder = tmp_path_factory.mktemp("same-anchor")
    tune(same_matmul_twice(), "cpu", TuningOptions(trials=2, allocation="even",
                                                   database=folder))
    return folder


@pytest.mark.slow
def test_schedule_moves_to_task_with_same_anchor(same_anchor_database, tmp_path):
    # Onto more fused ops, with TVM's anchor trace. The other direction rewrites the trace
    # and applies only to traces that move a consumer into the tiles, which a 2-trial
    # search does not always produce, so it is not tested here.
    slow_task = "fused_matmul_relu"
    from graphcomp.backends.tvm.tuning import _best_records_database, _plan, _Progress, _Session

    graph = same_matmul_twice()
    target = resolve_target("cpu")
    shutil.copytree(same_anchor_database, tmp_path / "db")
    database = TuningDatabase(tmp_path / "db").for_target(target)
    plans = {p.name: p for p in _plan(extract_tasks(graph, target), database, 2)}
    assert set(plans) == {"matmul", "fused_matmul_relu"}
    # Pretend the fused task is far slower: it must receive the plain matmul's schedule.
    received = plans[slow_task]
    received.best_seconds = 1.0
    stored = len(received.entry.records)
    options = TuningOptions(trials=2, database=tmp_path / "db")
    with _Session(target, "cpu", database, options) as session:
        session._start()
        session.transfer_schedules(list(plans.values()), _Progress(list(plans.values()), None))
    assert len(received.entry.records) == stored + 1
    assert received.entry.records[-1].mean_seconds < 1.0  # measured, not failed
    # The build applies only the moved schedule to the receiving task (its own records are
    # left out) and still computes both outputs.
    received.entry.records[:] = received.entry.records[-1:]
    best = _best_records_database(list(plans.values()), database)
    feeds = feeds_for(graph)
    outputs = build(graph, "cpu", tuning_database=best).run(feeds)
    expected = executor.run(graph, feeds)
    assert relative_error(expected["y1"], outputs["y1"]) <= 1e-5
    assert relative_error(expected["y2"], outputs["y2"]) <= 1e-5
