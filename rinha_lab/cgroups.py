"""cgroup v1 groups that hold local processes to the contest's CPU and memory limits.

Used by `rinha stack --limits contest` and by the benchmarks, in their own process, to put each
service (and everything it forks later) under the CPU quota and memory limit docker-compose.yml
gives it, so a local run is throttled the way a container would be.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuacct", "memory")
CFS_PERIOD_US = 100_000


def make(parent: str, name: str, cpus: float, memory_bytes: int | None) -> dict[str, str]:
    """Create `parent/name` in every controller with the given limits; returns the paths."""
    paths = {}
    for controller in CONTROLLERS:
        path = CGROUP_ROOT / controller / parent / name
        path.mkdir(parents=True, exist_ok=True)
        paths[controller] = str(path)
    cpu = Path(paths["cpu"])
    (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(int(cpus * CFS_PERIOD_US)))
    if memory_bytes is not None:
        (Path(paths["memory"]) / "memory.limit_in_bytes").write_text(str(memory_bytes))
    return paths


def joiner(paths: dict[str, str]):  # type: ignore[no-untyped-def]
    """A preexec_fn for subprocess.Popen: the child enters the groups before exec, so every
    process it forks later is inside them too. It also starts a session, so the caller can
    signal the whole tree with killpg."""
    procs_files = [str(Path(path) / "cgroup.procs") for path in paths.values()]

    def enter() -> None:
        os.setsid()
        for procs in procs_files:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    return enter


def remove(parent: str, groups: list[dict[str, str]]) -> None:
    """Remove the groups (once their processes have left) and the parent."""
    for group in groups:
        for path in group.values():
            _rmdir_when_empty(Path(path))
    for controller in CONTROLLERS:
        _rmdir_when_empty(CGROUP_ROOT / controller / parent)


def usage(paths: dict[str, str]) -> dict[str, float]:
    """CPU seconds, throttled periods and peak memory of a group so far."""
    cpu_stat = dict(
        line.split() for line in Path(paths["cpu"], "cpu.stat").read_text().splitlines()
    )
    return {
        "cpu_s": int(Path(paths["cpuacct"], "cpuacct.usage").read_text()) / 1e9,
        "nr_periods": int(cpu_stat.get("nr_periods", 0)),
        "nr_throttled": int(cpu_stat.get("nr_throttled", 0)),
        "throttled_s": int(cpu_stat.get("throttled_time", 0)) / 1e9,
        "peak_memory_bytes": int(Path(paths["memory"], "memory.max_usage_in_bytes").read_text()),
    }


def _rmdir_when_empty(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # the last process is still leaving the group
