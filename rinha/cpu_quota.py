"""Whether this process runs under a CPU quota (a container's `cpus:`, `rinha stack --limits`).

Read once by the dispatcher at start: DISPATCHER_IDLE_PRIORITY=auto lowers it to SCHED_IDLE only
under a quota, where it yields to its own workers only (pacing.py).
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def under_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> bool:
    """Whether this process's CPU group, or a group above it, has a CPU quota: a container's
    `cpus:` limit, or `rinha stack --limits`. cgroup v1 (`cpu.cfs_quota_us` other than -1)
    and v2 (`cpu.max` other than "max"). `self_cgroup`: the text of /proc/self/cgroup."""
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return False
    for line in self_cgroup.splitlines():
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # the v2 hierarchy (mounted alone, or as "unified" beside v1)
            places = [(root, "cpu.max"), (root / "unified", "cpu.max")]
        elif "cpu" in controllers.split(","):
            places = [(root / controllers, "cpu.cfs_quota_us"), (root / "cpu", "cpu.cfs_quota_us")]
        else:
            continue
        if any(_quota_on_path(base, group, name) for base, name in places):
            return True
    return False


def _quota_on_path(base: Path, group: str, file_name: str) -> bool:
    """A quota in `group` or any group above it, up to the mount point `base`."""
    path = base / group.lstrip("/")
    while True:
        try:
            value = (path / file_name).read_text().split()[0]
        except (OSError, IndexError):
            value = None
        if value is not None and value not in ("max", "-1"):
            return True
        if path == base or base not in path.parents:
            return False
        path = path.parent
