"""The recorder: counting a payment in the ledger exactly once, and telling the peer.

Runs in the dispatcher, the only writer of the ledger's OWN region. Recording is crash-safe:
the slot goes to RECORDING with the cell's word from before the add, then the add, then the slot
is freed; a restarted dispatcher finishes a RECORDING slot by comparing the cell with that word
(holding.py). The cells recorded in one loop turn go to the other instances in one push
(peers.py over UDP, redis_sync.py over Redis).
"""

from __future__ import annotations

import asyncio

from rinha.holding import RECORDING, HeldPayment, HoldingTable
from rinha.ledger import Ledger
from rinha.metrics import DispatcherCounters
from rinha.mirror import Carrier


class Recorder:
    def __init__(self, table: HoldingTable, ledger: Ledger, peer: Carrier | None,
                 counters: DispatcherCounters | None = None) -> None:
        self._counters = counters
        self._table = table
        self._ledger = ledger
        self._peer = peer
        self._dirty: set[tuple[int, int]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def record(self, payment: HeldPayment) -> bool:
        """Count the payment once; returns whether its slot freed the first slot of a full
        table (see HoldingTable.release)."""
        payment.word_before = self._ledger.own_word(payment.requested_at, payment.processor)
        self._table.mark(payment, RECORDING)
        self._ledger.record(payment.requested_at, payment.processor, payment.cents)
        if self._counters is not None:
            self._counters.recorded(payment.processor)
        self._mark_dirty(payment.requested_at, payment.processor)
        return self._table.release(payment)

    def finish(self, payment: HeldPayment) -> None:
        """A RECORDING slot left by a killed dispatcher: add it iff the add did not happen."""
        if self._ledger.own_word(payment.requested_at, payment.processor) == payment.word_before:
            self._ledger.record(payment.requested_at, payment.processor, payment.cents)
            if self._counters is not None:
                # Counted here only if the add is ours: a predecessor killed between its add
                # and its count leaves the conservation check one short (status_page.py).
                self._counters.recorded(payment.processor)
        self._mark_dirty(payment.requested_at, payment.processor)
        self._table.release(payment)

    def _mark_dirty(self, second: int, processor: int) -> None:
        """Coalesce the cells recorded in this loop turn into one push to the others."""
        if self._peer is None:
            return
        if not self._dirty and self._loop is not None:
            self._loop.call_soon(self._flush_dirty)
        self._dirty.add((second, processor))

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if self._peer is not None and dirty:
            self._peer.recorded(dirty)
