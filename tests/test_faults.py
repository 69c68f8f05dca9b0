"""Faults: ``graphcomp compile --tune`` killed at random moments, then resumed.

A small conv -> pool -> linear model is compiled with one trial per kernel into a fresh
tuning database. Three runs are stopped at seeded random moments with SIGINT (as Ctrl-C) or
SIGKILL (the run and its worker processes), some before tuning starts and some after the
database has records. After each stop:

- ``graphcomp tune-db list`` reads the database, and no record is lost;
- OUT_DIR is absent or complete, never partial;
- an interrupted run (SIGINT) leaves no staging folder of its own, and the staging folder of
  a killed run (SIGKILL) is removed by the next run that gets as far as reserving its own.

A last run completes: it measures only the trials the database does not have yet, and its
artifact is complete. The test took 47 s on an idle 2-core machine and about 80 s while
other tests ran, almost all of it TVM imports and MetaSchedule's worker start-up in each run,
so it is marked slow. Two fast tests check the
clean-up of what a killed run leaves beside OUT_DIR.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from graphcomp.cli import main
from graphcomp.compiler import remove_stale_staging
from graphcomp.serialize import save_graph

from graph_helpers import Builder

pytest.importorskip("tvm")

# What a complete compile writes into OUT_DIR.
OUTPUT_FILES = {"graph.json", "graph.txt", "manifest.json", "model.so", "report.html",
                "report.json", "weights.npz"}
STOPS = [signal.SIGINT, signal.SIGKILL, signal.SIGINT]
SEED = 8
TRIALS = 1


def small_model(path: Path) -> None:
    # x[1,3,8,8] -> conv 3x3 (8 filters) -> relu -> global_avg_pool -> flatten -> linear(8->4)
    b = Builder(seed=0)
    x = b.input("x", (1, 3, 8, 8))
    conv = b.add("conv2d", [x, b.random("conv.weight", (8, 3, 3, 3)),
                            b.random("conv.bias", (8,))], "conv", pads=[1, 1, 1, 1])
    relu = b.add("relu", [conv], "relu")
    pooled = b.add("global_avg_pool", [relu], "pool")
    flat = b.add("flatten", [pooled], "flatten", axis=1)
    y = b.add("linear", [flat, b.random("fc.weight", (4, 8)), b.random("fc.bias", (4,))],
              "fc", "y")
    save_graph(b.graph(y), path)


def start_compile(model: Path, out: Path, database: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", COMPILE, str(model), "-o", str(out), "--tune",
               "--trials", str(TRIALS), "--tuning-db", str(database)]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, start_new_session=True, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# A background shell starts children with SIGINT ignored; restore Python's Ctrl-C handler so
# that SIGINT acts as it does in a terminal.
COMPILE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from graphcomp.cli import main
sys.exit(main(["compile", *sys.argv[1:]]))
"""


def record_count(database: Path) -> int:
    """Count the tuning records in every file of ``database``, skipping a last line cut by a
    kill (the database itself skips it and removes it on the next write)."""
    count = 0
    for path in sorted(database.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                assert number == len(lines), f"{path}: line {number} is corrupt"
                continue
            count += "record" in entry
    return count


def wait_for_stop_moment(process: subprocess.Popen, database: Path, rng: random.Random,
                         after_records: bool) -> None:
    """Wait a random time: 0.5 to 8 s from the start, or 0 to 3 s after the database
    gets a new record when ``after_records``."""
    start_count = record_count(database)
    deadline = time.monotonic() + 240
    if after_records:
        while process.poll() is None and time.monotonic() < deadline:
            if record_count(database) > start_count:
                break
            time.sleep(0.2)
        delay = rng.uniform(0.0, 3.0)
    else:
        delay = rng.uniform(0.5, 8.0)
    stop_at = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < stop_at:
        time.sleep(0.05)


def stop(process: subprocess.Popen, stop_signal: int) -> None:
    if process.poll() is not None:
        return
    if stop_signal == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGINT)
    try:
        process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def staging_folders(out: Path, pid: int | None = None) -> list[str]:
    """Names of the staging folders beside ``out``, of process ``pid`` or of any process."""
    prefix = f".{out.name}." if pid is None else f".{out.name}.{pid}."
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix))


def assert_absent_or_complete(out: Path) -> None:
    if not out.exists():
        return
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["verify"]["relative_error"] <= 1e-5


def assert_database_readable(database: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["tune-db", "--tuning-db", str(database), "list"]) == 0
    assert "records" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_compiles_resume(tmp_path, capsys):
    model, out, database = tmp_path / "model.json", tmp_path / "out", tmp_path / "db"
    small_model(model)
    rng = random.Random(SEED)
    records = 0
    outcomes = []
    for attempt, stop_signal in enumerate(STOPS):
        process = start_compile(model, out, database)
        try:
            wait_for_stop_moment(process, database, rng, after_records=attempt % 2 == 1)
            stop(process, stop_signal)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        stderr = process.stderr.read()
        outcomes.append((signal.Signals(stop_signal).name, process.returncode,
                         record_count(database), stderr[-2000:]))

        assert process.returncode != 1, f"internal error: {outcomes}"
        assert record_count(database) >= records, "a stop lost tuning records"
        records = record_count(database)
        if database.exists():
            assert_database_readable(database, capsys)
        assert_absent_or_complete(out)
        if stop_signal == signal.SIGINT or process.returncode == 0:
            assert staging_folders(out, process.pid) == [], outcomes

    process = start_compile(model, out, database)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert staging_folders(out) == []
    assert_absent_or_complete(out)
    assert_database_readable(database, capsys)

    # The last run measured only what the stopped runs had not: it resumed.
    report = json.loads((out / "report.json").read_text())
    measured = report["tuning"]["trials"]
    assert records > 0, f"no stop came after a record was written: {outcomes}"
    assert record_count(database) == records + measured, outcomes
    summary = [(name, code, count) for name, code, count, _ in outcomes]
    print(f"stops (signal, exit code, records): {summary}; the last run measured {measured}")


def dead_pid() -> int:
    """Return the id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_removed_and_old_output_restored(tmp_path):
    # What a compile killed between the two renames of publish_output leaves: its staging
    # folder, the previous output moved aside, and no OUT_DIR.
    out = tmp_path / "out"
    pid = dead_pid()
    staging = tmp_path / f".out.{pid}.x1y2.tmp"
    old = tmp_path / f".out.{pid}.old"
    staging.mkdir()
    (staging / "model.so").write_bytes(b"partial")
    old.mkdir()
    (old / "manifest.json").write_text('{"format": "graphcomp-tvm"}')
    alive = tmp_path / f".out.{os.getpid()}.a1b2.tmp"
    alive.mkdir()

    remove_stale_staging(out)

    assert not staging.exists()
    assert not old.exists()
    assert (out / "manifest.json").read_text() == '{"format": "graphcomp-tvm"}'
    assert alive.exists()  # a running compile's staging folder stays


def test_stale_old_output_removed_when_output_exists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("new")
    old = tmp_path / f".out.{dead_pid()}.old"
    old.mkdir()

    remove_stale_staging(out)

    assert not old.exists()
    assert (out / "manifest.json").read_text() == "new"
