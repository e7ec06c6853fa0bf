"""Facts about the CPU that numbers are measured on: recorded beside every benchmark and report."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

# Flags that decide how fast int8/bf16 kernels can be.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "asimddp", "i8mm", "sve")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("model name", "hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    for line in _cpuinfo().splitlines():
        if line.lower().startswith(("flags", "features")):
            return set(line.split(":", 1)[1].split())
    return set()


def isa() -> list[str]:
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not speed up GEMM-bound inference)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores, physical, core = set(), None, None
    for line in _cpuinfo().splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core is not None:
            cores.add((physical, core))
            physical = core = None
    return max(1, min(available, len(cores) or available))


def machine_info(threads: int | None = None) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu_name(), "cores": physical_cores(), "threads": threads or physical_cores(), "isa": isa(),
            "onnxruntime": version("onnxruntime"), "torch": version("torch"), "platform": platform.platform()}
