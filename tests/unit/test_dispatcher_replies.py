"""Dispatcher: what each processor answer does to a payment (_on_reply, _on_stored, _settle), and
the service-health poll of Dispatcher.run.

A real Dispatcher runs in this process, on its own queue, holding table and ledger, against real
processor emulators; payments enter through the queue as a worker queues them (or, for a
payment left by a killed dispatcher, through the table, as recover() finds it).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from uuid import uuid4

import httpx
import posix_ipc
import pytest

from rinha import wire
from rinha.dispatcher import Dispatcher
from rinha.holding import QUEUED, SENDING, HeldPayment, HoldingTable
from rinha.ledger import DEFAULT, FALLBACK, OWN, Ledger
from rinha.settings import load
from tests.processes import ADMIN


class Parts:
    """A queue, a holding table and a ledger of their own, and the settings naming them."""

    def __init__(self, default_url: str, fallback_url: str, capacity: int = 64) -> None:
        self.env = {"INSTANCE_NAME": f"dr{uuid4().hex[:10]}", "PROCESSOR_DEFAULT_URL": default_url,
                    "PROCESSOR_FALLBACK_URL": fallback_url, "HEALTH_POLL": "0",
                    "RETRY_BACKOFF_MIN_S": "0.05", "RETRY_BACKOFF_MAX_S": "0.3"}
        settings = load(self.env)
        self.queue = posix_ipc.MessageQueue(settings.queue_name, posix_ipc.O_CREX,
                                            max_messages=8,
                                            max_message_size=wire.PAYMENT_RECORD_SIZE)
        self.table = HoldingTable.create(settings.holding_name, capacity)
        self.ledger = Ledger.create(settings.ledger_name, 1024)

    def dispatcher(self, **env: str) -> Dispatcher:
        return Dispatcher(load({**self.env, **env}), self.queue, self.table, self.ledger)

    def close(self) -> None:
        settings = load(self.env)
        self.queue.close()
        self.queue.unlink()
        self.table.close()
        HoldingTable.unlink(settings.holding_name)
        self.ledger.close()
        Ledger.unlink(settings.ledger_name)

    def own(self) -> tuple[int, int, int, int]:
        """(default count, cents, fallback count, cents) this instance recorded."""
        return self.ledger.region_summary(OWN, None, None)

    def held(self) -> list[HeldPayment]:
        return list(self.table.held())


@pytest.fixture
def parts(processors) -> Iterator[Parts]:
    default, fallback = processors
    made = Parts(default.url, fallback.url)
    yield made
    made.close()


def drive(dispatcher: Dispatcher, until: Callable[[], object], timeout: float = 10.0,
          before: Callable[[], None] | None = None) -> None:
    """Run the dispatcher's loop as the dispatcher process does, until `until()` is true (or
    fail after `timeout`); `before` runs in the loop once recover() is done."""
    met: list[bool] = []

    async def watch() -> None:
        await asyncio.sleep(0.05)
        if before is not None:
            before()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                met.append(True)
                break
            await asyncio.sleep(0.01)
        dispatcher.stop()

    with asyncio.Runner() as runner:
        runner.get_loop().create_task(watch())
        try:
            runner.run(dispatcher.run())
        except RuntimeError as exc:
            if "Event loop stopped" not in str(exc):
                raise
    assert not dispatcher.crashed
    assert met, f"not met within {timeout} s"


def text(correlation_id: bytes) -> str:
    return wire.format_uuid(correlation_id)


def store(emulator, correlation_id: bytes, amount: str, second: int) -> None:
    """A payment the processor holds already (ours from an attempt whose answer was lost, or
    another payment with our id)."""
    response = httpx.post(emulator.url + "/payments", timeout=5, json={
        "correlationId": text(correlation_id), "amount": float(amount),
        "requestedAt": wire.format_requested_at(second)})
    assert response.status_code == 200, response.text


def stored_second(emulator, correlation_id: bytes) -> int:
    response = httpx.get(f"{emulator.url}/payments/{text(correlation_id)}", headers=ADMIN,
                         timeout=5)
    assert response.status_code == 200, response.text
    instant = wire.parse_instant(response.json()["requestedAt"])
    assert instant is not None and not instant.has_fraction
    return instant.second


def requests(emulator) -> int:
    return emulator.counters()["paymentRequests"]


def pinned(slot: int, correlation_id: bytes, second: int, cents: int = 1990,
           state: int = SENDING) -> HeldPayment:
    """A payment whose earlier attempt on the default has an unknown outcome."""
    return HeldPayment(slot, correlation_id, cents, 1_000, state=state, processor=DEFAULT,
                       pinned=True, requested_at=second)


# --- _on_reply and _settle --------------------------------------------------------------------


def test_a_2xx_is_counted_once_in_the_cell_of_the_requested_at_sent(processors, parts):
    default, fallback = processors
    ours = uuid4().bytes
    parts.queue.send(wire.encode_payment(ours, 1990))
    drive(parts.dispatcher(), lambda: not parts.held() and parts.own()[0])
    assert default.counters()["paymentLookups"] == 0  # a 2XX needs no check
    second = stored_second(default, ours)
    assert parts.ledger.own_cell(second, DEFAULT) == (1, 1990)
    assert parts.own() == (1, 1990, 0, 0)
    assert (requests(default), requests(fallback)) == (1, 0)


def test_a_422_on_a_first_attempt_is_another_payment_s_and_is_not_counted(processors, parts):
    """The processor holds another payment with our id: ours is refused, its slot freed, and
    the next payment with that id (parked meanwhile) goes, to be refused too."""
    default, _ = processors
    same, other = uuid4().bytes, uuid4().bytes
    store(default, same, "5.00", int(time.time()) - 100)
    for correlation_id in (same, same, other):
        parts.queue.send(wire.encode_payment(correlation_id, 1990))
    drive(parts.dispatcher(), lambda: not parts.held())
    assert parts.own() == (1, 1990, 0, 0)  # only `other`
    assert requests(default) == 4  # the stored one, both of ours (422), other
    assert default.summary()["totalRequests"] == 2


@pytest.mark.parametrize(
    ("stored_amount", "stored_at", "counted"),
    [
        ("19.90", 0, True),  # ours: same amount, same second
        ("19.91", 0, False),  # another payment with our id
        ("19.90", 1, False),  # another second: not ours
    ],
)
def test_a_422_after_an_unknown_outcome_counts_only_our_own_stored_record(
    processors, parts, stored_amount, stored_at, counted
):
    default, fallback = processors
    ours, second = uuid4().bytes, int(time.time()) - 30
    store(default, ours, stored_amount, second + stored_at)
    parts.table.write(pinned(3, ours, second))  # left SENDING by a killed dispatcher
    drive(parts.dispatcher(FALLBACK_AFTER_S="0.01"), lambda: not parts.held())
    assert parts.own() == ((1, 1990, 0, 0) if counted else (0, 0, 0, 0))
    if counted:
        assert parts.ledger.own_cell(second, DEFAULT) == (1, 1990)
    assert default.counters()["paymentLookups"] == 1
    assert requests(fallback) == 0  # pinned: never elsewhere


def test_no_record_behind_the_422_sends_the_payment_again_after_a_pause(processors, parts):
    """A 404 to the check: the processor holds nothing under our id; the payment goes again,
    still pinned (same processor, same requestedAt), after RETRY_BACKOFF_MAX_S."""
    default, _ = processors
    ours, second = uuid4().bytes, int(time.time()) - 30
    payment = pinned(60, ours, second)
    dispatcher = parts.dispatcher()
    checked: list[float] = []

    def lookup_answered_404() -> None:
        parts.table.write(payment)  # in flight, the check's answer just in
        dispatcher._on_stored(payment, 404, b"")
        checked.append(time.monotonic())
        [held] = parts.held()
        assert (held.state, held.pinned, held.requested_at) == (QUEUED, True, second)

    drive(dispatcher, lambda: not parts.held(), before=lookup_answered_404)
    assert time.monotonic() - checked[0] >= 0.3
    assert stored_second(default, ours) == second
    assert parts.ledger.own_cell(second, DEFAULT) == (1, 1990)


def test_a_500_holds_the_payment_unpinned_until_the_processor_answers_again(processors,
                                                                             parts):
    default, fallback = processors
    default.set_failure(True)
    ours = uuid4().bytes
    parts.queue.send(wire.encode_payment(ours, 1990))
    dispatcher = parts.dispatcher()
    seen: list[HeldPayment] = []

    def recovered_after_failures() -> bool:
        if not seen:
            if requests(default) >= 2:  # the first attempt and a failed probe
                seen.extend(parts.held())
                assert dispatcher._router.circuits[DEFAULT].failing
                default.set_failure(False)
            return False
        return not parts.held()

    drive(dispatcher, recovered_after_failures)
    [held] = seen
    assert (held.state, held.pinned) == (QUEUED, False)
    assert parts.own() == (1, 1990, 0, 0)
    assert requests(fallback) == 0
    assert not dispatcher._router.circuits[DEFAULT].failing


def test_no_answer_pins_the_payment_and_its_retry_counts_the_stored_one_once(processors,
                                                                              parts):
    """The first attempt times out but the processor stores it; the fallback is allowed after
    0.05 s, yet the payment goes only to the default again, and its 422 is checked."""
    default, fallback = processors
    default.set_delay(500)
    ours = uuid4().bytes
    parts.queue.send(wire.encode_payment(ours, 1990))
    dispatcher = parts.dispatcher(REQUEST_TIMEOUT_S="0.2", FALLBACK_AFTER_S="0.05")
    seen: list[HeldPayment] = []

    def stored_then_settled() -> bool:
        if not seen:
            if default.summary()["totalRequests"] == 1:
                seen.extend(parts.held())
                default.set_delay(0)
            return False
        return not parts.held()

    drive(dispatcher, stored_then_settled, timeout=15)
    [held] = seen
    assert held.pinned and held.processor == DEFAULT
    second = stored_second(default, ours)
    assert held.requested_at == second
    assert parts.own() == (1, 1990, 0, 0)
    assert parts.ledger.own_cell(second, DEFAULT) == (1, 1990)
    assert default.summary()["totalRequests"] == 1
    assert requests(fallback) == 0


def test_a_full_table_reads_the_queue_again_once_a_slot_is_freed(processors):
    """A table of one slot: each payment waits in the kernel queue until the one before it is
    recorded and its slot freed, which must start the reading again."""
    default, _ = processors
    parts = Parts(default.url, processors[1].url, capacity=1)
    try:
        for _ in range(4):
            parts.queue.send(wire.encode_payment(uuid4().bytes, 1990))
        drive(parts.dispatcher(), lambda: parts.own()[0] == 4)
        assert parts.queue.current_messages == 0
        assert requests(default) == 4
    finally:
        parts.close()


def test_sends_start_no_faster_than_drain_rate_per_s(processors, parts):
    """DRAIN_RATE_PER_S=50: a burst of 5, then one send every 20 ms, so 40 held payments take
    at least 0.7 s to go, although the processor answers at once."""
    default, _ = processors
    for slot in range(40):
        parts.table.write(HeldPayment(slot, uuid4().bytes, 1990, 1_000))
    started = time.monotonic()
    drive(parts.dispatcher(DRAIN_RATE_PER_S="50"), lambda: not parts.held())
    assert time.monotonic() - started >= 0.65
    assert parts.own() == (40, 40 * 1990, 0, 0)
    assert requests(default) == 40


# --- the service-health poll in run() ---------------------------------------------------------


def health_calls(emulator) -> int:
    return emulator.counters()["serviceHealthCalls"]


@pytest.mark.parametrize(("fallback_after_s", "fallback_polled"), [("0", False), ("0.5", True)])
def test_the_polling_instance_polls_the_default_and_the_fallback_only_if_it_may_use_it(
    processors, parts, fallback_after_s, fallback_polled
):
    default, fallback = processors
    dispatcher = parts.dispatcher(HEALTH_POLL="1", FALLBACK_AFTER_S=fallback_after_s)
    drive(dispatcher, lambda: health_calls(default) >= 1
          and (health_calls(fallback) >= 1 or not fallback_polled), timeout=5)
    time.sleep(0.2)
    assert health_calls(default) == 1  # one per HEALTH_INTERVAL_S (5 s)
    assert health_calls(fallback) == (1 if fallback_polled else 0)


def test_an_instance_with_health_poll_0_never_polls(processors, parts):
    default, fallback = processors
    started = time.monotonic()
    drive(parts.dispatcher(HEALTH_POLL="0", FALLBACK_AFTER_S="2"),
          lambda: time.monotonic() - started > 1.0)
    assert (health_calls(default), health_calls(fallback)) == (0, 0)


def test_what_the_poll_reports_reaches_the_router(processors, parts):
    """A failing default, as its service-health says, is held off before any payment fails."""
    default, _ = processors
    default.set_failure(True)
    dispatcher = parts.dispatcher(HEALTH_POLL="1", RETRY_BACKOFF_MIN_S="30",
                                  RETRY_BACKOFF_MAX_S="60")
    drive(dispatcher, lambda: dispatcher._router.circuits[DEFAULT].failing, timeout=5)
    assert not dispatcher._router.circuits[FALLBACK].failing
    assert requests(default) == 0


# --- the recorder's push to the peers -----------------------------------------------------------


def test_a_recorded_payment_is_pushed_to_the_peer_at_once(processors, parts):
    """SYNC_RESEND_S=30: only the push of the loop turn that recorded it can bring the cell
    to the peer within the test."""
    mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        mine.bind(("127.0.0.1", 0))
        peer.bind(("127.0.0.1", 0))
        settings = load({**parts.env, "PEERS": f"127.0.0.1:{peer.getsockname()[1]}",
                         "SYNC_RESEND_S": "30"})
        dispatcher = Dispatcher(settings, parts.queue, parts.table, parts.ledger, mine)
        parts.queue.send(wire.encode_payment(uuid4().bytes, 1990))
        drive(dispatcher, lambda: parts.own()[0] == 1)
        peer.settimeout(2.0)
        kind, _, origin, payload = wire.decode_datagram(peer.recvfrom(2048)[0])
        assert (kind, origin) == (wire.CELLS, settings.instance_name)
        subject, cells = wire.decode_cells(payload)
        assert subject == origin
        [(second, processor, count, cents)] = cells
        assert (processor, count, cents) == (DEFAULT, 1, 1990)
        assert parts.ledger.own_cell(second, DEFAULT) == (1, 1990)
    finally:
        mine.close()
        peer.close()
