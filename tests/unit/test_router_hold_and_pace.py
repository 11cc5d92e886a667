"""router: the hold time of the oldest waiting payment, the token bucket at low rates, what the
health poll and the status page see (found by mutation testing, tests/mutation)."""

from __future__ import annotations

import pytest

from rinha.health import HealthReport
from rinha.routing import DEFAULT, FALLBACK, Circuit, on_failure, on_success
from tests.unit.test_router import NOW, WALL_MS, backing_off, backing_off_long, payment, router


@pytest.mark.parametrize(
    ("held_ms", "fallback_after_s", "expected"),
    [(1999, "2", None), (2000, "2", FALLBACK), (2500, "2.4", FALLBACK), (2300, "2.4", None),
     (600, "0.5", FALLBACK), (400, "0.5", None)],
)
def test_a_waiting_payment_goes_to_the_fallback_once_held_long_enough(held_ms,
                                                                     fallback_after_s, expected):
    r = router(FALLBACK_AFTER_S=fallback_after_s)
    r.circuits = (backing_off_long(), Circuit())
    r.admit(payment(1, WALL_MS - held_ms))
    picked = r.next_send(NOW, WALL_MS)
    assert (None if picked is None else picked[1]) == expected


def test_the_hold_time_is_the_oldest_waiting_payment_s():
    r = router(FALLBACK_AFTER_S="2")
    r.circuits = (backing_off_long(), Circuit())
    old, new = payment(1, WALL_MS - 1500), payment(2, WALL_MS)
    r.admit(old)
    r.admit(new)
    assert r.next_due(NOW, WALL_MS) == pytest.approx(NOW + 0.5)  # old reaches 2 s first
    assert r.next_send(NOW, WALL_MS + 500) == (old, FALLBACK)


def test_a_failing_fallback_wakes_nobody_while_nothing_may_go_there():
    r = router(FALLBACK_AFTER_S="0")
    soon = Circuit(failing=True, retry_at=NOW + 0.1, backoff_s=0.1)
    r.circuits = (backing_off(), soon)
    r.admit(payment(1))
    assert r.next_due(NOW, WALL_MS) == pytest.approx(NOW + 0.5)  # the default's probe only


@pytest.mark.parametrize(
    ("rate", "takes", "expected"),
    [
        # 5/s: a burst of 1 (never less), half a token to start with.
        ("5", [0, 0.1, 0.1, 10, 10], [False, True, False, True, False]),
        # 15/s: a burst of 1.5 tokens.
        ("15", [10, 10 + 0.034, 10 + 0.034], [True, True, False]),
    ],
)
def test_the_token_bucket_at_low_rates(rate, takes, expected):
    r = router(DRAIN_RATE_PER_S=rate)
    assert [r.take_token(NOW + t) for t in takes] == expected


def test_a_failing_health_report_opens_the_circuit_with_the_shortest_backoff():
    r = router(RETRY_BACKOFF_MIN_S="0.1", RETRY_BACKOFF_MAX_S="1")
    r.on_health(HealthReport(FALLBACK, True, 0), NOW)
    assert r.circuits[FALLBACK].retry_at == pytest.approx(NOW + 0.1)


def test_counts_add_up_the_pinned_payments_of_both_processors():
    r = router()
    for slot in range(3):
        r.admit(payment(slot, pinned=True, processor=DEFAULT))
    r.admit(payment(3, pinned=True, processor=FALLBACK))
    assert r.counts() == {"waiting": 0, "pinned": 4, "parked": 0}


def test_circuit_state_for_the_status_page():
    r = router(RETRY_BACKOFF_MIN_S="0.1", RETRY_BACKOFF_MAX_S="1")
    assert r.circuit_state(DEFAULT) == (0, 0.0, 0)  # closed
    r.on_failed(DEFAULT, NOW, was_probe=False)
    assert r.circuit_state(DEFAULT) == (1, NOW, 1)  # open
    r.on_sent(DEFAULT, NOW + 0.2)
    assert r.circuit_state(DEFAULT)[0] == 2  # probing


def test_a_payment_pinned_to_a_failing_fallback_wakes_the_router_for_its_probe():
    r = router(FALLBACK_AFTER_S="0")
    r.circuits = (Circuit(), backing_off())
    r.admit(payment(1, pinned=True, processor=FALLBACK))
    assert r.next_send(NOW, WALL_MS) is None
    assert r.next_due(NOW, WALL_MS) == pytest.approx(NOW + 0.5)


def test_a_hold_time_under_a_second_wakes_the_router_on_time():
    r = router(FALLBACK_AFTER_S="0.5")
    r.circuits = (backing_off_long(), Circuit())
    r.admit(payment(1, WALL_MS - 200))
    assert r.next_due(NOW, WALL_MS) == pytest.approx(NOW + 0.3)


def test_a_probe_failing_after_a_success_reset_the_count_leaves_no_negative_count():
    """A success closes the circuit and forgets the probes in flight; one of them failing
    later must not leave room for an extra probe."""
    circuit = Circuit(failing=True, retry_at=NOW, backoff_s=0.1, probes_in_flight=1)
    on_success(circuit, NOW)
    on_failure(circuit, NOW + 0.01, True, 0.1, 1.0)
    assert circuit.probes_in_flight == 0


def test_a_returned_token_is_one_token():
    r = router(DRAIN_RATE_PER_S="100")  # a burst of 10, one more every 10 ms
    assert sum(r.take_token(NOW) for _ in range(20)) == 10
    assert r.take_token(NOW + 0.0101)  # the one token earned since
    r.return_token()  # nothing to send after all
    assert [r.take_token(NOW + 0.0101) for _ in range(2)] == [True, False]


@pytest.mark.parametrize("held", ["waiting", "pinned to the default", "pinned to the fallback",
                                  "nothing"])
def test_has_work_with_any_one_queue_holding_a_payment(held):
    r = router()
    if held == "waiting":
        r.admit(payment(1))
    elif held != "nothing":
        r.admit(payment(1, pinned=True, processor=DEFAULT if "default" in held else FALLBACK))
    assert r.has_work is (held != "nothing")
