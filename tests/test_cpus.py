"""CPUs available to the process: affinity, capped by a container's cgroup CPU quota (v2 and v1)."""

from __future__ import annotations

import os

import pytest

from llmapi.cpus import available_cpus, cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def write(folder, files: dict[str, str]) -> None:
    """Lay out a fake /sys/fs/cgroup."""
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({}, None),
        ({"cpu.max": "garbage\n"}, None),
    ],
)
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path, files, quota):
    write(tmp_path, files)
    assert cpu_quota(tmp_path) == quota


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", AFFINITY),  # no quota: every CPU the process may run on
        ("100000 100000", 1),
        ("150000 100000", 1),  # 1.5 CPUs: one thread, since two would be throttled
        ("50000 100000", 1),  # never fewer than one
        ("6400000 100000", AFFINITY),  # a quota above the CPUs there are
    ],
)
def test_available_cpus_is_affinity_capped_by_the_quota(tmp_path, cpu_max, expected):
    write(tmp_path, {"cpu.max": cpu_max})
    assert available_cpus(tmp_path) == expected
