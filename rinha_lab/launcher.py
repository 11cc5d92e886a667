"""The one way the lab starts and stops a process: `rinha stack`, the tests and the benchmarks.

A launched process runs in a session of its own (so a terminal's Ctrl-C reaches only its
launcher, which stops it in order, and so its whole tree can be signalled at once), optionally
inside cgroups, with its output in a log file or a pipe, and dies with its launcher even if the
launcher is killed with SIGKILL (PR_SET_PDEATHSIG). Stopping escalates: the stop signal to the
process, a grace period, then SIGKILL to its whole session, then a reap.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from rinha import prctl
from rinha_lab import cgroups


class Launched:
    """One child process and what it takes to stop it cleanly."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cgroup: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        cpus: set[int] | None = None,
        stop_signal: int = signal.SIGTERM,
        parent_death_signal: int = signal.SIGTERM,
    ) -> None:
        """`log_path`: stdout and stderr appended there; None: stdout is a pipe
        (`self.popen.stdout`), stderr joins it. `cpus`: the CPUs it may run on (benchmarks
        keep their harness and the instance apart). `parent_death_signal`: what the child gets
        if this process dies first (SIGTERM lets it stop its own children)."""
        self.argv = argv
        self.log_path = log_path
        self.stop_signal = stop_signal
        enter_cgroups = cgroups.joiner(dict(cgroup or {}))
        launcher = os.getpid()

        def before_exec() -> None:
            enter_cgroups()  # also starts the session
            if cpus:
                os.sched_setaffinity(0, cpus)
            prctl.die_with_parent(launcher, parent_death_signal)

        output = open(log_path, "ab") if log_path is not None else None
        try:
            self.popen = subprocess.Popen(
                argv, env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=output if output is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT, preexec_fn=before_exec,
            )
        finally:
            if output is not None:
                output.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal_session(self, signo: int) -> None:
        """Signal every process of its session (it is the session's leader)."""
        try:
            os.killpg(self.popen.pid, signo)
        except (ProcessLookupError, PermissionError):
            pass

    def wait_with_cpu(self) -> tuple[int, float]:
        """Wait for it to exit: (exit code, CPU seconds it and its reaped children used)."""
        _, status, usage = os.wait4(self.popen.pid, 0)
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        return self.popen.returncode, usage.ru_utime + usage.ru_stime

    def stop(self, grace_s: float = 10.0) -> int:
        """The stop signal, up to `grace_s` to exit, then SIGKILL to the whole session; whatever
        is left in its session afterwards (a grandchild it failed to stop) is killed too."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.signal_session(signal.SIGKILL)
                self.popen.wait()
        self.signal_session(signal.SIGKILL)
        return self.popen.returncode
