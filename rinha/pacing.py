"""How the dispatcher spends CPU: in batches, and only what the workers leave.

All processes of a container share one CPU quota, and the workers' POST /payments latency is
what the contest scores, so the dispatcher (which has no latency target of its own: a payment
must be recorded before anyone asks, not within a millisecond) gives way in two manners:

- Batched wake-ups (`paced_event_loop`): the loop wakes at most once every `min_interval_s`
  while events keep coming. At 550 payments/s a dispatcher that woke for every queue record and
  every processor reply woke ~1,500 times a second, each time running Python on caches the
  other processes had just evicted; waking every 10 ms it handles ~5 arrivals and ~5 replies
  per wake-up on warm caches. A first event after a quiet spell is still handled at once, and
  an idle dispatcher sleeps in epoll.
- Idle priority (`yield_cpu_to_workers`): SCHED_IDLE, so a worker that wakes up takes the CPU
  from the dispatcher at once instead of waiting behind a batch. In a container (a cgroup of
  its own) the dispatcher only yields to its own workers; it still gets whatever they leave.
  Outside one it would yield to every process of the machine: with one CPU hog beside a test
  posting 8,000 payments on this 2-core machine, it could not drain the kernel queue and the
  workers answered 503 to 5,512 of them. So DISPATCHER_IDLE_PRIORITY=auto (the default)
  applies it only under a CPU quota (cpu_quota.py). Nice 10 or 19 instead of
  SCHED_IDLE measured the worker p99 of normal priority (0.61-0.82 ms).

benchmarks/budgets.py (550 payments/s, the instance on one CPU under a 0.5-CPU quota, 2 runs
each; dispatcher CPU per payment, worker server-side p99): waking for each event at normal
priority 160-176 us, 0.30-0.32 ms; 10 ms batches at normal priority 90-110 us, 0.58-0.77 ms;
10 ms batches under SCHED_IDLE (the defaults) 91-107 us, 0.21-0.23 ms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import time

log = logging.getLogger("rinha.pacing")


class PacedSelector(selectors.EpollSelector):
    """An epoll selector that, when asked to wait, first sleeps out the rest of
    `min_interval_s` since its last wake-up, so the events of that time are taken together."""

    def __init__(self, min_interval_s: float) -> None:
        super().__init__()
        self._min_interval_s = min_interval_s
        self._woke_at = float("-inf")

    def select(self, timeout: float | None = None) -> list:  # type: ignore[override]
        # timeout 0: the loop has callbacks ready and only polls; never delay those.
        if timeout is None or timeout > 0:
            pause = self._woke_at + self._min_interval_s - time.monotonic()
            if pause > 0:
                if timeout is not None:
                    pause = min(pause, timeout)  # a timer due sooner is not delayed
                    timeout -= pause
                time.sleep(pause)
        ready = super().select(timeout)
        self._woke_at = time.monotonic()
        return ready


def paced_event_loop(min_interval_s: float) -> asyncio.AbstractEventLoop:
    """An asyncio loop that wakes at most once every `min_interval_s` (0: at every event)."""
    if min_interval_s <= 0:
        return asyncio.SelectorEventLoop(selectors.EpollSelector())
    return asyncio.SelectorEventLoop(PacedSelector(min_interval_s))


def yield_cpu_to_workers() -> None:
    """Run this process under SCHED_IDLE (any process may lower its own priority)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # a seccomp profile that forbids it: run at normal priority
        log.warning("could not lower the dispatcher to idle priority: %s", exc)
