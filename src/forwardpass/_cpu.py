"""What this CPU can do, from /proc/cpuinfo (Linux): its instruction-set flags and a one-line description.

    flags()      # {"avx2", "avx512f", "avx512_vnni", ...}; None where there is no x86 flags line
    describe()   # "AMD EPYC [avx2 avx512f avx512_vnni], 2 cores": what benchmarks and reports print
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")  # what speed depends on here


def _lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def flags() -> set[str] | None:
    """The first CPU's flags; None where /proc/cpuinfo has no x86 ``flags`` line (ARM lists ``Features``)."""
    line = next((ln for ln in _lines() if ln.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def describe() -> str:
    """Model name, the flags that matter for speed, cores."""
    name = next((ln.split(":", 1)[1].strip() for ln in _lines() if ln.startswith("model name")), platform.machine())
    shown = [f for f in SHOWN if f in (flags() or set())]
    return f"{name} [{' '.join(shown)}], {os.cpu_count()} cores"
