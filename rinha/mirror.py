"""Cells in and out of the ledger, for both sync carriers (peers.py over UDP, redis_sync.py and
redis_store.py over Redis).

Runs where the sync runs: in the supervisor while it recovers, before it forks, then in the
dispatcher. Owns no state of its own: the ledger keeps one region per instance of the
deployment, labelled with its INSTANCE_NAME (rinha/ledger.py), and this module is the only
place that decides which region a sender's cells go to. Every value is absolute and merges by
keeping the larger count: counts only grow between purges, so a stale, repeated or reordered
message can never lower a cell (docs/architecture.md, invariant 6).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from rinha import wire
from rinha.health import HealthReport
from rinha.ledger import OWN, PROCESSORS, Ledger

if TYPE_CHECKING:
    from rinha.metrics import DispatcherCounters
    from rinha.settings import Settings

log = logging.getLogger("rinha.mirror")


class Carrier(Protocol):
    """What the dispatcher and its recorder tell a sync carrier (PeerSync or RedisSync)."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def recorded(self, cells: set[tuple[int, int]]) -> None:
        """These OWN cells (second, processor) changed in this loop turn."""

    def purged(self) -> None:
        """A worker of this instance purged the ledger: every other instance must too."""

    def share_health(self, report: HealthReport) -> None: ...


def open_carrier(settings: Settings, ledger: Ledger, sync_socket: socket.socket | None,
                 on_health: Callable[[HealthReport], None],
                 counters: DispatcherCounters | None) -> Carrier | None:
    """The sync carrier this instance is configured with: UDP to PEERS (the socket the
    supervisor bound), Redis at SYNC_URL, or none for an instance alone."""
    if sync_socket is not None:
        from rinha.peers import PeerSync

        return PeerSync(settings, ledger, sync_socket, on_health=on_health, counters=counters)
    if settings.sync_url is not None:
        from rinha.redis_sync import RedisSync  # the rinha[redis] extra: only if used

        return RedisSync(settings, ledger, on_health=on_health, counters=counters)
    return None


def region_cells(ledger: Ledger, region: int, first: int | None = None) -> list[wire.Cell]:
    """Every non-empty cell of `region` from second `first` on (all written seconds if None)."""
    span = ledger.seconds_written(region)
    if span is None:
        return []
    low, high = span
    low = max(low, high - ledger.seconds + 1, first if first is not None else low)
    cells = []
    for second in range(low, high + 1):
        for processor in PROCESSORS:
            count, cents = ledger.cell(region, second, processor)
            if count:
                cells.append((second, processor, count, cents))
    return cells


def merge_cells(ledger: Ledger, region: int, cells: list[wire.Cell]) -> int:
    """Keep the larger count of each cell; returns how many cells grew."""
    grew = 0
    for second, processor, count, cents in cells:
        if count > ledger.cell(region, second, processor)[0]:
            ledger.store(region, second, processor, count, cents)
            grew += 1
    return grew


def region_of(ledger: Ledger, own_name: str, subject: str) -> int | None:
    """The region where `subject`'s cells go: OWN for this instance's own (a recovery), else
    the region kept for that instance, given out now if it is the first word of it. None when
    every region is taken: the cells are dropped and the error says what to raise."""
    if subject == own_name:
        return OWN
    try:
        return ledger.assign_region(subject)
    except LookupError as exc:
        log.error("%s", exc)
        return None


def merge_subject(ledger: Ledger, own_name: str, subject: str, cells: list[wire.Cell]) -> int:
    region = region_of(ledger, own_name, subject)
    return 0 if region is None else merge_cells(ledger, region, cells)


def every_region(ledger: Ledger, own_name: str) -> list[tuple[str, int]]:
    """(instance name, region) of every region in use, this instance's own first."""
    return [(own_name, OWN), *sorted(ledger.mirrors().items(), key=lambda item: item[1])]
