"""Heartbeats: how the supervisor tells a hung child from a busy or a starved one.

A small POSIX shared-memory segment created by the supervisor: one 8-byte slot per child, where
the child writes CLOCK_MONOTONIC (the same clock in every process) about once a second from its
own event loop: a worker from a uv timer, the dispatcher from an asyncio timer. A loop that
stopped turning (SIGSTOP, a deadlock, an endless loop in a callback) stops beating.

Wall time since the last beat is not enough: under a CPU quota the dispatcher runs under
SCHED_IDLE (pacing.py) and may wait seconds for the CPU while its workers are busy, which is
starvation, not a hang. So a child's silence is counted in its own time: the wall time since
its last beat minus the time it spent waiting on a run queue (run_delay, the second field of
/proc/PID/schedstat). A stopped, blocked or spinning child accumulates silence; a runnable
child the scheduler keeps waiting does not.
"""

from __future__ import annotations

import mmap
import struct
import time

import posix_ipc

from rinha import shm

SLOTS = 128  # children of one supervisor: up to 64 workers plus the dispatcher, and room
BEAT_INTERVAL_S = 1.0
_HEADER = struct.Struct("<8sII")  # magic, version, slots
_MAGIC = b"rinhaHBT"
_VERSION = 1
_HEADER_SIZE = 64
_BEAT = struct.Struct("<q")
_SIZE = _HEADER_SIZE + SLOTS * _BEAT.size


class Heartbeats:
    def __init__(self, view: mmap.mmap) -> None:
        self._view = view

    @classmethod
    def create_or_open(cls, name: str) -> Heartbeats:
        view = shm.map_segment(name, posix_ipc.O_CREAT, _SIZE)
        # Old beats of a previous instance mean nothing to this one: start from zero.
        view[:] = bytes(_SIZE)
        _HEADER.pack_into(view, 0, _MAGIC, _VERSION, SLOTS)
        return cls(view)

    @staticmethod
    def unlink(name: str) -> bool:
        return shm.unlink(name)

    def close(self) -> None:
        self._view.close()

    def beat(self, slot: int) -> None:
        """Called by the child in `slot`: I am turning my loop now."""
        _BEAT.pack_into(self._view, _HEADER_SIZE + slot * _BEAT.size, time.monotonic_ns())

    def last(self, slot: int) -> int:
        """The child's last beat (CLOCK_MONOTONIC ns), 0 if it never beat."""
        return _BEAT.unpack_from(self._view, _HEADER_SIZE + slot * _BEAT.size)[0]


def run_delay_ns(pid: int) -> int | None:
    """Nanoseconds the process has spent runnable but waiting for a CPU, or None if it is gone
    (or the kernel keeps no schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Silence:
    """The supervisor's watch over one child: since when it has not beaten, in its own time."""

    def __init__(self, now_ns: int, beat: int) -> None:
        self._beat = beat
        self._since_ns = now_ns
        self._delay_at_since = 0  # a new child has waited for nothing yet

    def observe(self, now_ns: int, beat: int, run_delay: int) -> float:
        """Seconds of the child's own time without a beat, as of now."""
        if beat != self._beat:
            self._beat, self._since_ns, self._delay_at_since = beat, now_ns, run_delay
            return 0.0
        waited = max(0, run_delay - self._delay_at_since)
        return max(0, now_ns - self._since_ns - waited) / 1e9
