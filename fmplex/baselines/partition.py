"""Spatial partitioning of a baseline model process on a CPU: a fixed share of the machine.

Shared by the one-task-per-copy baselines (text in ``single_task``, vision and
time series in ``single_family_task``).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"))  # v1 cpu controller, then unified v2
CFS_PERIOD_US = 100_000


def partition_cpu(name: str, quota_cores: float, fallback_cores: list[int]) -> str:
    """Confine this process to ``quota_cores`` of CPU time; says how.

    A CFS quota is the CPU analogue of an MPS thread percentage: a fixed
    share of the whole machine that the process cannot exceed even when the
    rest is idle (that is what spatial partitioning costs). Pinning to cores
    is the fallback where cgroups are read-only.
    """
    quota = max(1000, int(quota_cores * CFS_PERIOD_US))
    for root in CGROUP_ROOTS:
        group = root / f"fmplex-partition-{name}"
        try:
            if (root / "cpu.cfs_quota_us").exists():  # cgroup v1
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            elif (root / "cgroup.controllers").exists():  # cgroup v2
                group.mkdir(exist_ok=True)
                (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            else:
                continue
            (group / "cgroup.procs").write_text(str(os.getpid()))
            return f"cgroup {group} quota {quota / CFS_PERIOD_US:.3f} cores"
        except OSError:
            continue
    if fallback_cores:
        os.sched_setaffinity(0, set(fallback_cores))
        return f"affinity cores {fallback_cores} (no writable cgroup)"
    return "none (no writable cgroup, no cores given)"
