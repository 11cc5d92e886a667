"""The ledger: what this instance and its peer recorded, per second and per processor.

The typed face of `native_ledger` (a shared-memory segment written with atomics, see
native_ledger/_ledger.c). Created by the supervisor, opened by every child after fork.
Writers: the dispatcher adds this instance's payments to the OWN region and stores the peer's
absolute slot values in the PEER region; a worker purges. Readers: the workers' summaries,
which add both regions, and the dispatcher's peer sync, which reads the OWN region.
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
    def create(cls, name: str, seconds: int) -> Ledger:
        return cls(native_ledger.Ledger(name, create=True, seconds=seconds))

    @classmethod
    def open(cls, name: str) -> Ledger:
        return cls(native_ledger.Ledger(name, create=False))

    @staticmethod
    def unlink(name: str) -> bool:
        return native_ledger.unlink(name)

    @property
    def seconds(self) -> int:
        return self._native.seconds

    def record(self, second: int, processor: int, cents: int) -> int:
        """Count one payment of ours; returns the cell's packed word from before the add."""
        return self._native.add(OWN, second, processor, cents)

    def own_word(self, second: int, processor: int) -> int:
        return self._native.word(OWN, second, processor)

    def own_cell(self, second: int, processor: int) -> tuple[int, int]:
        return self._native.get(OWN, second, processor)

    def store(self, region: int, second: int, processor: int, count: int, cents: int) -> None:
        """Set a cell to absolute values (peer sync and recovery)."""
        self._native.store(region, second, processor, count, cents)

    def cell(self, region: int, second: int, processor: int) -> tuple[int, int]:
        return self._native.get(region, second, processor)

    def seconds_written(self, region: int) -> tuple[int, int] | None:
        return self._native.seconds_written(region)

    def summary(self, first: int | None, last: int | None) -> tuple[int, int, int, int]:
        """(default count, default cents, fallback count, fallback cents), both regions."""
        return self._native.summary(first, last)

    def region_summary(
        self, region: int, first: int | None, last: int | None
    ) -> tuple[int, int, int, int]:
        return self._native.region_summary(region, first, last)

    def purge(self, region: int | None = None) -> None:
        self._native.purge(region)

    def close(self) -> None:
        self._native.close()
