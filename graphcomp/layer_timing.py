"""Time a few nodes (one layer, or the chain that would replace it) built alone with TVM.

A pass that trades accuracy for speed, such as ``lowrank``, uses ``LayerTimer`` to keep a
rewrite only when it measures faster on the compile target. The nodes are copied into a graph
of their own, with their non-constant inputs as graph inputs, built with the TVM backend for
the target and run on seeded random inputs of their real shapes. Random inputs give the
same timing as real data, because dense kernels do the same work for any values.

Builds use TVM's default schedules, unless the tuning database has a record for every kernel
of every build compared (see ``LayerTimer.compare``). A timer serves one target and caches
builds by the nodes' signature (ops, input shapes and dtypes, attributes) and results by the
pair compared, so identical layers with identical chains are built and timed once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from graphcomp.ir import Constant, Graph, Node, Value

logger = logging.getLogger(__name__)

# A measurement repeats the nodes until one repeat lasts this long, so that timer resolution
# and call overhead do not dominate kernels of a few microseconds.
MIN_REPEAT_MS = 5.0
MAX_RUNS_PER_REPEAT = 10_000
DEFAULT_REPEAT = 5  # repeats; the median is reported


@dataclass(frozen=True)
class Timing:
    """The median time of one run in milliseconds, and whether tuned schedules were used."""

    ms: float
    tuned: bool


def unavailable_reason(target: str) -> str | None:
    """Return why ``target`` cannot be timed on this host, or None when it can.

    Code for another machine (cuda without a GPU, arm on x86) cannot run here. Arm code does
    run under qemu-aarch64, but its emulated speed is no measure of a real arm device.
    """
    from graphcomp.backends.tvm.targets import host_incompatibility, resolve_target

    return host_incompatibility(resolve_target(target))


def signature(nodes: Sequence[Node]) -> tuple:
    """Return a hashable key of what decides the nodes' run time: ops, shapes, dtypes and
    attributes (ranks are in the weight shapes). Weight values and names are left out."""
    parts = []
    for node in nodes:
        inputs = tuple((value.shape, value.dtype) for value in node.inputs)
        attrs = repr(sorted(node.attrs.items()))
        parts.append((node.op, inputs, attrs))
    return tuple(parts)


def standalone_graph(nodes: Sequence[Node], name: str = "timed") -> Graph:
    """Return a copy of ``nodes`` as a graph: the values they read but do not compute (and
    that are not constants) become its inputs, the last node's outputs its outputs."""
    produced = {id(out) for node in nodes for out in node.outputs}
    inputs: list[Value] = []
    for node in nodes:
        for value in node.inputs:
            is_new = all(value is not seen for seen in inputs)
            if id(value) not in produced and not isinstance(value, Constant) and is_new:
                inputs.append(value)
    return Graph(name, inputs, list(nodes[-1].outputs), list(nodes)).copy()


def random_feeds(inputs: Sequence[Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Return seeded standard normal arrays for ``inputs`` (values or the TensorSpecs of a
    built model: anything with a name, shape and dtype)."""
    rng = np.random.default_rng(seed)
    return {spec.name: rng.standard_normal(spec.shape).astype(spec.dtype) for spec in inputs}


class LayerTimer:
    """Builds node lists alone for one named target and times them in pairs, with caches.

    ``compare`` times a layer and its replacement in alternation, one repeat of each in turn,
    so that both see the same load on a shared machine. Builds are cached by signature (a
    layer that many chains are compared with is built once), and results by the pair.

    ``tuning_db`` is a tuning database folder; None is the default one. Its records are used
    only when they cover every kernel of both builds that ``compare`` times, because a tuned
    layer against an untuned chain (or the reverse) would compare schedules, not shapes.
    """

    def __init__(self, target: str, repeat: int = DEFAULT_REPEAT,
                 tuning_db: Path | None = None, use_tuning_db: bool = True):
        self.target = target
        self.repeat = repeat
        self.tuning_db = tuning_db
        self.use_tuning_db = use_tuning_db
        self.builds = 0  # builds made, cache hits excluded
        self._results: dict[tuple, tuple[Timing, Timing]] = {}  # by pair of signatures
        self._built: dict[tuple, Any] = {}  # (tuned, signature) -> BuiltModel
        self._database: Any = None  # TargetDatabase, opened on first use
        self._records: dict[tuple, list | None] = {}  # by signature

    def unavailable_reason(self) -> str | None:
        """Return why this timer's target cannot be timed here, or None when it can."""
        return unavailable_reason(self.target)

    def compare(self, first: Sequence[Node], second: Sequence[Node]) -> tuple[Timing, Timing]:
        """Return the median run times of both node lists, tuned only if the tuning database
        covers both. Raises BackendError when TVM cannot build one of them."""
        keys = (signature(first), signature(second))
        if keys in self._results:
            return self._results[keys]
        graphs = [standalone_graph(first), standalone_graph(second)]
        records = [self._tuning_records(graph, key) for graph, key in zip(graphs, keys)]
        if any(found is None for found in records):
            records = [None, None]
        models = [self._build(graph, key, found)
                  for graph, key, found in zip(graphs, keys, records)]
        # From the built models' own inputs: a cached build may name its input after the
        # first layer it was built for.
        feeds = [random_feeds(model.inputs) for model in models]
        numbers = [self._runs_per_repeat(model, feed) for model, feed in zip(models, feeds)]
        samples: list[list[float]] = [[], []]
        for _ in range(self.repeat):
            for side in (0, 1):
                samples[side].append(models[side].benchmark(feeds[side], number=numbers[side],
                                                            repeat=1))
        tuned = records[0] is not None
        result = (Timing(float(np.median(samples[0])), tuned),
                  Timing(float(np.median(samples[1])), tuned))
        logger.debug("timed on %s: %s %.4f ms, %s %.4f ms", self.target,
                     [node.op for node in first], result[0].ms, [node.op for node in second],
                     result[1].ms)
        self._results[keys] = result
        return result

    def _build(self, graph: Graph, key: tuple, records: list | None):
        cache_key = (records is not None, key)
        if cache_key not in self._built:
            from graphcomp.backends import tvm as tvm_backend

            database = None
            if records is not None:
                from graphcomp.backends.tvm.metaschedule import BestRecords

                database = BestRecords(records)
            started = time.perf_counter()
            self._built[cache_key] = tvm_backend.build(graph, self.target,
                                                       tuning_database=database)
            self.builds += 1
            logger.debug("built %s for timing on %s in %.2f s", [n.op for n in graph.nodes],
                         self.target, time.perf_counter() - started)
        return self._built[cache_key]

    @staticmethod
    def _runs_per_repeat(model, feeds) -> int:
        """Warm ``model`` up (its first run also generates the machine code) and return how
        many runs make one repeat last ``MIN_REPEAT_MS``."""
        model.run(feeds)
        once_ms = model.benchmark(feeds, number=1, repeat=1)
        runs = math.ceil(MIN_REPEAT_MS / max(once_ms, 1e-6))
        return int(min(max(1, runs), MAX_RUNS_PER_REPEAT))

    def _tuning_records(self, graph: Graph, key: tuple) -> list | None:
        """Return the best record of every kernel of ``graph``, or None when one is missing
        (or the database is not used)."""
        if not self.use_tuning_db:
            return None
        from graphcomp.backends.tvm.targets import resolve_target
        from graphcomp.backends.tvm.tuning_db import TuningDatabase

        target = resolve_target(self.target)
        if self._database is None:
            self._database = TuningDatabase(self.tuning_db).for_target(target)
        if not self._database.workloads:
            return None
        if key not in self._records:
            self._records[key] = self._find_records(graph, target)
        return self._records[key]

    def _find_records(self, graph: Graph, target) -> list | None:
        from graphcomp.backends.tvm.tuning import extract_tasks

        records = []
        for task in extract_tasks(graph, target):
            entry = self._database.match(task.dispatched[0])
            best = self._database.best_records(entry, 1) if entry is not None else []
            if not best:
                return None
            records.extend(best)
        return records
