"""router: pinned payments, one payment per id, the pace of sends, and when to wake."""

from __future__ import annotations

from uuid import uuid4

import pytest

from rinha.health import HealthReport
from rinha.holding import HeldPayment
from rinha.router import Router
from rinha.routing import DEFAULT, FALLBACK, MAX_PROBES_IN_FLIGHT, Circuit
from rinha.settings import load

NOW = 1000.0
WALL_MS = 1_752_150_896_000


def router(**env: str) -> Router:
    return Router(load({"DRAIN_RATE_PER_S": "1000000", **env}), NOW)


def payment(slot: int, held_since_ms: int = WALL_MS, correlation_id: bytes | None = None,
            **fields: object) -> HeldPayment:
    return HeldPayment(slot, correlation_id or uuid4().bytes, 1990, held_since_ms,
                       **fields)  # type: ignore[arg-type]


def healthy() -> Circuit:
    return Circuit()


def backing_off() -> Circuit:
    return Circuit(failing=True, retry_at=NOW + 0.5, backoff_s=0.5)


def due() -> Circuit:
    return Circuit(failing=True, retry_at=NOW - 0.01, backoff_s=0.5)


def backing_off_long() -> Circuit:
    return Circuit(failing=True, retry_at=NOW + 5, backoff_s=5)


def probing() -> Circuit:
    return Circuit(failing=True, retry_at=NOW - 1, backoff_s=0.5,
                   probes_in_flight=MAX_PROBES_IN_FLIGHT)


@pytest.mark.parametrize(
    ("pinned_to", "default", "fallback", "fallback_after_s", "expected"),
    [
        # Pinned: only the processor of the earlier attempt, whatever the policy (invariant 3).
        (DEFAULT, healthy, healthy, "0", DEFAULT),
        (FALLBACK, healthy, healthy, "0", FALLBACK),
        (FALLBACK, healthy, backing_off, "0", None),
        (FALLBACK, healthy, probing, "0", None),
        (FALLBACK, healthy, due, "0", FALLBACK),
        (DEFAULT, backing_off, healthy, "2", None),  # never moves to the fallback
        (FALLBACK, backing_off, healthy, "0", FALLBACK),
        (DEFAULT, due, healthy, "0", DEFAULT),
        (DEFAULT, probing, healthy, "2", None),
    ],
)
def test_a_pinned_payment_goes_only_to_its_processor(pinned_to, default, fallback,
                                                     fallback_after_s, expected) -> None:
    r = router(FALLBACK_AFTER_S=fallback_after_s)
    r.circuits = (default(), fallback())
    pinned = payment(1, WALL_MS - 100_000, pinned=True, processor=pinned_to)
    r.admit(pinned)
    picked = r.next_send(NOW, WALL_MS)
    assert (None if picked is None else picked[1]) == expected
    if picked is not None:
        assert picked[0] is pinned


def test_pinned_payments_go_before_waiting_ones_and_the_oldest_waiting_first() -> None:
    r = router()
    old, new = payment(1, WALL_MS - 5000), payment(2, WALL_MS)
    pinned = payment(3, WALL_MS, pinned=True, processor=DEFAULT)
    for p in (old, new, pinned):
        r.admit(p)
    assert [r.next_send(NOW, WALL_MS)[0] for _ in range(3)] == [pinned, old, new]
    assert r.next_send(NOW, WALL_MS) is None


def test_a_second_payment_with_one_id_waits_until_the_first_is_settled() -> None:
    r = router()
    same = uuid4().bytes
    first, second, third = (payment(i, correlation_id=same) for i in (1, 2, 3))
    other = payment(4)
    for p in (first, second, third, other):
        r.admit(p)
    assert r.counts() == {"waiting": 2, "pinned": 0, "parked": 2}
    assert [r.next_send(NOW, WALL_MS)[0] for _ in range(2)] == [first, other]
    assert r.next_send(NOW, WALL_MS) is None
    r.retry_later(first)  # not settled: the others still wait
    assert r.next_send(NOW, WALL_MS)[0] is first
    r.settled(first)
    assert r.next_send(NOW, WALL_MS)[0] is second
    assert r.next_send(NOW, WALL_MS) is None
    r.settled(second)
    assert r.next_send(NOW, WALL_MS)[0] is third
    r.settled(third)
    r.admit(payment(5, correlation_id=same))  # the id is free again
    assert r.counts()["waiting"] == 1


def test_a_failed_attempt_goes_back_to_the_head_a_pinned_one_to_its_processor() -> None:
    r = router()
    a, b = payment(1, WALL_MS - 10), payment(2)
    r.admit(a)
    r.admit(b)
    taken = r.next_send(NOW, WALL_MS)[0]
    r.retry_later(taken)
    assert r.next_send(NOW, WALL_MS)[0] is a
    a.pinned, a.processor = True, FALLBACK
    r.retry_later(a)
    r.circuits[FALLBACK].failing, r.circuits[FALLBACK].retry_at = True, NOW + 1
    assert r.next_send(NOW, WALL_MS)[0] is b  # a waits for its own processor
    assert r.next_send(NOW, WALL_MS) is None
    assert r.next_send(NOW + 1, WALL_MS)[0] is a


def test_the_token_bucket_paces_send_starts() -> None:
    r = router(DRAIN_RATE_PER_S="100")  # bursts of 10, one more every 10 ms
    started = sum(r.take_token(NOW) for _ in range(50))
    assert started == 10
    assert not r.take_token(NOW + 0.005)
    assert r.take_token(NOW + 0.0101)
    assert sum(r.take_token(NOW + 10) for _ in range(50)) == 10  # the burst caps the saving
    r.return_token()
    assert r.take_token(NOW + 10)
    assert r.token_interval_s == 0.01


@pytest.mark.parametrize(
    ("default", "fallback", "fallback_after_s", "held_ms", "due_in"),
    [
        (healthy, healthy, "0", 0, None),  # nothing waits on time
        (backing_off, healthy, "0", 0, 0.5),  # the default's next probe
        (probing, healthy, "0", 0, None),  # probes out: their replies will wake us
        (backing_off, healthy, "2", 500, 0.5),  # the probe comes before the hold time
        (backing_off_long, healthy, "2", 500, 1.5),  # the hold time comes first
        (backing_off_long, healthy, "2", 3000, 0),  # already due
    ],
)
def test_next_due(default, fallback, fallback_after_s, held_ms, due_in) -> None:
    r = router(FALLBACK_AFTER_S=fallback_after_s)
    r.circuits = (default(), fallback())
    r.admit(payment(1, WALL_MS - held_ms))
    due_at = r.next_due(NOW, WALL_MS)
    assert (None if due_at is None else round(due_at - NOW, 6)) == due_in


def test_outcomes_and_health_move_the_circuits() -> None:
    r = router(RETRY_BACKOFF_MIN_S="0.1", RETRY_BACKOFF_MAX_S="1")
    assert r.on_failed(DEFAULT, NOW, was_probe=False) is True  # healthy until now
    assert r.on_failed(DEFAULT, NOW, was_probe=False) is False
    assert r.circuits[DEFAULT].retry_at == NOW + 0.1
    r.on_health(HealthReport(DEFAULT, False, 0), NOW + 0.01)  # recovered: probe at once
    assert r.circuits[DEFAULT].retry_at == NOW + 0.01
    assert r.on_answered(DEFAULT, NOW) is True
    assert not r.circuits[DEFAULT].failing
    r.on_health(HealthReport(FALLBACK, True, 0), NOW)
    assert r.circuits[FALLBACK].failing and r.on_answered(FALLBACK, NOW) is True


# --- what the status page shows of the circuits -------------------------------------------------


def test_circuit_states_give_each_processor_s_state_since_in_unix_ms_and_failures() -> None:
    r = router(RETRY_BACKOFF_MIN_S="0.5")
    assert r.circuit_states(NOW, WALL_MS) == [(0, 0, 0), (0, 0, 0)]  # never changed
    r.on_failed(FALLBACK, NOW + 1.0, False)
    r.on_failed(FALLBACK, NOW + 1.2, False)
    # 2.5 s after the fallback opened, at wall time WALL_MS: it opened at WALL_MS - 2500.
    assert r.circuit_states(NOW + 3.5, WALL_MS) == [(0, 0, 0), (1, WALL_MS - 2500, 2)]
    r.on_sent(FALLBACK, NOW + 4.0)  # a probe goes out
    assert r.circuit_states(NOW + 4.25, WALL_MS)[FALLBACK] == (2, WALL_MS - 3250, 2)
    r.on_answered(FALLBACK, NOW + 5.0)  # closed again, 1.5 s before the next look
    assert r.circuit_states(NOW + 6.5, WALL_MS) == [(0, 0, 0), (0, WALL_MS - 1500, 0)]
