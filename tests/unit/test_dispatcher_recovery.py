"""Dispatcher.recover: what a restarted dispatcher does with each slot state it finds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from uuid import uuid4

import posix_ipc
import pytest

from rinha import wire
from rinha.dispatcher import Dispatcher
from rinha.holding import QUEUED, RECORDING, SENDING, HeldPayment, HoldingTable
from rinha.ledger import DEFAULT, Ledger
from rinha.settings import load

SECOND = 1_780_000_000


@pytest.fixture
def parts() -> Iterator[tuple[posix_ipc.MessageQueue, HoldingTable, Ledger]]:
    name = f"rt{uuid4().hex[:10]}"
    settings = load({"INSTANCE_NAME": name})
    queue = posix_ipc.MessageQueue(settings.queue_name, posix_ipc.O_CREX, max_messages=4,
                                   max_message_size=wire.PAYMENT_RECORD_SIZE)
    table = HoldingTable.create(settings.holding_name, 16)
    ledger = Ledger.create(settings.ledger_name, 1024)
    yield queue, table, ledger
    queue.close()
    queue.unlink()
    table.close()
    HoldingTable.unlink(settings.holding_name)
    ledger.close()
    Ledger.unlink(settings.ledger_name)


def dispatcher(parts) -> Dispatcher:
    queue, table, ledger = parts
    return Dispatcher(load({"INSTANCE_NAME": "unused"}), queue, table, ledger)


def next_send(restarted: Dispatcher) -> tuple[int, int] | None:
    picked = restarted._router.next_send(time.monotonic(), time.time_ns() // 1_000_000)
    return None if picked is None else (picked[0].slot, picked[1])


def held(slot: int, state: int, **fields: object) -> HeldPayment:
    return HeldPayment(slot, uuid4().bytes, 1990, 1_000, state=state, processor=DEFAULT,
                       requested_at=SECOND, **fields)


def test_recording_whose_add_did_not_happen_is_counted_once_and_freed(parts):
    _, table, ledger = parts
    table.write(held(2, RECORDING, word_before=ledger.own_word(SECOND, DEFAULT)))
    restarted = dispatcher(parts)
    restarted.recover()
    assert ledger.own_cell(SECOND, DEFAULT) == (1, 1990)
    assert list(table.held()) == []
    assert not table.full


def test_recording_whose_add_happened_is_not_counted_again(parts):
    _, table, ledger = parts
    before = ledger.record(SECOND, DEFAULT, 1990)  # the add happened, then the kill
    table.write(held(2, RECORDING, word_before=before))
    dispatcher(parts).recover()
    assert ledger.own_cell(SECOND, DEFAULT) == (1, 1990)
    assert list(table.held()) == []


def test_sending_becomes_pinned_to_its_processor_and_requested_at(parts):
    _, table, ledger = parts
    table.write(held(5, SENDING))
    table.write(held(6, QUEUED))
    restarted = dispatcher(parts)
    restarted.recover()
    states = {p.slot: (p.state, p.pinned, p.requested_at) for p in table.held()}
    assert states == {5: (QUEUED, True, SECOND), 6: (QUEUED, False, SECOND)}
    assert restarted._router.counts() == {"waiting": 1, "pinned": 1, "parked": 0}
    assert next_send(restarted) == (5, DEFAULT)  # the pinned one first, to its processor
    assert next_send(restarted) == (6, DEFAULT)
    assert ledger.own_cell(SECOND, DEFAULT) == (0, 0)


def test_of_two_payments_with_one_id_the_pinned_one_goes_first_the_other_waits(parts):
    _, table, _ = parts
    same = uuid4().bytes
    table.write(HeldPayment(3, same, 1990, 1_000, state=QUEUED))  # older, never sent
    table.write(HeldPayment(4, same, 1990, 2_000, state=SENDING, processor=DEFAULT,
                            requested_at=SECOND))
    table.write(held(5, QUEUED))
    restarted = dispatcher(parts)
    restarted.recover()
    assert restarted._router.counts() == {"waiting": 1, "pinned": 1, "parked": 1}
    assert next_send(restarted) == (4, DEFAULT)
    assert next_send(restarted) == (5, DEFAULT)
    assert next_send(restarted) is None  # 3 waits for 4 to be settled


def stage_record(table: HoldingTable, slot: int, cents: int) -> bytes:
    """What a dispatcher killed between the kernel's copy and the commit leaves behind."""
    correlation_id = uuid4().bytes
    table.stage(slot)
    table.view[table.record_offset(slot):table.record_offset(slot) + 24] = \
        wire.encode_payment(correlation_id, cents)
    return correlation_id


def test_a_payment_staged_but_not_committed_is_committed_and_queued(parts):
    _, table, _ = parts
    correlation_id = stage_record(table, 7, 1990)
    restarted = dispatcher(parts)
    restarted.recover()
    [payment] = list(table.held())
    assert (payment.slot, payment.correlation_id, payment.cents) == (7, correlation_id, 1990)
    assert next_send(restarted) == (7, DEFAULT)


def test_a_staged_control_record_is_not_taken_for_a_payment(parts):
    _, table, _ = parts
    table.stage(7)
    start = table.record_offset(7)
    table.view[start:start + 8] = wire.encode_control(wire.CONTROL_PURGED)
    restarted = dispatcher(parts)
    restarted.recover()
    assert list(table.held()) == []
    assert not restarted._router.has_work


def test_a_recording_slot_does_not_stop_the_recovery_of_the_slots_after_it(parts):
    _, table, ledger = parts
    table.write(held(2, RECORDING, word_before=ledger.own_word(SECOND, DEFAULT)))
    table.write(HeldPayment(3, uuid4().bytes, 500, 2_000, state=QUEUED))  # newer: after it
    table.write(HeldPayment(4, uuid4().bytes, 700, 3_000, state=SENDING, processor=DEFAULT,
                            requested_at=SECOND))
    restarted = dispatcher(parts)
    restarted.recover()
    assert ledger.own_cell(SECOND, DEFAULT) == (1, 1990)
    assert restarted._router.counts() == {"waiting": 1, "pinned": 1, "parked": 0}
    assert sorted(p.slot for p in table.held()) == [3, 4]


def test_a_payment_committed_from_staging_is_held_since_the_recovery_in_ms(parts):
    """Its hold time (for FALLBACK_AFTER_S, and the order of sending) starts at recovery."""
    _, table, _ = parts
    stage_record(table, 7, 1990)
    before_ms = time.time_ns() // 1_000_000
    dispatcher(parts).recover()
    after_ms = time.time_ns() // 1_000_000
    [payment] = list(table.held())
    assert before_ms <= payment.held_since_ms <= after_ms
