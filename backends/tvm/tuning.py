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
ALLOCATIONS = ("flops", "even")
# With "flops" allocation a task's budget is ``trials`` times a power of two between
# 1/2 and this factor.
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
    # trial_budgets); "even" gives every task ``trials``.
    allocation: str = "flops"
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
    scheduled."""
    from tvm.s_tir import meta_schedule as ms

    from .lower import lower_to_relax

    fused = fuse_module(lower_to_relax(graph), target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    return [t for t in tasks if not (t.mod.attrs and t.mod.attrs.get("tirx.is_scheduled"))]


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


def _task_flops(task) -> float:
    """FLOPs of one call of ``task`` times its calls; 0 when TVM cannot count them."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * float(task.weight)
    except Exception:  # noqa: BLE001  (TVM raises several types for loops it cannot count)
        return 0.0


def _plan(tasks: list, database: TargetDatabase, trials: int,
          allocation: str = "even") -> list[_TaskPlan]:
    budgets = trial_budgets([_task_flops(task) for task in tasks], trials, allocation)
    plans = []
    for task, budget in zip(tasks, budgets):
        entry = database.match(task.dispatched[0])
        completed = entry.completed_trials if entry is not None else 0
        plan = _TaskPlan(task, entry, max(budget - completed, 0), budget)
        plan.finished = plan.remaining == 0
        if entry is not None:
            plan.best_seconds = entry.best_seconds()
        plans.append(plan)
    return plans


class _Progress:
    """Counts what the run measured and calls the user's progress callback."""

    def __init__(self, plans: list[_TaskPlan], callback: ProgressCallback | None):
        self.plans = plans
        self.callback = callback
        # With --trials 0 a task without records is also finished, but nothing is reused.
        self.reused = sum(1 for p in plans if p.finished and p.entry is not None)
        self.planned = sum(p.remaining for p in plans)

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
    started = time.perf_counter()
    database = TuningDatabase(options.database).for_target(tvm_target)
    # MetaSchedule's C++ code writes warnings such as "Unknown schedule rule" for every
    # pooling kernel straight to stderr; they go to the INFO log instead.
    with native_log_to_logger():
        plans = _plan(extract_tasks(graph, tvm_target), database, options.trials,
                      options.allocation)
        tracker = _Progress(plans, progress)
        pending = [p for p in plans if p.remaining > 0]
        logger.info(
            "%d tuning tasks, %d with enough records in %s, %d to tune",
            len(plans), tracker.reused, database.path, len(pending),
        )
        tracker.report()
        if pending:
            _check_measurable(tvm_target, target, options)
            with database.locked():
                _run_session(pending, plans, tvm_target, database, options, tracker)
        tracker.report()
    seconds = time.perf_counter() - started
    return TuningResult(
        database=_best_records_database(plans, database),
        database_file=database.path,
        tasks=len(plans),
        reused_tasks=tracker.reused,
        tuned_tasks=len(pending),
        trials=tracker.trials_done(),
        trials_per_task=options.trials,
        seconds=seconds,
        estimated_ms=tracker.estimated_ms(),
        untuned=[p.name for p in plans if p.best_seconds == float("inf")],
        allocation=options.allocation,
        budgets={p.name: p.budget for p in plans},
    )


def _run_session(pending, plans, target, database, options, tracker) -> None:
    """Tune the pending tasks, grouped by remaining trials (MetaSchedule's scheduler takes
    one per-task budget), with one builder, runner and cost model for all groups."""
    from tvm.s_tir import meta_schedule as ms

    from .metaschedule import (
        PersistentBuilder,
        WarmedUpXGBModel,
        make_runner,
        shutdown_runner,
    )
    from .targets import export_json
    from .tuning_workers import register_tensor_intrinsics

    register_tensor_intrinsics(export_json(target))
    work_dir = Path(tempfile.mkdtemp(prefix="graphcomp-tuning-"))
    builder = runner = None
    try:
        builder = PersistentBuilder(target, work_dir / "candidates", options)
        runner = make_runner(options)
        cost_model = WarmedUpXGBModel(num_tuning_cores=_cores(), adaptive_training=True)
        groups: dict[int, list[_TaskPlan]] = defaultdict(list)
        for plan in pending:
            groups[plan.remaining].append(plan)
        for remaining, group in sorted(groups.items(), reverse=True):
            _tune_group(group, remaining, target, database, options, tracker,
                        builder, runner, cost_model)
    finally:
        if builder is not None:
            builder.shutdown()
        if runner is not None:
            shutdown_runner(runner)
        shutil.rmtree(work_dir, ignore_errors=True)


def _tune_group(group, remaining, target, database, options, tracker, builder, runner,
                cost_model) -> None:
    from tvm.s_tir import meta_schedule as ms

    from .metaschedule import SaveBatch

    memory = ms.database.MemoryDatabase()
    for plan in group:
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
                work_dir=str(builder.work_dir),
                max_trials_global=remaining * len(group),
                max_trials_per_task=remaining,
                num_trials_per_iter=min(options.trials_per_batch, remaining),
                builder=builder,
                runner=runner,
                database=memory,
                cost_model=cost_model,
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
