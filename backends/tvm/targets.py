"""Named build targets, and the check that a built library can run on this host.

A target name is one of:

- ``cpu``: this host, LLVM with the host's CPU model (``mcpu``) and core count.
- ``cuda``: an NVIDIA GPU; the architecture of GPU 0 when one is present, else ``sm_80``.
- ``cuda:sm_XY``: an NVIDIA GPU of compute capability X.Y (``sm_90a`` for nvcc's
  architecture-specific features).
- ``arm``: 64-bit ARM Linux (aarch64) with NEON. Its artifacts run on this host under
  qemu-aarch64 through ``aarch64_runner.run_artifact``.

TVM is imported inside the functions because importing it takes seconds.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from graphcomp.errors import ArtifactError, OptionError
from graphcomp.ops.lowering import TargetFeatures

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

# The CUDA architecture used when no GPU is present to ask. Kernels built for sm_80 run as
# machine code on Ampere GPUs (A100) and through their PTX on newer ones, which the driver
# compiles on load. Request another architecture with "cuda:sm_XY".
DEFAULT_CUDA_ARCH = "sm_80"

# Limits of desktop and data-center NVIDIA GPUs from sm_50 on (some Jetson chips allow fewer
# registers per block). TVM's GPU schedules read them.
_CUDA_LIMITS = {
    "max_num_threads": 1024,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "max_shared_memory_per_block": 49152,
    "registers_per_block": 65536,
}

_ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

# LLVM feature names that are instruction-set extensions. Other LLVM features (fast-*,
# slow-*, tuning flags) only steer code generation, so a host may lack them.
_ISA_FEATURE = re.compile(
    r"^(sse|ssse|avx|fma|f16c|bmi|amx|neon|sve|dotprod|i8mm|bf16|fp-armv8|fullfp16)"
)


def _host_cpu_json() -> dict[str, Any]:
    from tvm.target import codegen

    return {
        "kind": "llvm",
        "mcpu": str(codegen.llvm_get_system_cpu()),
        "num-cores": os.cpu_count() or 1,
    }


# sm_ and the compute capability without its dot (sm_75, sm_90, sm_120), optionally with
# nvcc's suffix for architecture-specific (a) or family-specific (f) features: sm_90a.
_CUDA_ARCH = re.compile(r"sm_[1-9][0-9]{1,2}[af]?")


def _cuda_json(arch: str | None) -> dict[str, Any]:
    if arch is None:
        arch = _detected_cuda_arch()
    if not _CUDA_ARCH.fullmatch(arch):
        raise OptionError(
            f"invalid CUDA architecture '{arch}' in target 'cuda:{arch}'; expected "
            "cuda:sm_XY, where X.Y is the GPU's compute capability (cuda:sm_80 for A100, "
            "cuda:sm_90 for H100), optionally with nvcc's suffix a or f (cuda:sm_90a)"
        )
    return {"kind": "cuda", "arch": arch, **_CUDA_LIMITS}


def _detected_cuda_arch() -> str:
    import tvm

    device = tvm.cuda(0)
    if device.exist:
        return "sm_" + device.compute_version.replace(".", "")
    logger.info("no CUDA GPU found; building for %s", DEFAULT_CUDA_ARCH)
    return DEFAULT_CUDA_ARCH


def target_json(name: str) -> dict[str, Any]:
    """Return the TVM target JSON for a target name; raises OptionError for unknown names."""
    if name == "cpu":
        return _host_cpu_json()
    if name == "arm":
        return dict(_ARM_TARGET)
    if name == "cuda":
        return _cuda_json(None)
    if name.startswith("cuda:"):
        return _cuda_json(name.split(":", 1)[1])
    raise OptionError(
        f"unknown target '{name}'; choose cpu, cuda, cuda:sm_XY (for example cuda:sm_80) or arm"
    )


def resolve_target(name: str) -> "tvm.target.Target":
    """Return the TVM Target for a target name (see the module docstring)."""
    from tvm.target import Target

    return Target(target_json(name))


# One line per named target, for `graphcomp targets`.
_TARGET_DESCRIPTIONS = {
    "cpu": "this host's CPU: LLVM with this host's mcpu and core count",
    "cuda": f"NVIDIA GPU: the architecture of GPU 0, or {DEFAULT_CUDA_ARCH} with no GPU present",
    "cuda:sm_80": "NVIDIA Ampere (A100) machine code, and PTX that newer GPUs compile on load",
    "cuda:sm_90": "NVIDIA Hopper (H100, H200) machine code and PTX",
    "arm": "64-bit ARM Linux (aarch64) with NEON, cross-compiled with aarch64-linux-gnu-gcc",
}


def list_targets() -> dict[str, dict[str, Any]]:
    """Return every named target with its TVM target JSON, as TVM completes it."""
    return {name: export_json(resolve_target(name)) for name in _TARGET_DESCRIPTIONS}


def target_descriptions() -> dict[str, str]:
    """Return a one-line description of every named target, in ``list_targets`` order."""
    return dict(_TARGET_DESCRIPTIONS)


def export_json(target: "tvm.target.Target") -> dict[str, Any]:
    """Return a target's JSON with lists in place of tuples, ready for json.dumps."""
    return _plain(target.export())


def _plain(value: Any) -> Any:
    # TVM returns its own Map and Array containers; JSON needs dicts and lists.
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return str(value)


def host_incompatibility(target: "tvm.target.Target") -> str | None:
    """Return why code built for ``target`` cannot run on this host, or None when it can."""
    kind = target.kind.name
    if kind == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            return "it was built for a CUDA GPU, and this host has none"
        return None
    if kind != "llvm":
        return f"graphcomp cannot run code for target kind '{kind}'"
    return _llvm_incompatibility(target)


def _llvm_incompatibility(target: "tvm.target.Target") -> str | None:
    from tvm.target import Target, codegen

    triple = str(target.attrs.get("mtriple", "") or "")
    target_arch = triple.split("-")[0] if triple else platform.machine()
    host_arch = platform.machine()
    if _normalize_arch(target_arch) != _normalize_arch(host_arch):
        return f"it was built for {target_arch} (triple '{triple}'), and this host is {host_arch}"

    host = Target(_host_cpu_json())
    missing = {
        feature
        for feature in codegen.llvm_get_cpu_features(target)
        if _ISA_FEATURE.match(feature)
    } - set(codegen.llvm_get_cpu_features(host))
    if missing:
        return (
            f"it needs CPU features this host lacks: {', '.join(sorted(missing))} "
            f"(built for mcpu '{target.attrs.get('mcpu', '')}', host is '{host.attrs['mcpu']}')"
        )
    return None


def _normalize_arch(arch: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())


def check_runs_here(target: "tvm.target.Target", description: str) -> None:
    """Raise ArtifactError naming ``description`` unless code for ``target`` runs here."""
    reason = host_incompatibility(target)
    if reason is not None:
        raise ArtifactError(
            f"{description} cannot run on this host: {reason}. Build the model again for "
            "target 'cpu' on this host, or run the artifact on a matching host."
        )


# Set to 0 to lower int8 layers in their plain layout on CPUs with AVX-512 VNNI too, for
# comparing the two.
VNNI_ENV = "GRAPHCOMP_VNNI"


def target_features(target: "tvm.target.Target") -> TargetFeatures:
    """Return the instructions of ``target`` that change how graphcomp lowers ops."""
    from .intrinsics import has_avx512_vnni

    vnni = os.environ.get(VNNI_ENV, "1") != "0" and has_avx512_vnni(target)
    return TargetFeatures(vnni=vnni)
