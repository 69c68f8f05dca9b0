"""The Relax pipeline for GPU targets: TVM's default CUDA pipeline, with a schedule step that
survives a failing dlight rule.

TVM's own ``dlight.ApplyDefaultSchedule`` stops the whole build when one rule raises on one
kernel (TVM 0.27 raises on a 1-channel conv2d with a 1x2 kernel inside a GPU reduction
rule). Here each kernel tries the rules in order, a rule that raises is logged and skipped,
and ``Fallback``, which binds the fused spatial loops to blocks and threads, comes last.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)


def gpu_schedule_rules() -> list:
    """Return dlight's GPU rules, most specialized first, with ``Fallback`` last."""
    from tvm.s_tir import dlight

    return [
        dlight.gpu.Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    ]


def schedule_gpu_kernels(rules: list) -> "tvm.transform.Pass":
    """Return a module pass that schedules every unscheduled kernel with the first rule
    that applies without raising."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="ScheduleGpuKernels")
    def schedule(module, _context):
        updated = {}
        for global_var, func in module.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs else None
            target = target or tvm.target.Target.current(allow_none=False)
            scheduled = _apply_first_rule(global_var.name_hint, func, target, rules)
            if scheduled is not None:
                updated[global_var] = scheduled
        for global_var, func in updated.items():
            module[global_var] = func
        return module

    return schedule


def _is_scheduled(func) -> bool:
    return bool(func.attrs) and int(func.attrs.get("tirx.is_scheduled", 0)) == 1


def _apply_first_rule(name: str, func, target, rules: list):
    for rule in rules:
        try:
            space = rule.apply(func, target, False)
        except Exception as exc:  # a dlight rule may fail with any exception type
            logger.warning(
                "GPU schedule rule %s failed on kernel '%s' (%s: %s); trying the next rule",
                type(rule).__name__, name, type(exc).__name__, exc,
            )
            continue
        if space is None:
            continue
        schedule = space[0] if isinstance(space, list) else space
        logger.debug("kernel '%s' scheduled by %s", name, type(rule).__name__)
        return schedule.mod["main"].with_attr("tirx.is_scheduled", True)
    logger.warning("no GPU schedule rule applies to kernel '%s'; it stays unscheduled", name)
    return None


def gpu_pipeline(target: "tvm.target.Target") -> "tvm.transform.Pass":
    """Return TVM's default CUDA Relax pipeline with ``schedule_gpu_kernels`` as its
    schedule step."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        schedule_gpu_kernels(gpu_schedule_rules()),
    ]

    @tvm.transform.module_pass(opt_level=0, name="GraphcompGpuPipeline")
    def pipeline(module, _context):
        with target:
            passes = (
                cuda.library_dispatch_passes(target)
                + legalize
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(module)

    return pipeline
