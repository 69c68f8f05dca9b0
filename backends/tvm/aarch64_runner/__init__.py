"""Run artifacts built for target ``arm`` (aarch64) on another host, under qemu-aarch64.

A small C++ runner (runner.cc) loads the artifact's model.so, runs ``main`` and writes the
outputs. It is cross-compiled against the TVM runtime from the aarch64 wheels of apache-tvm
and apache-tvm-ffi. runtime.py sets it up in a cache folder, and run.py drives it::

    from graphcomp.backends.tvm.aarch64_runner import needs_emulation, run_artifact

    if needs_emulation(folder):
        outputs = run_artifact(folder, {"x": x})

Host needs: the Debian packages qemu-user and g++-aarch64-linux-gnu, and either network
access to PyPI on first use or the two wheels in the cache (see runtime.py).
"""

from .elf import EM_AARCH64, read_header, read_symbols
from .run import check_aarch64_library, is_aarch64_target, needs_emulation, run_artifact
from .runtime import (
    EmulationRuntime,
    EmulatorUnavailableError,
    default_cache_dir,
    missing_tools,
    prepare_runtime,
)

__all__ = [
    "EM_AARCH64",
    "EmulationRuntime",
    "EmulatorUnavailableError",
    "check_aarch64_library",
    "default_cache_dir",
    "is_aarch64_target",
    "missing_tools",
    "needs_emulation",
    "prepare_runtime",
    "read_header",
    "read_symbols",
    "run_artifact",
]
