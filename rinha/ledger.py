"""The ledger: what each instance of the deployment recorded, per second and per processor.

The typed face of `native_ledger` (a shared-memory segment written with atomics, see
native_ledger/_ledger.c). Created by the supervisor, opened by every child after fork.
One region per instance of the deployment, each with a single writer: the dispatcher adds this
instance's payments to region OWN; the sync (peers.py over UDP, redis_sync.py over Redis)
stores every other instance's absolute cell values in that instance's region, labelled with its
INSTANCE_NAME and given out the first time the sync hears of it; a worker purges. Readers: the
workers' summaries, which add every region in use, and the sync, which reads them all.
"""

from __future__ import annotations

import native_ledger
from native_ledger import DEFAULT, FALLBACK, OWN, PEER

__all__ = ["DEFAULT", "FALLBACK", "OWN", "PEER", "PROCESSORS", "PROCESSOR_NAMES", "Ledger"]

PROCESSORS = (DEFAULT, FALLBACK)
PROCESSOR_NAMES = ("default", "fallback")


class Ledger:
    """One instance's ledger segment; the methods name the region they touch."""

    def __init__(self, native: native_ledger.Ledger) -> None:
        self._native = native

    @classmethod
    def create(cls, name: str, seconds: int, regions: int = native_ledger.DEFAULT_REGIONS
               ) -> Ledger:
        return cls(native_ledger.Ledger(name, create=True, seconds=seconds, regions=regions))

    @classmethod
    def open(cls, name: str) -> Ledger:
        return cls(native_ledger.Ledger(name, create=False))

    @staticmethod
    def unlink(name: str) -> bool:
        return native_ledger.unlink(name)

    @property
    def seconds(self) -> int:
        return self._native.seconds

    @property
    def regions(self) -> int:
        """The most regions the segment holds: OWN and one per other instance."""
        return self._native.regions

    @property
    def sync_epoch(self) -> int:
        """The Redis carrier's purge generation these cells belong to (0: never synced through
        Redis), kept here so a restart on the same host knows whether a purge passed it by."""
        return self._native.sync_epoch

    @sync_epoch.setter
    def sync_epoch(self, value: int) -> None:
        self._native.sync_epoch = value

    def record(self, second: int, processor: int, cents: int) -> int:
        """Count one payment of ours; returns the cell's packed word from before the add."""
        return self._native.add(OWN, second, processor, cents)

    def own_word(self, second: int, processor: int) -> int:
        return self._native.word(OWN, second, processor)

    def own_cell(self, second: int, processor: int) -> tuple[int, int]:
        return self._native.get(OWN, second, processor)

    def store(self, region: int, second: int, processor: int, count: int, cents: int) -> None:
        """Set a cell to absolute values (sync and recovery)."""
        self._native.store(region, second, processor, count, cents)

    def cell(self, region: int, second: int, processor: int) -> tuple[int, int]:
        return self._native.get(region, second, processor)

    def seconds_written(self, region: int) -> tuple[int, int] | None:
        return self._native.seconds_written(region)

    def summary(self, first: int | None, last: int | None) -> tuple[int, int, int, int]:
        """(default count, default cents, fallback count, fallback cents), every region."""
        return self._native.summary(first, last)

    def region_summary(
        self, region: int, first: int | None, last: int | None
    ) -> tuple[int, int, int, int]:
        return self._native.region_summary(region, first, last)

    def region_of(self, instance: str) -> int | None:
        """The region mirroring `instance`, None if the sync never heard of it."""
        return self._native.region_of(instance)

    def assign_region(self, instance: str) -> int:
        """The region mirroring `instance`, given out now if it has none (LookupError when
        every region is taken). Only the sync calls it: the supervisor's recovery before it
        forks, then the dispatcher."""
        return self._native.assign_region(instance)

    def mirrors(self) -> dict[str, int]:
        """Every other instance this one mirrors, by name, with its region."""
        return {label: region for region, label in enumerate(self._native.labels()) if region}

    def purge(self, region: int | None = None) -> None:
        self._native.purge(region)

    def close(self) -> None:
        self._native.close()
