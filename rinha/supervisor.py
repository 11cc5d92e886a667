"""The supervisor: fork, reap, restart, stop. Nothing else.

Runs in the process `rinha serve` starts as, once the startup sequence (__main__.py: guards,
resources, recovery from the peer) is done; the children inherit what it opened. It waits for
signals without polling: SIGCHLD, SIGTERM, SIGINT and SIGHUP are blocked and collected with
sigtimedwait (once a second at most, to look at the heartbeats), then dispatched to a
handle_<name> method. A dead child is replaced in its own slot; so is a hung one, whose
heartbeat has been silent for HEARTBEAT_TIMEOUT_S of its own time (heartbeat.py), as gunicorn
replaces a worker that stopped notifying its arbiter. Every child dies with the supervisor
(PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL orphans nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rinha import logs, prctl
from rinha.heartbeat import Heartbeats, Silence, run_delay_ns
from rinha.metrics import SupervisorCounters

log = logging.getLogger("rinha.supervisor")

CHILD_OK = 0
CHILD_CRASHED = 1
CHILD_BOOT_ERROR = 3  # the child could not start: restarting it would fail the same way

STOP_GRACE_S = 3.0
RESTART_WINDOW_S = 10.0
RESTARTS_PER_WINDOW = 20

# Signals the supervisor waits for; SIGHUP (the terminal went away) stops it like SIGTERM.
_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
CHECK_INTERVAL_S = 1.0


class BootError(RuntimeError):
    """A child cannot start (port taken, resource missing): the supervisor halts."""


@dataclass
class ChildSpec:
    """One slot of the process table: what runs there, and its current pid."""

    role: str
    target: Callable[[], None]
    slot: int = 0  # its heartbeat slot
    pid: int | None = None
    restarts: list[float] = field(default_factory=list)
    silence: Silence | None = None


class Supervisor:
    def __init__(self, children: list[ChildSpec], heartbeats: Heartbeats | None = None,
                 heartbeat_timeout_s: float = 0.0,
                 counters: SupervisorCounters | None = None) -> None:
        self._children = children
        self._counters = counters
        self._heartbeats = heartbeats
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._should_exit = False
        self._exit_code = 0

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        if self._counters is not None:
            self._counters.started()
        for child in self._children:
            self.spawn_child(child)
        while not self._should_exit:
            info = signal.sigtimedwait(_HANDLED, CHECK_INTERVAL_S)
            if info is not None:
                getattr(self, f"handle_{signal.Signals(info.si_signo).name.lower()}")()
            self.kill_hung_children()
        self.stop_children()
        return self._exit_code

    # Signals -------------------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        log.info("stopping")
        self._should_exit = True

    handle_sigint = handle_sigterm
    handle_sighup = handle_sigterm

    def handle_sigchld(self) -> None:
        self.reap_children()

    # Children ------------------------------------------------------------------------------

    def spawn_child(self, child: ChildSpec, restarted: bool = False) -> None:
        beat = self._heartbeats.last(child.slot) if self._heartbeats is not None else 0
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_child(child, parent)  # never returns
        child.pid = pid
        child.silence = Silence(time.monotonic_ns(), beat)
        if self._counters is not None:
            self._counters.child(child.slot, pid, restarted)
        log.info("%s started, pid %d", child.role, pid)

    def kill_hung_children(self) -> None:
        """SIGKILL a child whose heartbeat has been silent too long in its own time; it is then
        reaped and restarted like a crashed one (and counts towards the restart limit)."""
        if self._heartbeats is None or not self._heartbeat_timeout_s or self._should_exit:
            return
        now = time.monotonic_ns()
        for child in self._children:
            if child.pid is None or child.silence is None:
                continue
            run_delay = run_delay_ns(child.pid)
            if run_delay is None:
                continue  # exiting: SIGCHLD will tell
            silent_s = child.silence.observe(now, self._heartbeats.last(child.slot), run_delay)
            if silent_s > self._heartbeat_timeout_s:
                log.error("%s (pid %d) has not turned its loop for %.1f s of its own time; "
                          "killing it to replace it", child.role, child.pid, silent_s)
                _kill(child.pid, signal.SIGKILL)
                child.silence = None  # once: the restart brings a new watch

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = next((c for c in self._children if c.pid == pid), None)
            if child is None:
                continue
            child.pid = None
            if self._should_exit:
                continue
            self.restart_child(child, status)

    def restart_child(self, child: ChildSpec, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        if code == CHILD_BOOT_ERROR:
            log.error("%s could not start; stopping the instance", child.role)
            self._halt()
            return
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(child.restarts) > RESTARTS_PER_WINDOW:
            log.error("%s died %d times in %.0f s; stopping the instance",
                      child.role, len(child.restarts), RESTART_WINDOW_S)
            self._halt()
            return
        log.warning("%s (exit %s) died; restarting it", child.role, code)
        self.spawn_child(child, restarted=True)

    def _halt(self) -> None:
        self._should_exit = True
        self._exit_code = 1

    def stop_children(self) -> None:
        """SIGTERM, wait, SIGKILL, reap."""
        for child in self._children:
            _kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(c.pid for c in self._children) and time.monotonic() < deadline:
            self._reap_without_restart(timeout_s=0.05)
        for child in self._children:
            _kill(child.pid, signal.SIGKILL)
        while any(c.pid for c in self._children):
            self._reap_without_restart(timeout_s=0.05)

    def _reap_without_restart(self, timeout_s: float) -> None:
        signal.sigtimedwait((signal.SIGCHLD,), timeout_s)
        self._should_exit = True
        self.reap_children()


def _kill(pid: int | None, signo: int) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        pass


def _run_child(child: ChildSpec, parent: int) -> None:
    """The child side of fork: ALWAYS ends in os._exit, never back in the supervisor's loop."""
    code = CHILD_CRASHED
    try:
        # SIGKILL, not SIGTERM: a worker in uv_run never runs a Python handler, and whatever
        # the dispatcher held is in the holding table for the next instance of this name.
        prctl.die_with_parent(parent, signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # SIGTERM keeps its default action in workers: a Python handler never runs while a
        # worker sits in uv_run (docs/measurements.md). Ctrl-C is the supervisor's to coordinate.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        prctl.set_process_name(f"rinha-{child.role}")
        logs.set_role(child.role)
        child.target()
        code = CHILD_OK
    except BootError as exc:
        log.error("%s: %s", child.role, exc)
        code = CHILD_BOOT_ERROR
    except BaseException:
        log.exception("%s crashed", child.role)
    finally:
        logging.shutdown()
        os._exit(code)
