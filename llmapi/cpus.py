"""What this machine offers the model: the CPUs this process may use, their bf16 flags, and a GPU if any."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    """Count the CPUs this process can run on, at most its cgroup's CPU quota (at least 1).

    os.cpu_count() sees every core of the host, also inside a container limited to two
    (`docker run --cpus 2`, a Kubernetes CPU limit): sizing torch's threads by it would run dozens
    of threads on a quota of two and spend the time throttled.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cpus, int(quota)) if quota is not None else cpus)


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU quota of this container's cgroup in CPUs (v2 cpu.max, else v1 cfs files), or None."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
    except OSError:
        quota, period = v1_quota(cgroup)
    try:
        quota_us, period_us = float(quota), float(period)
    except ValueError:  # "max", or nothing readable: no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def v1_quota(cgroup: Path) -> tuple[str, str]:
    """Read cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us ("" when absent)."""
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            folder = cgroup / controller
            return (folder / "cpu.cfs_quota_us").read_text(), (folder / "cpu.cfs_period_us").read_text()
        except OSError:
            continue
    return "", ""


CPUINFO = Path("/proc/cpuinfo")
# CPU flags (as /proc/cpuinfo names them) whose instructions compute bf16 matmuls natively: AVX-512 BF16
# (Zen 4, Cooper Lake and later) or AMX (Sapphire Rapids and later). Without them torch emulates bf16 in fp32.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of this machine's first CPU, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with `flags`) computes bf16 matmuls in hardware."""
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def nvidia_gpu_visible(gpus: Path = NVIDIA_GPUS) -> bool:
    """Whether the NVIDIA driver lists a GPU here, found without importing torch (the gunicorn master never does)."""
    try:
        return any(gpus.iterdir()) and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")
    except OSError:
        return False
