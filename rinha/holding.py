"""The holding table: every accepted payment of this instance until it is recorded.

Created by the supervisor, written only by the dispatcher. The kernel queue is a short handoff
with a small per-user byte budget (docs/measurements.md), while a processor outage holds
thousands of payments; so the dispatcher moves each payment at once from the queue into a slot
here and dispatches from the slot. The table lives in shared memory, so it survives the
dispatcher: a restarted dispatcher re-drives every slot it finds (docs/architecture.md,
invariant 7).

A slot's state says what a restarted dispatcher must do with it:
  QUEUED     never sent, or the last attempt definitely failed: send it like a new one; if
             `pinned`, an earlier attempt's outcome is unknown and it must go to the same
             processor with the same requestedAt (invariant 3).
  SENDING    a request may be on the wire: its outcome is unknown, so it is pinned.
  RECORDING  the processor said 2XX; the ledger add may or may not have happened: it did iff
             the ledger cell no longer holds `word_before` (the dispatcher is the only adder
             of its own region, so nothing else moves that cell in between).
Fields are written before the state byte, so a slot is never seen in a state whose fields are
missing.

Staging closes the gap between the kernel queue and a slot: the dispatcher names the slot it
is about to fill in the header (`staging`), and the kernel copies the queue record straight
into that slot's record area (native_ledger._mqueue.receive_into). A dispatcher killed after
the copy but before the slot was committed leaves a FREE slot with a record in it, named by
`staging`: the next dispatcher commits it (`claim`), so no payment the kernel handed over is
lost, and none is taken twice (the slot is committed in place, then `staging` cleared).

The dispatcher works through the high-level face (`claim`, `receive`, `mark`, `release`): the
table keeps its own free slots and does its own staging, one call per step of a payment.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import posix_ipc

from native_ledger._mqueue import receive_into
from rinha import shm, wire

FREE = 0
QUEUED = 1
SENDING = 2
RECORDING = 3

# state, processor, pinned, pad, requested_at, held_since_ms, word_before, pad, then the
# queue record exactly as the workers encode it (wire.PAYMENT_RECORD): uuid, cents.
_SLOT = struct.Struct("<BBB5xqqQ8x16sq")
SLOT_SIZE = _SLOT.size  # 64: one cache line per slot
_FIELDS = struct.Struct("<BB5xqqQ8x16sq")  # the slot without its state byte, written first
RECORD_OFFSET = 40  # where the queue record sits in a slot
_RECORD_SIZE = wire.PAYMENT_RECORD_SIZE
_ZERO_RECORD = bytes(_RECORD_SIZE)
_HEADER = struct.Struct("<8sII")  # magic, version, capacity
_STAGING = struct.Struct("<q")  # at offset 16: the slot being filled from the queue, or -1
_STAGING_OFFSET = 16
_HEADER_SIZE = 64
_MAGIC = b"rinhaHLD"
_VERSION = 3


@dataclass(slots=True)
class HeldPayment:
    """The dispatcher's copy of one slot."""

    slot: int
    correlation_id: bytes
    cents: int
    held_since_ms: int
    state: int = QUEUED
    processor: int = 0
    pinned: bool = False
    requested_at: int = 0
    word_before: int = 0


class HoldingTable:
    """A fixed array of 64-byte slots in a POSIX shared-memory segment."""

    def __init__(self, view: mmap.mmap, capacity: int) -> None:
        self._view = view
        self.capacity = capacity
        self._free_slots: list[int] = []  # filled by claim(): the dispatcher's to hand out

    @classmethod
    def create(cls, name: str, capacity: int) -> HoldingTable:
        view = shm.map_segment(name, posix_ipc.O_CREX, _HEADER_SIZE + capacity * SLOT_SIZE)
        _HEADER.pack_into(view, 0, _MAGIC, _VERSION, capacity)
        _STAGING.pack_into(view, _STAGING_OFFSET, -1)
        return cls(view, capacity)

    @classmethod
    def open(cls, name: str) -> HoldingTable:
        view = shm.map_segment(name)
        size = len(view)
        magic, version, capacity = _HEADER.unpack_from(view, 0)
        if magic != _MAGIC or version != _VERSION:
            view.close()
            raise ValueError(f"{name} is not a rinha holding table of version {_VERSION}")
        if size < _HEADER_SIZE + capacity * SLOT_SIZE:
            view.close()
            raise ValueError(f"{name} is smaller than its {capacity} slots")
        return cls(view, capacity)

    @staticmethod
    def unlink(name: str) -> bool:
        return shm.unlink(name)

    def close(self) -> None:
        self._view.close()

    @property
    def view(self) -> mmap.mmap:
        """The mapping itself, for receive_into."""
        return self._view

    def write(self, payment: HeldPayment) -> None:
        """Store the payment's fields, then its state (see the module docstring)."""
        offset = _HEADER_SIZE + payment.slot * SLOT_SIZE
        _FIELDS.pack_into(
            self._view, offset + 1, payment.processor, payment.pinned, payment.requested_at,
            payment.held_since_ms, payment.word_before, payment.correlation_id, payment.cents,
        )
        self._view[offset] = payment.state

    # Staging: the queue record lands in a slot before the slot is committed ----------------

    def record_offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * SLOT_SIZE + RECORD_OFFSET

    def stage(self, slot: int) -> None:
        """Empty the slot's record area, then name the slot as the one being filled."""
        start = self.record_offset(slot)
        self._view[start:start + _RECORD_SIZE] = _ZERO_RECORD
        _STAGING.pack_into(self._view, _STAGING_OFFSET, slot)

    def staged_record(self, slot: int) -> bytes:
        start = self.record_offset(slot)
        return self._view[start:start + _RECORD_SIZE]

    def unstage(self) -> None:
        """The staged slot is committed (or nothing was received): forget it."""
        _STAGING.pack_into(self._view, _STAGING_OFFSET, -1)

    def _commit_staged(self, held_since_ms: int) -> HeldPayment | None:
        """Commit a record the kernel copied into a slot that a killed dispatcher never
        committed, if it is a payment (a control record is only forgotten)."""
        (slot,) = _STAGING.unpack_from(self._view, _STAGING_OFFSET)
        if not 0 <= slot < self.capacity:
            return None
        offset = _HEADER_SIZE + slot * SLOT_SIZE
        record = self.staged_record(slot)
        payment = None
        if self._view[offset] == FREE and wire.is_payment_record(record):
            correlation_id, cents = wire.decode_payment(record)
            payment = HeldPayment(slot, correlation_id, cents, held_since_ms)
            self.write(payment)
        self.unstage()
        return payment

    # The dispatcher's face -----------------------------------------------------------------

    def claim(self, now_ms: int) -> tuple[list[HeldPayment], bool]:
        """Take the table over, as the one dispatcher of this instance: commit what a killed
        predecessor left staged, note the free slots, and return every held payment oldest
        first, and whether a staged one was committed."""
        committed = self._commit_staged(now_ms) is not None
        held = sorted(self.held(), key=lambda p: (p.held_since_ms, p.slot))
        used = {p.slot for p in held}
        self._free_slots = [s for s in range(self.capacity - 1, -1, -1) if s not in used]
        return held, committed

    @property
    def full(self) -> bool:
        return not self._free_slots

    def receive(self, mqd: int, held_since_ms: int) -> HeldPayment | bytes | None:
        """Move the next queue record into a free slot: the committed payment, or the record's
        bytes if it is not a payment (its slot stays free), or None if the queue is empty.
        The kernel copies the record straight into the slot, so a kill at any instant loses
        nothing (staging, above). Call only while not `full`."""
        slot = self._free_slots[-1]
        self.stage(slot)
        try:
            size = receive_into(mqd, self._view, self.record_offset(slot))
        except BlockingIOError:
            self.unstage()
            return None
        record = self.staged_record(slot)[:size]
        if not wire.is_payment_record(record):
            self.stage(slot)  # empties the record again: nothing to keep
            self.unstage()
            return record
        self._free_slots.pop()
        correlation_id, cents = wire.decode_payment(record)
        payment = HeldPayment(slot, correlation_id, cents, held_since_ms)
        self.write(payment)
        self.unstage()
        return payment

    def mark(self, payment: HeldPayment, state: int) -> None:
        """Move the payment to `state`, its fields written first (see the module docstring)."""
        payment.state = state
        self.write(payment)

    def release(self, payment: HeldPayment) -> bool:
        """The payment is settled: free its slot. True if the table was full until now."""
        self.free(payment.slot)
        self._free_slots.append(payment.slot)
        return len(self._free_slots) == 1

    def free(self, slot: int) -> None:
        self._view[_HEADER_SIZE + slot * SLOT_SIZE] = FREE

    def depth(self) -> int:
        """How many slots are not free: the payments accepted and not yet recorded. Reads only
        the state byte of each slot (one strided slice), cheap enough to sample often."""
        end = _HEADER_SIZE + self.capacity * SLOT_SIZE
        return self.capacity - self._view[_HEADER_SIZE:end:SLOT_SIZE].count(FREE)

    def held(self) -> Iterator[HeldPayment]:
        """Every slot that is not free, in slot order."""
        view = memoryview(self._view)[_HEADER_SIZE : _HEADER_SIZE + self.capacity * SLOT_SIZE]
        try:
            for slot, fields in enumerate(_SLOT.iter_unpack(view)):
                state = fields[0]
                if state == FREE:
                    continue
                (_, processor, pinned, requested_at, held_since_ms, word_before,
                 correlation_id, cents) = fields
                yield HeldPayment(
                    slot=slot, correlation_id=correlation_id, cents=cents,
                    held_since_ms=held_since_ms, state=state, processor=processor,
                    pinned=bool(pinned), requested_at=requested_at, word_before=word_before,
                )
        finally:
            view.release()
