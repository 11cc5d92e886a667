"""holding: the shared-memory holding table, from one process and from a forked one."""

from __future__ import annotations

import mmap
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import posix_ipc
import pytest

from rinha import holding, wire
from rinha.holding import (
    FREE,
    QUEUED,
    RECORDING,
    SENDING,
    SLOT_SIZE,
    HeldPayment,
    HoldingTable,
)

CAPACITY = 32
T0 = 1_752_150_896


@pytest.fixture
def name() -> Iterator[str]:
    segment = f"/rinha-test-{uuid4().hex[:10]}"
    yield segment
    HoldingTable.unlink(segment)


@pytest.fixture
def table(name: str) -> Iterator[HoldingTable]:
    created = HoldingTable.create(name, CAPACITY)
    yield created
    created.close()


def payment(slot: int, **fields: object) -> HeldPayment:
    values: dict[str, object] = {
        "correlation_id": uuid4().bytes,
        "cents": 1990 + slot,
        "held_since_ms": T0 * 1000 + slot,
    }
    values.update(fields)
    return HeldPayment(slot=slot, **values)  # type: ignore[arg-type]


def test_neighbouring_slots_do_not_touch_each_other(table: HoldingTable) -> None:
    """Each slot owns its 64 bytes (one cache line): writing one, or freeing it, or staging its
    record, leaves the slots on both sides exactly as they were."""
    left, middle, right = payment(4, state=SENDING), payment(5), payment(6, state=RECORDING)
    for p in (left, middle, right):
        table.write(p)
    table.write(payment(5, state=SENDING, processor=1, pinned=True,
                        cents=2**63 - 1, word_before=2**64 - 1, correlation_id=b"\xff" * 16))
    table.free(5)
    table.stage(5)
    table.unstage()
    assert list(table.held()) == [left, right]


def test_a_new_table_holds_nothing(table: HoldingTable) -> None:
    assert table.capacity == CAPACITY
    assert list(table.held()) == []


def test_create_sizes_the_segment_for_its_slots(name: str, table: HoldingTable) -> None:
    assert (Path("/dev/shm") / name.lstrip("/")).stat().st_size == 64 + CAPACITY * SLOT_SIZE


def test_held_returns_exactly_the_written_slots_with_every_field(table: HoldingTable) -> None:
    written = [
        payment(0),
        payment(3, state=SENDING, processor=1, pinned=True, requested_at=T0),
        payment(
            CAPACITY - 1, state=RECORDING, processor=0,
            requested_at=-(2**63), cents=2**63 - 1, held_since_ms=-1, word_before=2**64 - 1,
            correlation_id=b"\xff" * 16,
        ),
        payment(10, correlation_id=bytes(16), cents=-1),
    ]
    for held in written:
        table.write(held)
    assert list(table.held()) == sorted(written, key=lambda held: held.slot)


def test_write_over_a_slot_replaces_every_field(table: HoldingTable) -> None:
    table.write(payment(5, state=SENDING, processor=1, pinned=True, word_before=9))
    replacement = payment(5)
    table.write(replacement)
    assert list(table.held()) == [replacement]


def test_mark_changes_the_state_in_memory_and_in_the_table(table: HoldingTable) -> None:
    held = payment(2)
    table.write(held)
    held.requested_at = T0
    table.mark(held, SENDING)
    assert held.state == SENDING
    [stored] = table.held()
    assert stored == held
    assert (stored.state, stored.requested_at) == (SENDING, T0)


def test_free_empties_one_slot_only(table: HoldingTable) -> None:
    kept = [payment(1), payment(3)]
    for held in [*kept, payment(2)]:
        table.write(held)
    table.free(2)
    assert list(table.held()) == kept


def test_a_slot_set_to_free_is_not_held(table: HoldingTable) -> None:
    held = payment(4)
    table.write(held)
    table.mark(held, FREE)
    assert list(table.held()) == []


def test_every_slot_up_to_capacity_is_usable(table: HoldingTable) -> None:
    written = [payment(slot, state=QUEUED) for slot in range(CAPACITY)]
    for held in written:
        table.write(held)
    assert list(table.held()) == written


def test_open_by_name_sees_what_create_wrote(name: str, table: HoldingTable) -> None:
    held = payment(7, state=SENDING, processor=1, pinned=True, requested_at=T0)
    table.write(held)
    reopened = HoldingTable.open(name)
    try:
        assert reopened.capacity == CAPACITY
        assert list(reopened.held()) == [held]
        reopened.free(7)
    finally:
        reopened.close()
    assert list(table.held()) == []


def test_a_table_survives_its_creator(name: str) -> None:
    created = HoldingTable.create(name, CAPACITY)
    held = payment(0)
    created.write(held)
    created.close()
    reopened = HoldingTable.open(name)
    try:
        assert list(reopened.held()) == [held]
    finally:
        reopened.close()


def test_create_refuses_an_existing_name(name: str, table: HoldingTable) -> None:
    with pytest.raises(posix_ipc.ExistentialError):
        HoldingTable.create(name, CAPACITY)


def test_open_of_a_missing_name_raises(name: str) -> None:
    with pytest.raises(posix_ipc.ExistentialError):
        HoldingTable.open(name)


def write_segment(name: str, content: bytes, size: int) -> None:
    memory = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    with mmap.mmap(memory.fd, size) as view:
        view[: len(content)] = content
    memory.close_fd()


@pytest.mark.parametrize(
    "content",
    [
        b"",  # all zeros
        b"notrinha" + bytes(8),
        b"rinhaHLD" + (holding._VERSION + 1).to_bytes(4, "little") + (4).to_bytes(4, "little"),
    ],
)
def test_open_of_a_garbage_segment_raises_value_error(name: str, content: bytes) -> None:
    write_segment(name, content, 64 + 4 * SLOT_SIZE)
    with pytest.raises(ValueError, match="not a rinha holding table"):
        HoldingTable.open(name)


def test_open_of_a_segment_smaller_than_its_header_says_raises(name: str) -> None:
    header = b"rinhaHLD" + holding._VERSION.to_bytes(4, "little") + (1000).to_bytes(4, "little")
    write_segment(name, header, 64 + 4 * SLOT_SIZE)
    with pytest.raises(ValueError, match="smaller than its 1000 slots"):
        HoldingTable.open(name)


def test_unlink_reports_whether_the_name_existed(name: str) -> None:
    HoldingTable.create(name, CAPACITY).close()
    assert HoldingTable.unlink(name) is True
    assert HoldingTable.unlink(name) is False


def test_a_forked_process_writes_slots_the_parent_reads(name: str, table: HoldingTable) -> None:
    by_child = [
        payment(0, state=QUEUED),
        payment(9, state=SENDING, processor=1, pinned=True, requested_at=T0),
        payment(CAPACITY - 1, state=RECORDING, requested_at=T0 + 1, word_before=123456789),
    ]
    table.write(payment(5))  # the child frees this one
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = HoldingTable.open(name)  # by name, not the inherited mapping
            for held in by_child:
                child.write(held)
            child.free(5)
            child.close()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(table.held()) == by_child


# --- staging: the kernel copies a queue record straight into a slot ----------------------


@pytest.fixture
def queue() -> Iterator[posix_ipc.MessageQueue]:
    created = posix_ipc.MessageQueue(f"/rinha-test-{uuid4().hex[:10]}", posix_ipc.O_CREX,
                                     max_messages=4, max_message_size=wire.PAYMENT_RECORD_SIZE)
    created.block = False
    yield created
    created.close()
    created.unlink()


def receive_into_slot(table: HoldingTable, queue: posix_ipc.MessageQueue, slot: int) -> int:
    """What a dispatcher does before it commits: name the slot, let the kernel copy into it."""
    from native_ledger._mqueue import receive_into

    table.stage(slot)
    return receive_into(queue.mqd, table.view, table.record_offset(slot))


def test_a_received_but_uncommitted_record_is_committed_once_on_recovery(name, table, queue):
    correlation_id = uuid4().bytes
    queue.send(wire.encode_payment(correlation_id, 1990))
    assert receive_into_slot(table, queue, 3) == 24
    assert queue.current_messages == 0  # the kernel handed it over...
    assert list(table.held()) == []  # ...and the dispatcher died before committing it
    reopened = HoldingTable.open(name)
    try:
        held, committed = reopened.claim(1234)
        assert committed
        assert [(p.slot, p.correlation_id, p.cents, p.state, p.held_since_ms) for p in held] \
            == [(3, correlation_id, 1990, QUEUED, 1234)]
        assert reopened.claim(1234) == (held, False)  # never twice
    finally:
        reopened.close()


def test_a_committed_slot_still_named_staging_is_not_taken_again(table, queue):
    queue.send(wire.encode_payment(uuid4().bytes, 500))
    receive_into_slot(table, queue, 1)
    correlation_id, cents = wire.decode_payment(table.staged_record(1))
    table.write(HeldPayment(1, correlation_id, cents, 99))  # committed; killed before unstage
    held, committed = table.claim(100)
    assert not committed
    assert [(p.slot, p.cents, p.held_since_ms) for p in held] == [(1, 500, 99)]


def test_staging_with_nothing_received_or_a_control_record_commits_nothing(table, queue):
    table.stage(2)  # killed before the receive returned
    assert table.claim(100) == ([], False)
    queue.send(wire.encode_control(wire.CONTROL_PURGED))  # not a payment
    assert receive_into_slot(table, queue, 2) == 8
    assert table.claim(100) == ([], False)
    assert list(table.held()) == []


def test_stage_empties_what_an_earlier_payment_left_in_the_slot(table):
    table.write(payment(0, cents=777))
    table.free(0)
    table.stage(0)
    assert table.staged_record(0) == bytes(24)
    assert table.claim(100) == ([], False)


# --- the dispatcher's face: claim, receive, mark, release --------------------------------


def test_receive_commits_payments_and_hands_back_control_records(table, queue):
    table.claim(0)
    first, second = uuid4().bytes, uuid4().bytes
    queue.send(wire.encode_payment(first, 1990))
    queue.send(wire.encode_control(wire.CONTROL_PURGED))
    queue.send(wire.encode_payment(second, 5))
    got = [table.receive(queue.mqd, 777) for _ in range(4)]
    assert isinstance(got[0], HeldPayment) and isinstance(got[2], HeldPayment)
    assert wire.decode_control(got[1]) == wire.CONTROL_PURGED
    assert got[3] is None  # the queue is empty
    assert [(p.correlation_id, p.cents, p.held_since_ms, p.state) for p in table.held()] == [
        (first, 1990, 777, QUEUED), (second, 5, 777, QUEUED)]
    assert got[0].slot != got[2].slot


def test_a_full_table_says_so_and_a_release_makes_room_once(table, queue):
    held, _ = table.claim(0)
    assert held == [] and not table.full
    taken = []
    for _ in range(CAPACITY):
        queue.send(wire.encode_payment(uuid4().bytes, 100))
        taken.append(table.receive(queue.mqd, 0))
    assert table.full and len({p.slot for p in taken}) == CAPACITY
    assert table.release(taken[5]) is True  # the first room in a full table
    assert table.release(taken[6]) is False
    assert not table.full
    assert len(list(table.held())) == CAPACITY - 2


def test_claim_leaves_the_slots_in_use_out_of_the_free_ones(table, queue):
    for slot in range(CAPACITY - 1):
        table.write(payment(slot))
    held, _ = table.claim(0)
    assert len(held) == CAPACITY - 1
    queue.send(wire.encode_payment(uuid4().bytes, 100))
    received = table.receive(queue.mqd, 0)
    assert received.slot == CAPACITY - 1 and table.full


# --- found by mutation testing (tests/mutation) ----------------------------------------------


def test_open_checks_the_magic_whichever_side_of_ours_it_sorts_on(name: str) -> None:
    header = b"zinhaHLD" + holding._VERSION.to_bytes(4, "little") + (4).to_bytes(4, "little")
    write_segment(name, header, 64 + 4 * SLOT_SIZE)
    with pytest.raises(ValueError, match="not a rinha holding table"):
        HoldingTable.open(name)


def test_open_refuses_a_segment_one_slot_short_and_takes_a_longer_one(name: str) -> None:
    header = b"rinhaHLD" + holding._VERSION.to_bytes(4, "little") + (3).to_bytes(4, "little")
    write_segment(name, header, 64 + 2 * SLOT_SIZE)
    with pytest.raises(ValueError, match="smaller than its 3 slots"):
        HoldingTable.open(name)
    HoldingTable.unlink(name)
    # Two slots more than the header says: usable, and the extra ones (one in use, one free)
    # are none of the table's.
    beyond = bytes([SENDING]) + bytes(2 * SLOT_SIZE - 1)
    write_segment(name, header + bytes(64 - len(header)) + bytes(3 * SLOT_SIZE) + beyond,
                  64 + 5 * SLOT_SIZE)
    table = HoldingTable.open(name)
    try:
        assert table.capacity == 3
        first, last = payment(0), payment(2)  # an odd capacity: its last slot too
        table.write(first)
        table.write(last)
        assert list(table.held()) == [first, last]
        assert table.depth() == 2
    finally:
        table.close()


def test_depth_counts_the_slots_not_free(table: HoldingTable) -> None:
    assert table.depth() == 0
    for slot, state in [(0, QUEUED), (5, SENDING), (CAPACITY - 1, RECORDING)]:
        table.write(payment(slot, state=state))
    assert table.depth() == 3
    table.free(5)
    assert table.depth() == 2
    for slot in range(CAPACITY):
        table.write(payment(slot))
    assert table.depth() == CAPACITY


def test_a_released_payment_is_not_committed_again_by_the_next_dispatcher(name, table, queue):
    """release frees the slot but leaves its record bytes; the staging mark, cleared after the
    commit, must not point at the slot any more, or a restart would take the payment twice."""
    table.claim(0)
    for _ in range(2):  # slots 0 and 1
        queue.send(wire.encode_payment(uuid4().bytes, 1990))
    received = [table.receive(queue.mqd, 0) for _ in range(2)]
    assert sorted(p.slot for p in received) == [0, 1]
    for p in received:
        table.release(p)
    reopened = HoldingTable.open(name)
    try:
        assert reopened.claim(1) == ([], False)
    finally:
        reopened.close()


def test_every_received_record_lands_in_its_own_slot(table, queue):
    table.claim(0)
    sent = []
    for i in range(12):
        sent.append((uuid4().bytes, 100 + i))
        queue.send(wire.encode_payment(*sent[-1]))
        assert isinstance(table.receive(queue.mqd, 5), HeldPayment)
    assert sorted((p.correlation_id, p.cents) for p in table.held()) == sorted(sent)


@pytest.mark.parametrize("slot", [0, 1, 3, CAPACITY - 1])
def test_a_staged_record_is_committed_in_any_slot_and_a_committed_one_never_again(
    name, table, queue, slot
):
    queue.send(wire.encode_payment(uuid4().bytes, 1990))
    receive_into_slot(table, queue, slot)
    held, committed = table.claim(7)
    assert committed and [(p.slot, p.cents) for p in held] == [(slot, 1990)]
    # Committed, and a kill before the staging mark was cleared:
    queue.send(wire.encode_payment(uuid4().bytes, 500))
    receive_into_slot(table, queue, (slot + 5) % CAPACITY)
    correlation_id, cents = wire.decode_payment(table.staged_record((slot + 5) % CAPACITY))
    table.write(HeldPayment((slot + 5) % CAPACITY, correlation_id, cents, 8))
    held, committed = table.claim(9)
    assert not committed and len(held) == 2


def test_a_created_table_of_odd_capacity_holds_its_last_slot(name: str) -> None:
    created = HoldingTable.create(name, 3)
    try:
        last = payment(2, state=SENDING)
        created.write(last)
        assert list(created.held()) == [last]
    finally:
        created.close()
    reopened = HoldingTable.open(name)
    try:
        assert reopened.capacity == 3 and list(reopened.held()) == [last]
    finally:
        reopened.close()


@pytest.mark.parametrize(
    ("magic", "version"),
    [(b"ainhaHLD", holding._VERSION), (b"rinhaHLD", holding._VERSION - 1)],
    ids=["a magic sorting before ours", "an older version"],
)
def test_open_refuses_another_magic_or_version_either_side(name, magic, version) -> None:
    header = magic + version.to_bytes(4, "little") + (4).to_bytes(4, "little")
    write_segment(name, header, 64 + 4 * SLOT_SIZE)
    with pytest.raises(ValueError, match="not a rinha holding table"):
        HoldingTable.open(name)
