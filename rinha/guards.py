"""Startup guards: what `rinha serve` refuses before it creates or reopens anything.

Run by the supervisor's process at startup. One running instance per INSTANCE_NAME (an flock
held for the supervisor's whole life), and no port shared with a stale listener (uSockets
always sets SO_REUSEPORT, so a second listener would silently take part of the traffic):
docs/architecture.md, invariant 8.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from rinha.resources import StartupError


class InstanceLock:
    """One running instance per name: an flock held for the supervisor's whole life, so the
    queue and segments of a running instance are never taken over (docs/architecture.md,
    invariant 8), while those of a crashed one are reopened and re-driven."""

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
