"""Functions that MetaSchedule's builder worker processes run, and the registration of tensor
intrinsics that tuning needs.

The worker processes unpickle these functions by reference, so this module imports nothing
heavy at import time.

Why not MetaSchedule's defaults: TVM 0.27's default build function and ``TuneContext``
import ``tvm.s_tir.tensor_intrin``, whose package imports the intrinsics of every target.
On a 2-core x86 machine that import took 38 to 46 s (34 s of it the CUDA intrinsics),
longer than the builder's 30 s timeout. ``register_tensor_intrinsics`` imports only the intrinsics
of the target's CPU family (0.4 s for x86) and the full package only for other targets.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import tempfile
from typing import Any

INTRINSICS_PACKAGE = "tvm.s_tir.tensor_intrin"

# Modules of INTRINSICS_PACKAGE with the intrinsics of one CPU family, by target architecture.
_CPU_INTRINSICS = {
    "x86_64": "x86",
    "amd64": "x86",
    "i686": "x86",
    "aarch64": "arm_cpu",
    "arm64": "arm_cpu",
    "armv7": "arm_cpu",
    "riscv64": "riscv_cpu",
    "riscv32": "riscv_cpu",
}


def register_tensor_intrinsics(target_json: dict[str, Any]) -> None:
    """Register the tensor intrinsics MetaSchedule's schedule rules may use for a target.

    LLVM targets get the intrinsics of their CPU family; other targets (CUDA) get all.
    """
    module = _cpu_intrinsics_module(target_json)
    if module is None:
        _import_whole_package()
        return
    if INTRINSICS_PACKAGE not in sys.modules:
        # NOTE: this puts the package in sys.modules without running its __init__, which
        # imports the intrinsics of every target. Later "import tvm.s_tir.tensor_intrin"
        # statements (TuneContext has one) then find it and import nothing more.
        spec = importlib.util.find_spec(INTRINSICS_PACKAGE)
        package = importlib.util.module_from_spec(spec)
        package.__dict__["_graphcomp_partial"] = True
        sys.modules[INTRINSICS_PACKAGE] = package
        setattr(importlib.import_module("tvm.s_tir"), "tensor_intrin", package)
    importlib.import_module(f"{INTRINSICS_PACKAGE}.{module}")


def _cpu_intrinsics_module(target_json: dict[str, Any]) -> str | None:
    if target_json.get("kind") != "llvm":
        return None
    triple = str(target_json.get("mtriple") or "")
    arch = triple.split("-")[0] if triple else platform.machine()
    return _CPU_INTRINSICS.get(arch.lower())


def _import_whole_package() -> None:
    package = sys.modules.get(INTRINSICS_PACKAGE)
    if package is None:
        importlib.import_module(INTRINSICS_PACKAGE)
    elif package.__dict__.get("_graphcomp_partial"):
        package.__spec__.loader.exec_module(package)
        package.__dict__["_graphcomp_partial"] = False


def initialize_worker(target_json: dict[str, Any]) -> None:
    """Builder worker initializer: import TVM's build path and the target's intrinsics once,
    so that each candidate's build pays only for its own compilation."""
    import tvm.driver  # noqa: F401
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: F401

    register_tensor_intrinsics(target_json)


def ready() -> bool:
    """Return True. Submitted once per worker, it starts the worker process early (the
    initializer runs before it)."""
    return True


def run_build_job(job: tuple) -> str:
    """Build and export one candidate with MetaSchedule's own builder worker function;
    ``job`` is (build function, export function or None, module, target, params)."""
    from tvm.s_tir.meta_schedule.builder import local_builder

    return local_builder._worker_func(*job)  # noqa: SLF001 (LocalBuilder's worker runs it)


def build_candidate(mod, target, _params):
    """Build one candidate as MetaSchedule's default build function does: drop the blocks
    that rewrite weight layouts (the runner feeds random weights in the final layout), then
    compile."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def export_shared_library(module, folder: str) -> str:
    """Export a built candidate as a shared library in a new subfolder of ``folder``; return
    its path. Each library gets its own folder because MetaSchedule's callback that deletes
    artifacts removes the artifact's whole folder.

    A shared library, unlike MetaSchedule's default tar of object files, is linked here, in
    the parallel builder workers, and not in the single local runner process.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(tempfile.mkdtemp(prefix="candidate-", dir=folder), "candidate.so")
    module.export_library(path)
    return path
