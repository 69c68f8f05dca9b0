"""Auto-tuning with MetaSchedule, and the Relax pipeline that builds with the tuned schedules.

``tune`` does these steps:

1. Lower the graph to Relax and run the passes that the tuned build runs before it looks
   schedules up (``fuse_module``: legalize, fuse, build fused TIR functions), so the tasks'
   workloads are exactly what the build looks up.
2. Extract the tasks, one per fused TIR function, with MetaSchedule's relax integration.
3. Look each task up in the target's file of the tuning database (tuning_db.py). A task whose
   records reach the trial budget is reused; the others are tuned for the remaining trials.
4. Tune with MetaSchedule's task scheduler, a builder whose worker processes live for the
   whole run (``PersistentBuilder``), and a local runner or TVM's RPC runner. After each
   measured batch, a measure callback appends the batch to the database file and reports
   progress.
5. Return a MetaSchedule database holding the fastest record of every task; ``build`` (in
   model.py) applies it with ``tuned_pipeline``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from graphcomp.errors import BackendError, OptionError
from graphcomp.ir import Graph

from .intrinsics import register_intrinsics
from .native_log import native_log_to_logger
from .tuning_db import TargetDatabase, TuningDatabase, WorkloadEntry

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# MetaSchedule logs every trial at INFO level. This logger has a name under TVM's, so the CLI's
# -v, which enables the graphcomp loggers, does not print those lines.
SEARCH_LOGGER = "tvm.s_tir.meta_schedule.graphcomp"
# Records of a task that seed its evolutionary search when tuning resumes.
SEED_RECORDS = 64
ALLOCATIONS = ("time", "flops", "even")
# Records of a task whose schedules are tried on a task with the same anchor block.
MOVE_CANDIDATES = 4
# A task's budget is at most ``trials`` times this factor.
MAX_BUDGET_FACTOR = 16


@dataclass(frozen=True)
class RpcOptions:
    """A TVM RPC tracker and the key of the devices that measure candidates."""

    tracker_host: str
    tracker_port: int
    key: str

    @classmethod
    def parse(cls, tracker: str, key: str | None) -> "RpcOptions":
        """Parse ``HOST:PORT``; raises OptionError for a malformed address or missing key."""
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionError(f"--rpc-tracker {tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
        if not key:
            raise OptionError("--rpc-tracker needs --rpc-key, the key the RPC servers registered")
        return cls(host, int(port), key)


@dataclass
class TuningOptions:
    """How much to tune and where to keep and measure the results."""

    trials: int = 8  # per task on average; tasks whose records reach their budget are reused
    # "flops" gives each task a budget that grows with its share of the model's FLOPs (see
    # trial_budgets); "time" spends half of the trials that way and the other half where
    # the measured time is (see time_budgets); "even" gives every task ``trials``.
    allocation: str = "time"
    database: Path | None = None  # tuning database folder; None is tuning_db.default_folder()
    rpc: RpcOptions | None = None  # None measures on this machine
    trials_per_batch: int = 16  # candidates built and measured together
    # Evolutionary search: candidates per generation and generations per batch. Smaller than
    # MetaSchedule's defaults (512, 4), because search time grows with both and short runs
    # of a few batches per task dominate here. NOTE: chosen for speed, not compared for the
    # quality of the schedules found.
    population: int = 128
    generations: int = 3
    seed: int = 0
    build_timeout_s: float = 30.0
    run_timeout_s: float = 30.0
    workers: int | None = None  # builder processes; None is the CPU count

    def check(self) -> None:
        if self.trials < 0:
            raise OptionError(f"--trials must be 0 or more, got {self.trials}")
        if self.allocation not in ALLOCATIONS:
            raise OptionError(f"trial allocation must be one of {', '.join(ALLOCATIONS)}, "
                              f"got {self.allocation!r}")
        if self.trials_per_batch < 1 or self.population < 2 or self.generations < 0:
            raise OptionError("trials_per_batch, population and generations must be positive")


@dataclass
class TuningProgress:
    """The state of a tuning run, passed to the progress callback after each batch."""

    tasks_total: int
    tasks_done: int  # reused tasks included
    reused_tasks: int
    trials_done: int  # measured in this run
    trials_planned: int  # maximum trials this run measures
    task_name: str = ""
    task_best_ms: float | None = None  # of the task just measured
    estimated_ms: float | None = None  # sum over tasks of calls x best kernel time


ProgressCallback = Callable[[TuningProgress], None]


@dataclass
class TuningResult:
    """The result of ``tune``: the database that ``build`` applies, and report figures."""

    database: Any  # a MetaSchedule Database with the fastest record of each task
    database_file: Path
    tasks: int
    reused_tasks: int
    tuned_tasks: int
    trials: int
    trials_per_task: int
    seconds: float
    estimated_ms: float | None
    untuned: list[str] = field(default_factory=list)  # tasks without any working schedule
    allocation: str = "even"
    budgets: dict[str, int] = field(default_factory=dict)  # task name -> trials in all

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.trials / self.seconds if self.seconds > 0 else 0.0

    def to_report(self) -> dict[str, Any]:
        return {
            "trials": self.trials,
            "trials_per_task": self.trials_per_task,
            "trial_allocation": self.allocation,
            "largest_task_budgets": dict(
                sorted(self.budgets.items(), key=lambda item: -item[1])[:5]),
            "tasks": self.tasks,
            "reused_tasks": self.reused_tasks,
            "tuned_tasks": self.tuned_tasks,
            "untuned_tasks": self.untuned,
            "applied_tasks": getattr(self.database, "hits", None),
            "seconds": round(self.seconds, 2),
            "trials_per_minute": round(self.trials_per_minute, 1),
            "estimated_kernel_ms": None if self.estimated_ms is None
            else round(self.estimated_ms, 4),
            "database": str(self.database_file),
        }


# --- the Relax side: passes shared by task extraction and the tuned build -----------------------


def _backend_pipeline(target: "tvm.target.Target"):
    # TVM 0.27's relax.pipeline.dataflow_lower_passes looks the function up on the backend
    # package, whose __init__ does not export it for cpu_generic and cuda: use the module.
    import importlib

    if target.kind.name == "llvm":
        name = "cpu_generic"
    elif target.kind.name in ("cuda", "rocm"):
        name = target.kind.name
    elif "gpu" in target.keys:
        name = "gpu_generic"
    else:
        raise BackendError(f"tuning does not support target kind '{target.kind.name}'")
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def fuse_module(module: "tvm.IRModule", target: "tvm.target.Target") -> "tvm.IRModule":
    """Run the passes that turn Relax operators into fused TIR functions, as the tuned build
    does before it applies the database (TVM's ``compile_relax`` uses the same sequence)."""
    import tvm
    from tvm import relax

    passes = [
        *_backend_pipeline(target).library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    # FuseOps fuses according to the context's opt_level: extraction and build must agree.
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(module)


def tuned_pipeline(target: "tvm.target.Target") -> "tvm.transform.Pass":
    """Return the Relax pipeline that builds with the MetaSchedule database in scope
    (``with database:``): fuse, apply the database, schedule what it lacks on GPUs with
    dlight (gpu.py), then TVM's lowering and finalizing passes for the target."""
    import tvm
    from tvm import relax

    backend = _backend_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="GraphcompTunedPipeline")
    def pipeline(module, _context):
        # The database's schedules may tensorize with the target's intrinsics.
        register_intrinsics(target)
        module = fuse_module(module, target)
        with target:
            module = relax.transform.MetaScheduleApplyDatabase()(module)
            if "gpu" in target.keys:
                from .gpu import gpu_schedule_rules, schedule_gpu_kernels

                module = schedule_gpu_kernels(gpu_schedule_rules())(module)
            passes = backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
            return tvm.transform.Sequential(passes)(module)

    return pipeline


def extract_tasks(graph: Graph, target: "tvm.target.Target") -> list:
    """Return MetaSchedule's tasks of ``graph``: one per fused TIR function not yet
    scheduled. A reshape kernel that the build turns into a view of its input is not one."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from .lower import lower_to_relax

    fused = fuse_module(lower_to_relax(graph, target), target)
    fused = relax.transform.RewriteDataflowReshape()(fused)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    return [t for t in tasks if not _is_scheduled(t.dispatched[0])]


def _is_scheduled(mod) -> bool:
    """Return whether a task's module, or its function, is marked as scheduled already."""
    for attrs in (mod.attrs, *(func.attrs for func in mod.functions.values())):
        if attrs and attrs.get("tirx.is_scheduled"):
            return True
    return False


# --- the plan: which tasks need how many more trials -------------------------------------------


@dataclass
class _TaskPlan:
    task: Any  # MetaSchedule ExtractedTask
    entry: WorkloadEntry | None
    remaining: int  # trials still to measure
    budget: int  # trials this task gets in all
    best_seconds: float = float("inf")
    measured: int = 0  # in this run
    finished: bool = False

    @property
    def name(self) -> str:
        return str(self.task.task_name)

    def set_budget(self, budget: int) -> None:
        """Set the budget; the trials the database lacks for it are what remains."""
        completed = self.entry.completed_trials if self.entry is not None else 0
        self.budget = budget
        self.remaining = max(budget - completed, 0)
        self.finished = self.remaining == 0

    @property
    def mod(self):
        return self.task.dispatched[0]


def trial_budgets(flops: list[float], trials: int, allocation: str = "flops") -> list[int]:
    """Return each task's trial budget from its FLOPs (calls included) and ``trials``.

    "even" gives every task ``trials``. "flops" spends the search where the time is. A task
    with the average share of FLOPs gets ``trials``; one with k times that share gets about k
    times as many. Budgets are rounded to a power of two and kept between ``trials / 2`` and
    ``MAX_BUDGET_FACTOR * trials``. Few distinct budgets keep MetaSchedule's runs few (it takes
    one budget per run). A model of one task, or of tasks of equal FLOPs, gets ``trials`` each.
    """
    total = float(sum(flops))
    if allocation == "even" or trials == 0 or total <= 0:
        return [trials] * len(flops)
    lowest = max(min(trials, 2), trials // 2)
    budgets = []
    for task_flops in flops:
        relative = task_flops * len(flops) / total  # 1.0 for the average task
        factor = 2.0 ** round(math.log2(relative)) if relative > 0 else 0.0
        budgets.append(int(min(max(trials * factor, lowest), trials * MAX_BUDGET_FACTOR)))
    return budgets


def first_round_trials(trials: int, allocation: str) -> int:
    """Return the ``trials`` that the first round spends by FLOPs: half of them under
    "time" allocation, which spends the rest by measured time, else all."""
    return max(trials // 2, min(trials, 1)) if allocation == "time" else trials


def time_budgets(seconds: list[float], trials: int) -> list[int]:
    """Return each task's extra trials in the second round of "time" allocation, from its
    measured time after the first round (calls x best time, seconds) and ``trials``, the
    second round's average per task.

    FLOPs miss where memory-bound kernels spend time: on PP-OCRv4 det a depthwise conv with
    1.5% of the FLOPs took 5% of the time. A task with k times the average time gets about
    k * ``trials`` more, rounded to a power of two. No task gets more than
    ``MAX_BUDGET_FACTOR * trials``, and one under half the average gets none. A task with no
    working schedule yet (infinite time) gets ``trials``.
    """
    finite = [t for t in seconds if math.isfinite(t)]
    total = float(sum(finite))
    extras = []
    for task_seconds in seconds:
        if not math.isfinite(task_seconds) or total <= 0:
            extras.append(trials)
            continue
        relative = task_seconds * len(finite) / total  # 1.0 for the average task
        if relative < 0.5:
            extras.append(0)
            continue
        factor = 2.0 ** round(math.log2(relative))
        extras.append(int(min(trials * factor, trials * MAX_BUDGET_FACTOR)))
    return extras


def _task_flops(task) -> float:
    """FLOPs of one call of ``task`` times its calls; 0 when TVM cannot count them."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * float(task.weight)
    except Exception:  # noqa: BLE001  (TVM raises several types for loops it cannot count)
        return 0.0


def _plan(tasks: list, database: TargetDatabase, trials: int,
          allocation: str = "even") -> list[_TaskPlan]:
    """Plan the first round: budgets by FLOPs ("flops", "time") or even."""
    flops_rule = "even" if allocation == "even" else "flops"
    budgets = trial_budgets([_task_flops(task) for task in tasks],
                            first_round_trials(trials, allocation), flops_rule)
    plans = []
    for task, budget in zip(tasks, budgets):
        entry = database.match(task.dispatched[0])
        plan = _TaskPlan(task, entry, 0, budget)
        plan.set_budget(budget)
        if entry is not None:
            plan.best_seconds = entry.best_seconds()
        plans.append(plan)
    return plans


def _add_time_budgets(plans: list[_TaskPlan], database: TargetDatabase, trials: int,
                      allocation: str) -> None:
    """Second round of "time" allocation: raise each budget by ``time_budgets``, from the
    best of the task's first-round records (the first ``budget`` records in the file, so
    that a later run computes the same budgets and tunes nothing more)."""
    second = trials - first_round_trials(trials, allocation)
    if allocation != "time" or second <= 0:
        return
    seconds = []
    for plan in plans:
        entry = plan.entry or database.match(plan.mod)
        first = entry.records[:plan.budget] if entry is not None else []
        best = min((r.mean_seconds for r in first), default=math.inf)
        seconds.append(float(plan.task.weight) * best)
    for plan, extra in zip(plans, time_budgets(seconds, second)):
        plan.set_budget(plan.budget + extra)


class _Progress:
    """Counts what the run measured and calls the user's progress callback."""

    def __init__(self, plans: list[_TaskPlan], callback: ProgressCallback | None):
        self.plans = plans
        self.callback = callback
        # With --trials 0 a task without records is also finished, but nothing is reused.
        self._reused = {id(p) for p in plans if p.finished and p.entry is not None}
        self.planned = sum(p.remaining for p in plans)

    @property
    def reused(self) -> int:
        return len(self._reused)

    def plan_more(self, plans: list[_TaskPlan]) -> None:
        """Count a second round's trials; its tasks are no longer reused."""
        self.planned += sum(p.remaining for p in plans)
        self._reused -= {id(p) for p in plans}

    def trials_done(self) -> int:
        return sum(p.measured for p in self.plans)

    def estimated_ms(self) -> float | None:
        """Sum over tasks of calls x best time; None until some task has a best time."""
        tuned = [p for p in self.plans if p.best_seconds < float("inf")]
        if not tuned:
            return None
        return 1000.0 * sum(float(p.task.weight) * p.best_seconds for p in tuned)

    def report(self, plan: _TaskPlan | None = None) -> None:
        if self.callback is None:
            return
        done = sum(1 for p in self.plans if p.finished or p.measured >= p.remaining)
        best = None
        if plan is not None and plan.best_seconds < float("inf"):
            best = plan.best_seconds * 1000.0
        self.callback(TuningProgress(
            tasks_total=len(self.plans), tasks_done=done, reused_tasks=self.reused,
            trials_done=self.trials_done(), trials_planned=self.planned,
            task_name=plan.name if plan is not None else "", task_best_ms=best,
            estimated_ms=self.estimated_ms(),
        ))


# --- tuning ------------------------------------------------------------------------------------


def tune(
    graph: Graph, target: str = "cpu", options: TuningOptions | None = None,
    progress: ProgressCallback | None = None,
) -> TuningResult:
    """Tune every task of ``graph`` for ``target`` that the tuning database lacks; return the
    database of best schedules for ``build(graph, target, tuning_database=...)``.

    Raises TuningDatabaseError for a corrupt or locked database file, OptionError for bad
    options or an unreachable RPC tracker, and BackendError when MetaSchedule fails.
    """
    from .targets import resolve_target

    options = options or TuningOptions()
    options.check()
    tvm_target = resolve_target(target)
    # Records that tensorize apply only with the intrinsics registered, and the records of a
    # run that tunes nothing are checked (_best_records_database) before any session starts.
    register_intrinsics(tvm_target)
    started = time.perf_counter()
    database = TuningDatabase(options.database).for_target(tvm_target)
    # MetaSchedule's C++ code writes warnings such as "Unknown schedule rule" for every
    # pooling kernel straight to stderr; they go to the INFO log instead.
    with native_log_to_logger(), _Session(tvm_target, target, database, options) as session:
        plans = _plan(extract_tasks(graph, tvm_target), database, options.trials,
                      options.allocation)
        tracker = _Progress(plans, progress)
        pending = [p for p in plans if p.remaining > 0]
        logger.info(
            "%d tuning tasks, %d with enough records in %s, %d to tune",
            len(plans), tracker.reused, database.path, len(pending),
        )
        tracker.report()
        tuned = {id(p) for p in pending}
        session.tune(pending, tracker)
        _add_time_budgets(plans, database, options.trials, options.allocation)
        second = [p for p in plans if p.remaining > 0]
        if second:
            logger.info("second round (time allocation): %d tasks, %d trials",
                        len(second), sum(p.remaining for p in second))
            tracker.plan_more(second)
            tuned.update(id(p) for p in second)
            session.tune(second, tracker)
        if session.started:
            session.transfer_schedules(plans, tracker)
        tracker.report()
    seconds = time.perf_counter() - started
    return TuningResult(
        database=_best_records_database(plans, database),
        database_file=database.path,
        tasks=len(plans),
        reused_tasks=tracker.reused,
        tuned_tasks=len(tuned),
        trials=tracker.trials_done(),
        trials_per_task=options.trials,
        seconds=seconds,
        estimated_ms=tracker.estimated_ms(),
        untuned=[p.name for p in plans if p.best_seconds == float("inf")],
        allocation=options.allocation,
        budgets={p.name: p.budget for p in plans},
    )


class _Session:
    """The builder, runner and cost model of one tuning run, started by the first ``tune``
    call that has tasks to tune (with the database file locked) and stopped on exit."""

    def __init__(self, target, target_name: str, database: TargetDatabase,
                 options: TuningOptions):
        self.target = target
        self.target_name = target_name
        self.database = database
        self.options = options
        self.started = False
        self._stack = contextlib.ExitStack()
        self.builder = self.runner = self.cost_model = None

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def _start(self) -> None:
        from .metaschedule import (
            PersistentBuilder,
            WarmedUpXGBModel,
            make_runner,
            shutdown_runner,
        )
        _check_measurable(self.target, self.target_name, self.options)
        self._stack.enter_context(self.database.locked())
        register_intrinsics(self.target)
        work_dir = Path(tempfile.mkdtemp(prefix="graphcomp-tuning-"))
        self._stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
        self.builder = PersistentBuilder(self.target, work_dir / "candidates", self.options)
        self._stack.callback(self.builder.shutdown)
        self.runner = make_runner(self.options)
        self._stack.callback(shutdown_runner, self.runner)
        self.cost_model = WarmedUpXGBModel(num_tuning_cores=_cores(), adaptive_training=True)
        self.started = True

    def tune(self, pending: list[_TaskPlan], tracker: "_Progress") -> None:
        """Tune the pending tasks, grouped by remaining trials (MetaSchedule's scheduler
        takes one per-task budget)."""
        if not pending:
            return
        if not self.started:
            self._start()
        groups: dict[int, list[_TaskPlan]] = defaultdict(list)
        for plan in pending:
            groups[plan.remaining].append(plan)
        for remaining, group in sorted(groups.items(), reverse=True):
            _tune_group(group, remaining, self, tracker)

    def transfer_schedules(self, plans: list[_TaskPlan], tracker: "_Progress") -> None:
        """Try each task's best schedule on the tasks with the same anchor block (the same
        conv or matmul with other fused elementwise ops), where it is faster than theirs.

        Tuned apart, the two may end far apart: on PP-OCRv4 det, conv2d38 alone reached
        4.4 ms and the same conv fused with add and relu 7.4 ms after 256 trials each (in
        another run, 7.0 and 4.5 ms). A moved schedule is measured and stored as a record of
        the receiving task.
        """
        for group in _anchor_groups(plans, self.database):
            for receiver in group:
                donors = [d for d in group if d.best_seconds < receiver.best_seconds]
                if not donors:
                    continue
                donor = min(donors, key=lambda d: d.best_seconds)
                # Not every trace moves onto fewer fused ops: try the donor's best few.
                schedule = None
                for record in self.database.best_records(donor.entry, MOVE_CANDIDATES):
                    schedule = _move_schedule(record.trace, receiver.mod, self.target)
                    if schedule is not None:
                        break
                if schedule is None:
                    logger.debug("the schedule of %s does not apply to %s",
                                 donor.name, receiver.name)
                    continue
                seconds = self._measure(receiver, schedule)
                logger.info("schedule of %s (%.3f ms) on %s (%.3f ms): %s", donor.name,
                            1e3 * donor.best_seconds, receiver.name,
                            1e3 * receiver.best_seconds,
                            "failed" if seconds is None else f"{1e3 * seconds:.3f} ms")
                if seconds is not None:
                    receiver.best_seconds = min(receiver.best_seconds, seconds)
                    tracker.report(receiver)

    def _measure(self, plan: _TaskPlan, schedule) -> float | None:
        """Build and run one schedule of ``plan``; store it as a record and return its mean
        seconds (None when it failed to build or run)."""
        import numpy as np
        from tvm import tirx
        from tvm.s_tir import meta_schedule as ms

        from .tuning_db import FAILED_RUN_SECONDS

        args_info = ms.arg_info.ArgInfo.from_prim_func(schedule.mod["main"])
        built = self.builder.build([ms.builder.BuilderInput(schedule.mod, self.target)])[0]
        run_secs = None
        if built.error_msg is not None:
            logger.debug("building a schedule of %s failed: %s", plan.name, built.error_msg)
        else:
            # The runner names devices as tvm.device does: "cpu" for LLVM targets.
            kind = self.target.kind.name
            future = self.runner.run([ms.runner.RunnerInput(
                built.artifact_path, "cpu" if kind == "llvm" else kind, args_info)])[0]
            result = future.result()
            if result.error_msg is None:
                run_secs = result.run_secs
            else:
                logger.debug("running a schedule of %s failed: %s", plan.name, result.error_msg)
        failed = [tirx.FloatImm("float32", FAILED_RUN_SECONDS)]
        record = ms.database.TuningRecord(
            schedule.trace, plan.entry.workload(), run_secs or failed, self.target, args_info
        )
        self.database.append_records(plan.entry, [record])
        plan.measured += 1
        if run_secs is None:
            return None
        return float(np.mean([float(s) for s in run_secs]))


def _move_schedule(trace, mod, target):
    """Return a schedule of ``mod`` made from ``trace``, tuned on a function with the same
    anchor block, or None when it does not apply.

    TVM's ``schedule_using_anchor_trace`` moves a schedule onto a function with more fused
    ops, not onto one with fewer; for that direction ``_trace_for_fewer_ops`` rewrites the
    trace first."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    try:
        schedule = s_tir.Schedule(mod)
        schedule_using_anchor_trace(schedule, trace, target)
        return schedule
    except Exception:  # noqa: BLE001  (TVM raises several types for traces that do not fit)
        pass
    try:
        schedule = s_tir.Schedule(mod)
        _trace_for_fewer_ops(trace, mod).apply_to_schedule(schedule, remove_postproc=False)
        return schedule
    except Exception:  # noqa: BLE001
        return None


def _trace_for_fewer_ops(trace, mod):
    """Rewrite a trace tuned on an anchor block with fused consumers (conv -> add -> relu)
    for ``mod``, the same anchor with fewer or none.

    Instructions on blocks that ``mod`` lacks go, with every instruction that uses their
    results. Where the trace moves the anchor's consumer into the anchor's tiles
    (GetConsumers, then ReverseComputeAt), it moves a cache-write block there instead, which
    is what MetaSchedule itself generates for an anchor without a consumer.

    NOTE: checked on PP-OCRv4 det's conv2d38 only; no test covers it, because a short search
    does not reliably produce a trace of that shape.
    """
    from tvm import s_tir
    from tvm.runtime import Object
    from tvm.s_tir.schedule import Instruction, InstructionKind, Trace

    probe = s_tir.Schedule(mod)

    def has_block(name: str) -> bool:
        try:
            probe.get_sblock(str(name))
            return True
        except Exception:  # noqa: BLE001  (TVM raises its own error for a missing block)
            return False

    dropped: list = []

    def is_dropped(value) -> bool:
        return isinstance(value, Object) and any(value.same_as(d) for d in dropped)

    instructions, decisions = [], {}
    for inst in trace.insts:
        kind = inst.kind.name
        if ((kind == "GetSBlock" and not has_block(inst.attrs[0]))
                or any(is_dropped(value) for value in inst.inputs)):
            dropped.extend(inst.outputs)
            continue
        replacement = inst
        if kind == "GetConsumers":
            replacement = Instruction(InstructionKind.get("CacheWrite"), [inst.inputs[0], []],
                               [0, "global"], list(inst.outputs))
        instructions.append(replacement)
        decision = trace.get_decision(inst)
        if decision is not None:
            decisions[replacement] = decision
    return Trace(instructions, decisions)


def _anchor_groups(plans: list[_TaskPlan], database: TargetDatabase) -> list[list[_TaskPlan]]:
    """Groups of two or more tuned tasks whose anchor blocks are structurally equal."""
    import tvm_ffi
    from tvm.s_tir.analysis import find_anchor_sblock

    by_hash: dict[int, list[tuple[Any, _TaskPlan]]] = defaultdict(list)
    for plan in plans:
        if plan.entry is None:
            plan.entry = database.match(plan.mod)
        if plan.entry is None or not math.isfinite(plan.best_seconds):
            continue
        anchor = find_anchor_sblock(plan.mod)
        if anchor is not None:
            by_hash[tvm_ffi.structural_hash(anchor)].append((anchor, plan))
    groups = []
    for members in by_hash.values():
        while members:
            anchor, first = members[0]
            same = [m for m in members if tvm_ffi.structural_equal(m[0], anchor)]
            members = [m for m in members if not tvm_ffi.structural_equal(m[0], anchor)]
            if len(same) > 1:
                groups.append([plan for _, plan in same])
    return groups


def _tune_group(group: list[_TaskPlan], remaining: int, session: _Session,
                tracker: "_Progress") -> None:
    from tvm.s_tir import meta_schedule as ms

    from .metaschedule import SaveBatch

    database, options, target = session.database, session.options, session.target
    memory = ms.database.MemoryDatabase()
    for plan in group:
        plan.finished = False
        if plan.entry is None:
            plan.entry = database.add_workload(plan.mod, plan.name)
        else:
            memory.commit_workload(plan.mod)
            for record in database.best_records(plan.entry, SEED_RECORDS):
                memory.commit_tuning_record(record)
    contexts = _tune_contexts(group, target, options)
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 SaveBatch(group, database, target, tracker)]
    try:
        with _sigint_recorded() as interrupted:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[float(p.task.weight) for p in group],
                work_dir=str(session.builder.work_dir),
                max_trials_global=remaining * len(group),
                max_trials_per_task=remaining,
                num_trials_per_iter=min(options.trials_per_batch, remaining),
                builder=session.builder,
                runner=session.runner,
                database=memory,
                cost_model=session.cost_model,
                measure_callbacks=callbacks,
                task_scheduler="round-robin",
            )
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # MetaSchedule reports its failures with several types
        if interrupted():
            raise KeyboardInterrupt from exc
        raise BackendError(f"MetaSchedule tuning failed: {type(exc).__name__}: {exc}") from exc
    for plan in group:
        plan.finished = True
        # The scheduler ended this task early: its search space ran out of new candidates.
        if plan.entry.completed_trials < plan.budget:
            database.mark_done(plan.entry, plan.budget)
        plan.set_budget(plan.budget)


@contextlib.contextmanager
def _sigint_recorded() -> Iterator[Callable[[], bool]]:
    """Yield a function that returns whether SIGINT arrived. TVM turns a KeyboardInterrupt
    raised inside a MetaSchedule callback into a RuntimeError without a message."""
    received = []
    previous = signal.getsignal(signal.SIGINT)
    installed = (threading.current_thread() is threading.main_thread()
                 and previous is signal.default_int_handler)

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    if installed:
        signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)


def _tune_contexts(group: list[_TaskPlan], target, options: TuningOptions) -> list:
    from tvm.s_tir import meta_schedule as ms

    seeds = ms.utils.fork_seed(options.seed, n=len(group))
    contexts = []
    for plan, seed in zip(group, seeds):
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=options.population,
            init_min_unmeasured=min(50, options.population // 2),
            genetic_num_iters=options.generations,
        )
        contexts.append(ms.TuneContext(
            mod=plan.mod, target=target, space_generator="post-order-apply",
            search_strategy=strategy, task_name=plan.name, rand_state=seed,
            num_threads=_cores(), logger=logging.getLogger(SEARCH_LOGGER),
        ))
    return contexts


def _cores() -> int:
    return os.cpu_count() or 1


def _best_records_database(plans: list[_TaskPlan], database: TargetDatabase):
    from .metaschedule import BestRecords

    records = []
    for plan in plans:
        entry = plan.entry or database.match(plan.mod)
        if entry is not None:
            records.extend(database.best_records(entry, 1))
    return BestRecords(records)


# --- RPC ---------------------------------------------------------------------------------------


def _check_measurable(tvm_target, target_name: str, options: TuningOptions) -> None:
    """Raise OptionError when candidates for the target can be measured neither on this
    machine nor through the given RPC tracker."""
    from .targets import host_incompatibility

    if options.rpc is not None:
        check_tracker(options.rpc)
        return
    reason = host_incompatibility(tvm_target)
    if reason is not None:
        raise OptionError(
            f"tuning for target '{target_name}' measures candidates on this machine, but "
            f"code for it cannot run here: {reason}. Measure on a device with --rpc-tracker "
            "HOST:PORT --rpc-key KEY"
        )


def check_tracker(rpc: RpcOptions, timeout_s: float = 5.0) -> None:
    """Raise OptionError unless the tracker accepts a connection and has a server with the
    key."""
    from tvm import rpc as tvm_rpc

    address = f"{rpc.tracker_host}:{rpc.tracker_port}"
    try:
        # A plain connect first: TVM's tracker client retries for a minute before failing.
        socket.create_connection((rpc.tracker_host, rpc.tracker_port), timeout_s).close()
        summary = tvm_rpc.connect_tracker(rpc.tracker_host, rpc.tracker_port).summary()
    except (OSError, RuntimeError, ValueError) as exc:
        raise OptionError(
            f"cannot reach the RPC tracker at {address} ({exc}); start it with "
            f"'python -m tvm.exec.rpc_tracker --host {rpc.tracker_host} --port "
            f"{rpc.tracker_port}' or fix --rpc-tracker"
        ) from None
    keys = sorted(summary.get("queue_info", {}))
    if rpc.key not in keys:
        raise OptionError(
            f"the RPC tracker at {address} has no server with key '{rpc.key}' (keys: "
            f"{', '.join(keys) or 'none'}); start one with 'python -m tvm.exec.rpc_server "
            f"--tracker {address} --key {rpc.key}' or fix --rpc-key"
        )
