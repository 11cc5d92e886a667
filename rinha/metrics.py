"""Metrics: the counters every process of an instance keeps in shared memory, and their sums.

Created by the supervisor (`/rinha-NAME-metrics`), written by every process of the instance,
read by the workers that answer GET /metrics, /status and /health. Each process writes only its
own block (worker i block i, the dispatcher and the supervisor one each), so every counter has
one writer and a plain 8-byte store is all an update costs: no atomics, no locks, and a reader
sums the blocks. A replaced child takes over its predecessor's block, so counters only grow
for the life of the segment, which is the life of the instance's queue and holding table
(resources.py): what `/status` checks for conservation stays comparable across restarts.

Per request the C route (native_ledger/_intake.c) adds to its worker's row of POST /payments
itself; everything else is counted here.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import time

import posix_ipc

from rinha import shm

# The routes and statuses a worker counts requests by; anything else is counted as "other".
ROUTES = ("POST /payments", "GET /payments-summary", "POST /purge-payments", "GET /health",
          "GET /status", "GET /metrics", "other")
STATUSES = (200, 202, 400, 401, 404, 405, 413, 422, 500, 503, 0)  # 0: any other status
STATUS_INDEX = {status: i for i, status in enumerate(STATUSES)}
ROUTE_INDEX = {route: i for i, route in enumerate(ROUTES)}

# What a processor's answer was, as the dispatcher's sender sees it.
REPLY_CLASSES = ("2xx", "422", "500", "429", "other_status", "timeout", "reset", "refused")
# Round-trip time buckets (upper bounds, seconds) of a processor request; +Inf implied.
RTT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CIRCUIT_STATES = ("closed", "open", "probing")

WORKER_BLOCKS = 64
DISPATCHER_BLOCK = 64
SUPERVISOR_BLOCK = 65
BLOCKS = 66
BLOCK_WORDS = 512  # 4 KiB per block

_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<8sIIQ")  # magic, version, blocks, created (unix ms)
_HEADER_SIZE = 64
_MAGIC = b"rinhaMTR"
_VERSION = 1
_SIZE = _HEADER_SIZE + BLOCKS * BLOCK_WORDS * 8


class _Layout:
    """Word offsets inside a block, named once for writers and readers alike."""

    def __init__(self) -> None:
        self._next = 0

    def take(self, words: int) -> int:
        offset, self._next = self._next, self._next + words
        assert self._next <= BLOCK_WORDS
        return offset


_worker = _Layout()
REQUESTS = _worker.take(len(ROUTES) * len(STATUSES))  # [route][status]

_dispatcher = _Layout()
RECORDED = _dispatcher.take(2)  # [processor]
DUPLICATES = _dispatcher.take(2)
REPLIES = _dispatcher.take(2 * len(REPLY_CLASSES))  # [processor][class]
RTT = _dispatcher.take(2 * (len(RTT_BUCKETS_S) + 3))  # [processor][bucket..., +Inf, sum_us, n]
GAUGES = _dispatcher.take(4)  # in_flight, waiting, pinned, parked
HEALTH = _dispatcher.take(2 * 3)  # [processor]: polled_at_ms, failing, min_response_ms
CIRCUITS = _dispatcher.take(2 * 3)  # [processor]: state, since_ms, consecutive failures
SYNC = _dispatcher.take(5)  # sent, received, dropped_foreign, dropped_malformed, heard_at_ms
SYNC_SENT, SYNC_RECEIVED, SYNC_FOREIGN, SYNC_MALFORMED, SYNC_HEARD_AT = range(SYNC, SYNC + 5)
# Per other instance, by its ledger region (rinha/ledger.py; region 0 is this one's own):
# messages received from it and when it was last heard of (unix ms). Regions past PEER_SLOTS
# are counted in the totals above only.
PEER_SLOTS = 64
SYNC_PEERS = _dispatcher.take(2 * PEER_SLOTS)

_supervisor = _Layout()
STARTED_AT = _supervisor.take(1)  # unix ms
CHILD_PIDS = _supervisor.take(WORKER_BLOCKS + 1)  # [child slot]
CHILD_RESTARTS = _supervisor.take(WORKER_BLOCKS + 1)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Metrics:
    """The segment, and a typed view of one block for the process that writes it."""

    def __init__(self, view: mmap.mmap) -> None:
        self._view = view
        self.words = memoryview(view).cast("B")[_HEADER_SIZE:].cast("Q")

    @classmethod
    def create_or_open(cls, name: str) -> Metrics:
        """Open the instance's segment, or create it zeroed (a crashed instance's is kept:
        its counts belong with the queue and table it left)."""
        view = shm.map_segment(name, posix_ipc.O_CREAT, _SIZE)
        magic, version, _, _ = _HEADER.unpack_from(view, 0)
        if (magic, version) != (_MAGIC, _VERSION):
            view[:] = bytes(_SIZE)
            _HEADER.pack_into(view, 0, _MAGIC, _VERSION, BLOCKS, now_ms())
        return cls(view)

    @staticmethod
    def unlink(name: str) -> bool:
        return shm.unlink(name)

    def close(self) -> None:
        try:
            self.words.release()
            self._view.close()
        except BufferError:
            pass  # a block view is still held (a counters object): unmapped at exit instead

    def block(self, index: int) -> memoryview:
        """The words of one block: the writer's own, or any for a reader."""
        return self.words[index * BLOCK_WORDS:(index + 1) * BLOCK_WORDS]

    def sum_workers(self, offset: int, count: int) -> list[int]:
        """The element-wise sum of words [offset, offset+count) over every worker block."""
        totals = [0] * count
        for worker in range(WORKER_BLOCKS):
            base = worker * BLOCK_WORDS + offset
            for i, value in enumerate(self.words[base:base + count]):
                totals[i] += value
        return totals


class WorkerCounters:
    """A worker's own block: requests by route and status."""

    def __init__(self, metrics: Metrics, worker: int) -> None:
        self.words = metrics.block(worker)

    def count(self, route: int, status: int) -> None:
        index = REQUESTS + route * len(STATUSES) + STATUS_INDEX.get(status, len(STATUSES) - 1)
        self.words[index] += 1

    def payments_row(self) -> memoryview:
        """POST /payments's counters, for the C route to add to itself (indexed like STATUSES)."""
        start = REQUESTS + ROUTE_INDEX["POST /payments"] * len(STATUSES)
        return self.words[start:start + len(STATUSES)]


class DispatcherCounters:
    """The dispatcher's own block."""

    def __init__(self, metrics: Metrics) -> None:
        self.words = metrics.block(DISPATCHER_BLOCK)

    def recorded(self, processor: int) -> None:
        self.words[RECORDED + processor] += 1

    def duplicate(self, processor: int) -> None:
        self.words[DUPLICATES + processor] += 1

    def reply(self, processor: int, reply_class: int, seconds: float) -> None:
        """One answer (or none) from a processor, `seconds` after the request left."""
        words = self.words
        words[REPLIES + processor * len(REPLY_CLASSES) + reply_class] += 1
        base = RTT + processor * (len(RTT_BUCKETS_S) + 3)
        words[base + bisect.bisect_left(RTT_BUCKETS_S, seconds)] += 1
        words[base + len(RTT_BUCKETS_S) + 1] += int(seconds * 1_000_000)
        words[base + len(RTT_BUCKETS_S) + 2] += 1

    def gauges(self, in_flight: int, waiting: int, pinned: int, parked: int) -> None:
        self.words[GAUGES:GAUGES + 4] = memoryview(
            struct.pack("<4Q", in_flight, waiting, pinned, parked)).cast("Q")

    def router_state(self, in_flight: int, counts: dict[str, int],
                     circuits: list[tuple[int, int, int]]) -> None:
        """What the dispatcher holds and believes, published once a second."""
        self.gauges(in_flight, counts["waiting"], counts["pinned"], counts["parked"])
        for processor, (state, since_ms, failures) in enumerate(circuits):
            self.circuit(processor, state, since_ms, failures)

    def health(self, processor: int, failing: bool, min_response_ms: int) -> None:
        base = HEALTH + processor * 3
        self.words[base:base + 3] = memoryview(
            struct.pack("<3Q", now_ms(), failing, max(0, min_response_ms))).cast("Q")

    def circuit(self, processor: int, state: int, since_ms: int, failures: int) -> None:
        base = CIRCUITS + processor * 3
        self.words[base:base + 3] = memoryview(
            struct.pack("<3Q", state, max(0, since_ms), failures)).cast("Q")

    def sync(self, index: int, value: int = 1) -> None:
        self.words[index] += value

    def heard_peer(self, region: int | None = None) -> None:
        """A message from another instance (the one whose ledger region is `region`)."""
        now = now_ms()
        self.words[SYNC_HEARD_AT] = now
        if region is not None and 0 < region < PEER_SLOTS:
            self.words[SYNC_PEERS + 2 * region] += 1
            self.words[SYNC_PEERS + 2 * region + 1] = now


class SupervisorCounters:
    def __init__(self, metrics: Metrics) -> None:
        self.words = metrics.block(SUPERVISOR_BLOCK)

    def started(self) -> None:
        self.words[STARTED_AT] = now_ms()

    def child(self, slot: int, pid: int, restarted: bool) -> None:
        self.words[CHILD_PIDS + slot] = pid
        if restarted:
            self.words[CHILD_RESTARTS + slot] += 1
