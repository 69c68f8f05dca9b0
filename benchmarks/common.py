"""Helpers shared by the benchmark scripts in this folder (run them as scripts)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path


def median_ms(function, repeat: int) -> float:
    """Median wall time of ``function()`` over ``repeat`` runs after one warm-up, in ms."""
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine_description() -> str:
    """The CPU model, core count and Python version, for the header of a results table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
