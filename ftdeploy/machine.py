"""Facts about the CPU that numbers are measured on: recorded beside every benchmark and report."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

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


CGROUP_ENV = "FTDEPLOY_CGROUP_DIR"  # the cgroup folder to read instead of this process's own (tests, odd mounts)


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup folders, innermost first (a limit set on a parent binds its children too):
    ``$FTDEPLOY_CGROUP_DIR``, else the v2 and v1 ``cpu`` hierarchies of /proc/self/cgroup."""
    if os.environ.get(CGROUP_ENV):
        return [Path(os.environ[CGROUP_ENV])]
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, the unified hierarchy
            base = Path("/sys/fs/cgroup")
        elif "cpu" in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controllers
            base = base if base.is_dir() else Path("/sys/fs/cgroup/cpu,cpuacct")
        else:
            continue
        here = base / path.lstrip("/")
        found += [here, *[p for p in here.parents if p.is_relative_to(base)]]
    return found


def cgroup_cpus() -> tuple[float, str] | None:
    """(CPUs, where) the cgroup's CPU quota allows: v2 ``cpu.max`` ("quota period", or "max"), v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (quota -1: none); the tightest of this cgroup and its
    parents; None without a quota (Kubernetes sets one from a container's CPU limit)."""
    limits = []
    for folder in _cgroup_dirs():
        try:
            if (folder / "cpu.max").is_file():
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                where = f"{folder / 'cpu.max'}: {quota} {period}"
            else:
                quota = (folder / "cpu.cfs_quota_us").read_text().strip()
                period = (folder / "cpu.cfs_period_us").read_text().strip()
                where = f"{folder}/cpu.cfs_quota_us {quota} / cpu.cfs_period_us {period}"
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            limits.append((int(quota) / int(period), where))
    return min(limits) if limits else None


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may keep busy, why): the fewest of its affinity mask (taskset, cpusets) and
    its cgroup's CPU quota, rounded down (a quota of 1.5 CPUs throttles a third thread)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = f"affinity mask: {affinity} CPUs"
    quota = cgroup_cpus()
    if quota is None:
        return affinity, why + "; no cgroup CPU quota"
    cpus, where = quota
    if int(cpus) < affinity:
        return max(1, int(cpus)), f"cgroup CPU quota: {cpus:g} CPUs ({where}); {why}"
    return affinity, f"{why}; cgroup CPU quota {cpus:g} CPUs ({where})"


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not speed up GEMM-bound inference):
    at most :func:`usable_cpus` (affinity and cgroup quota)."""
    available = usable_cpus()[0]
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
