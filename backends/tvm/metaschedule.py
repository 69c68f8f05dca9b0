"""MetaSchedule objects that graphcomp's tuning defines: a builder whose workers persist, the
measure callback that saves each batch to the tuning database, and the database of best
records that the tuned build applies.

This module imports TVM when imported; tuning.py imports it only when tuning starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.database import PyDatabase
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .targets import export_json
from .tuning_db import FAILED_RUN_SECONDS
from .tuning_workers import (
    build_candidate,
    export_shared_library,
    initialize_worker,
    ready,
    run_build_job,
)

if TYPE_CHECKING:
    from .tuning import TuningOptions, _Progress, _TaskPlan
    from .tuning_db import TargetDatabase

logger = logging.getLogger(__name__)


@derived_object
class PersistentBuilder(PyBuilder):
    """A builder like MetaSchedule's LocalBuilder, but its worker processes start once per
    tuning run instead of once per batch, and build with ``build_candidate``.

    Starting a worker costs seconds (it imports TVM); a batch of candidates builds in well
    under a second each. Candidates are exported as shared libraries for a local runner and
    as MetaSchedule's tar of object files for an RPC runner, which links them on the device.
    """

    def __init__(self, target, folder: Path, options: "TuningOptions"):
        super().__init__()
        self.work_dir = Path(folder)
        self.timeout_s = options.build_timeout_s
        self._export = (
            None if options.rpc is not None
            else partial(export_shared_library, folder=str(self.work_dir))
        )
        verbose = logging.getLogger(__name__).isEnabledFor(logging.DEBUG)
        workers = options.workers or os.cpu_count() or 1
        self._pool = PopenPoolExecutor(
            max_workers=workers,
            timeout=options.build_timeout_s,
            initializer=initialize_worker,
            initargs=(export_json(target),),
            stderr=None if verbose else subprocess.DEVNULL,
        )
        # Start the workers now, so that they import TVM while the first task's search runs.
        for _ in range(workers):
            self._pool.submit(ready)

    def build(self, build_inputs: list) -> list:
        jobs = [
            (build_candidate, self._export, item.mod, item.target, None)
            for item in build_inputs
        ]
        results = []
        for outcome in self._pool.map_with_error_catching(run_build_job, jobs):
            if outcome.status == StatusKind.COMPLETE:
                results.append(BuilderResult(outcome.value, None))
            elif outcome.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(
                    None, f"build timed out after {self.timeout_s} s and was stopped"
                ))
            else:
                results.append(BuilderResult(None, f"build failed: {outcome.value}"))
        return results

    def shutdown(self) -> None:
        self._pool.shutdown()


@derived_object
class SaveBatch(PyMeasureCallback):
    """After each measured batch: append its records to the database file (one flushed
    write) and report progress. Runs after MetaSchedule's default callbacks."""

    def __init__(self, group: list["_TaskPlan"], database: "TargetDatabase", target,
                 progress: "_Progress"):
        super().__init__()
        self.group = group
        self.database = database
        self.target = target
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        from tvm import tirx

        plan = self.group[task_id]
        workload = plan.entry.workload()
        failed = [tirx.FloatImm("float32", FAILED_RUN_SECONDS)]
        records = []
        for candidate, result in zip(measure_candidates, runner_results):
            run_secs = result.run_secs if result.run_secs is not None else failed
            records.append(ms.database.TuningRecord(
                candidate.sch.trace, workload, run_secs, self.target, candidate.args_info
            ))
            if result.run_secs is not None:
                seconds = float(np.mean([float(s) for s in result.run_secs]))
                plan.best_seconds = min(plan.best_seconds, seconds)
        self.database.append_records(plan.entry, records)
        plan.measured += len(records)
        self.progress.report(plan)


@derived_object
class BestRecords(PyDatabase):
    """A read-only MetaSchedule database with one record per workload for the tuned build.
    It counts the lookups that found a record (``hits``): the tasks the build applied."""

    def __init__(self, records: list):
        super().__init__()
        self._memory = ms.database.MemoryDatabase()
        for record in records:
            self._memory.commit_workload(record.workload.mod)
            self._memory.commit_tuning_record(record)
        self.hits = 0
        self.lookups = 0

    def has_workload(self, mod) -> bool:
        return self._memory.has_workload(mod)

    def commit_workload(self, mod):
        return self._memory.commit_workload(mod)

    def commit_tuning_record(self, record) -> None:
        self._memory.commit_tuning_record(record)

    def get_top_k(self, workload, top_k: int) -> list:
        return self._memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list:
        return self._memory.get_all_tuning_records()

    def query_tuning_record(self, mod, target, workload_name=None) -> Any:
        self.lookups += 1
        record = self._memory.query_tuning_record(mod, target, workload_name)
        if record is not None:
            self.hits += 1
        return record

    def __len__(self) -> int:
        return len(self._memory)


@derived_object
class WarmedUpXGBModel(ms.cost_model.XGBModel._cls):
    """MetaSchedule's XGBoost cost model, trained only once it has its warm-up samples.

    XGBModel predicts random scores until it has ``num_warmup_samples`` measurements, yet
    it retrains after every batch from the first one. This class skips that training, which
    took about a third of the time of tuning 8 PP-OCR det convolutions (8 trials each, 2 cores).
    """

    def _train(self, xs, ys) -> None:
        if self.data_size >= self.num_warmup_samples:
            super()._train(xs, ys)


def make_runner(options: "TuningOptions"):
    """Return MetaSchedule's LocalRunner, or its RPCRunner when ``options.rpc`` is set.

    LocalRunner keeps its one worker process for the whole run already, so it pays the
    worker's start-up (importing TVM) once.
    """
    evaluator = ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False
    )
    if options.rpc is None:
        return ms.runner.LocalRunner(
            timeout_sec=options.run_timeout_s, evaluator_config=evaluator
        )
    config = ms.runner.RPCConfig(
        tracker_host=options.rpc.tracker_host,
        tracker_port=options.rpc.tracker_port,
        tracker_key=options.rpc.key,
        session_priority=1,
        session_timeout_sec=int(options.run_timeout_s),
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def shutdown_runner(runner) -> None:
    """Stop the runner's worker processes."""
    runner.pool.shutdown()
