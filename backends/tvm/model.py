"""Build a graph with TVM, and the BuiltModel that runs, times and exports the result."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from graphcomp.errors import BackendError, ShapeError
from graphcomp.ir import Graph

from .lower import TensorSpec, lower_with_weights
from .targets import export_json, host_incompatibility, resolve_target

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)


def build(graph: Graph, target: str = "cpu", tuning_database: Any = None) -> "BuiltModel":
    """Lower ``graph`` to Relax and compile it for the named target (see targets.py).

    CPU targets use TVM's default Relax pipeline; GPU targets add dlight schedules with a
    fallback when a rule fails (gpu.py). With ``tuning_database`` (a MetaSchedule database,
    such as ``tune(...).database``), kernels it has records for use the tuned schedules
    (tuning.py). Raises BackendError when TVM cannot compile.
    TVM generates machine code lazily: the first ``run`` of the result, or its ``export``,
    takes seconds more on a large model.
    """
    import tvm

    tvm_target = resolve_target(target)
    started = time.perf_counter()
    module, weights = lower_with_weights(graph, tvm_target)
    pipeline: Any = "default"
    scope: Any = contextlib.nullcontext()
    if tuning_database is not None:
        from .tuning import tuned_pipeline

        pipeline = tuned_pipeline(tvm_target)
        scope = tuning_database  # MetaSchedule's tuned pipeline reads the database in scope
    elif "gpu" in tvm_target.keys:
        from .gpu import gpu_pipeline

        pipeline = gpu_pipeline(tvm_target)
    try:
        with scope:
            executable = tvm.compile(module, target=tvm_target, relax_pipeline=pipeline)
    except Exception as exc:  # TVM reports compile failures with many exception types
        raise BackendError(
            f"TVM failed to compile graph '{graph.name}' for target '{target}': {exc}"
        ) from exc
    logger.info(
        "built graph '%s' for %s in %.2f s", graph.name, target, time.perf_counter() - started
    )
    return BuiltModel(
        library=executable,
        target_name=target,
        target=tvm_target,
        inputs=[TensorSpec.of(v) for v in graph.inputs],
        outputs=[TensorSpec.of(v) for v in graph.outputs],
        weights=weights.arrays,
    )


class BuiltModel:
    """A compiled model with its weights: run it, time it, or export it as an artifact.

    ``library`` is what ``relax.VirtualMachine`` loads: the executable from ``tvm.compile``
    or a library loaded from an artifact. A model built for another machine (cuda without a
    GPU, arm on x86) can be exported but not run.
    """

    def __init__(
        self,
        library: Any,
        target_name: str,
        target: "tvm.target.Target",
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        weights: Mapping[str, np.ndarray],
        library_path: Path | None = None,
    ):
        self.library = library
        # The library file a model loaded from an artifact came from; None for a fresh build.
        self.library_path = library_path
        self.target_name = target_name
        self.target = target
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.weights = dict(weights)
        self._vm = None
        self._device = None
        self._device_weights: list = []

    @property
    def target_json(self) -> dict[str, Any]:
        return export_json(self.target)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; return its outputs by name. Raises ShapeError for wrong feeds."""
        args = self._arguments(feeds)
        results = self._machine()["main"](*args)
        return {spec.name: result.numpy() for spec, result in zip(self.outputs, results)}

    def benchmark(self, feeds: Mapping[str, np.ndarray], number: int = 1, repeat: int = 5) -> float:
        """Return the median time of one run in milliseconds, from TVM's time_evaluator
        (``repeat`` measurements, each the mean of ``number`` runs)."""
        args = self._arguments(feeds)
        machine = self._machine()
        timer = machine.time_evaluator("main", self._device, number=number, repeat=repeat)
        return float(np.median(timer(*args).results)) * 1000.0

    def export(self, out_dir: Path) -> None:
        """Write the artifact (model.so, weights.npz, manifest.json) into ``out_dir``."""
        from .artifact import write_artifact

        write_artifact(self, Path(out_dir))

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise ShapeError unless ``feeds`` has exactly the inputs with their shapes and dtypes."""
        expected = [spec.name for spec in self.inputs]
        missing = [name for name in expected if name not in feeds]
        unexpected = [name for name in feeds if name not in expected]
        if missing or unexpected:
            raise ShapeError(
                f"the model expects inputs {expected}; missing {missing}, unexpected {unexpected}"
            )
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
                raise ShapeError(
                    f"input '{spec.name}' is {array.dtype}{list(array.shape)}, but the model "
                    f"expects {spec.dtype}{list(spec.shape)}"
                )

    def _arguments(self, feeds: Mapping[str, np.ndarray]) -> list:
        import tvm

        self.check_feeds(feeds)
        self._machine()  # sets the device and uploads the weights on first use
        inputs = [
            tvm.runtime.tensor(np.ascontiguousarray(feeds[spec.name]), self._device)
            for spec in self.inputs
        ]
        return inputs + self._device_weights

    def _machine(self):
        """Create the virtual machine and upload the weights on first use."""
        if self._vm is not None:
            return self._vm
        import tvm
        from tvm import relax

        reason = host_incompatibility(self.target)
        if reason is not None:
            raise BackendError(
                f"the model built for target '{self.target_name}' cannot run here: {reason}; "
                "export it and run the artifact on a matching host"
            )
        self._device = tvm.device(self.target.get_target_device_type(), 0)
        library = self.library
        if self.target.kind.name == "cuda" and not isinstance(library, tvm.runtime.Module):
            library = self._export_and_load()
        self._vm = relax.VirtualMachine(library, self._device)
        self._device_weights = [
            tvm.runtime.tensor(array, self._device) for array in self.weights.values()
        ]
        return self._vm

    def _export_and_load(self):
        # The in-memory CUDA module contains CUDA C source; the exported one contains a fatbin.
        import tvm

        from .artifact import write_library

        with tempfile.TemporaryDirectory(prefix="graphcomp-cuda-") as folder:
            path = write_library(self, Path(folder))
            # Once loaded, the library no longer needs its file.
            return tvm.runtime.load_module(str(path))
