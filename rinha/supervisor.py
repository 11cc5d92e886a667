"""The supervisor: fork, reap, restart, stop. Nothing else.

The process `rinha serve` runs as. Before forking it takes the instance lock, checks that no
one else listens on the port, and creates (or, after a crash, reopens) the queue, the ledger
and the holding table; the children inherit them. It waits for signals without polling:
SIGCHLD, SIGTERM and SIGINT are blocked and collected with sigtimedwait, then dispatched to a
handle_<name> method. A dead child is replaced in its own slot.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rinha.resources import StartupError

log = logging.getLogger("rinha.supervisor")

CHILD_OK = 0
CHILD_CRASHED = 1
CHILD_BOOT_ERROR = 3  # the child could not start: restarting it would fail the same way

STOP_GRACE_S = 3.0
RESTART_WINDOW_S = 10.0
RESTARTS_PER_WINDOW = 20

_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


class BootError(RuntimeError):
    """A child cannot start (port taken, resource missing): the supervisor halts."""


@dataclass
class ChildSpec:
    """One slot of the process table: what runs there, and its current pid."""

    role: str
    target: Callable[[], None]
    pid: int | None = None
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, children: list[ChildSpec]) -> None:
        self._children = children
        self._should_exit = False
        self._exit_code = 0

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        for child in self._children:
            self.spawn_child(child)
        while not self._should_exit:
            info = signal.sigtimedwait(_HANDLED, 60)
            if info is not None:
                getattr(self, f"handle_{signal.Signals(info.si_signo).name.lower()}")()
        self.stop_children()
        return self._exit_code

    # Signals -------------------------------------------------------------------------------

    def handle_sigterm(self) -> None:
        log.info("stopping")
        self._should_exit = True

    handle_sigint = handle_sigterm

    def handle_sigchld(self) -> None:
        self.reap_children()

    # Children ------------------------------------------------------------------------------

    def spawn_child(self, child: ChildSpec) -> None:
        pid = os.fork()
        if pid == 0:
            _run_child(child)  # never returns
        child.pid = pid
        log.info("%s started, pid %d", child.role, pid)

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
        self.spawn_child(child)

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


def _run_child(child: ChildSpec) -> None:
    """The child side of fork: ALWAYS ends in os._exit, never back in the supervisor's loop."""
    code = CHILD_CRASHED
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # SIGTERM keeps its default action in workers: a Python handler never runs while a
        # worker sits in uv_run (FINDINGS.md). Ctrl-C is the supervisor's to coordinate.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _set_process_name(f"rinha-{child.role}")
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


def _set_process_name(name: str) -> None:
    """Name the child in `ps -o comm` and /proc/PID/comm, so operators (and the tests) can tell
    the dispatcher from a worker: all children share the supervisor's command line."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


_PR_SET_NAME = 15


class InstanceLock:
    """One running instance per name: an flock held for the supervisor's whole life, so the
    queue and segments of a running instance are never taken over (DESIGN.md invariant 8),
    while those of a crashed one are reopened and re-driven."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"an instance with this INSTANCE_NAME is already running (pid {holder}, lock "
                f"{self._path}); stop it or choose another INSTANCE_NAME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.unlink(self._path)
            os.close(self._fd)
            self._fd = None


def ensure_port_free(host: str, port: int, kind: int = socket.SOCK_STREAM) -> None:
    """uSockets always sets SO_REUSEPORT, so a stale process listening on our port would
    silently take part of the traffic. A plain bind (SO_REUSEADDR only, to pass over
    TIME_WAIT) fails while anyone else listens there."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                what = "TCP" if kind == socket.SOCK_STREAM else "UDP"
                raise StartupError(
                    f"{what} port {host}:{port} is already in use by another process; "
                    "stop it or set another port"
                ) from None
            raise
