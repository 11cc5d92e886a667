"""routing: the decision as a table, then each circuit transition."""

from __future__ import annotations

import pytest

from rinha.routing import (
    DEFAULT,
    FALLBACK,
    MAX_PROBES_IN_FLIGHT,
    Circuit,
    admits,
    choose,
    on_failure,
    on_health_report,
    on_sent,
    on_success,
)

NOW = 1000.0
MIN_S = 0.05
MAX_S = 1.0


def healthy() -> Circuit:
    return Circuit()


def backing_off() -> Circuit:
    """Failing, and the next probe is not due yet."""
    return Circuit(failing=True, retry_at=NOW + 0.5, backoff_s=0.5)


def due() -> Circuit:
    """Failing, and the retry moment has passed: one probe may go."""
    return Circuit(failing=True, retry_at=NOW - 0.01, backoff_s=0.5)


def due_now() -> Circuit:
    """Failing, and the retry moment is exactly now."""
    return Circuit(failing=True, retry_at=NOW, backoff_s=0.5)


def probing() -> Circuit:
    """Failing, the retry moment passed, but the most probes allowed are still in flight."""
    return Circuit(failing=True, retry_at=NOW - 1, backoff_s=0.5,
                   probes_in_flight=MAX_PROBES_IN_FLIGHT)


@pytest.mark.parametrize(
    ("default", "fallback", "held_for_s", "fallback_after_s", "expected"),
    [
        # Default first, cheap always (invariant 4).
        (healthy, healthy, 0, 0, DEFAULT),
        (healthy, healthy, 100, 2, DEFAULT),
        (healthy, backing_off, 0, 0, DEFAULT),
        # A failing default: hold, unless the policy says the hold is too long.
        (backing_off, healthy, 0, 0, None),
        (backing_off, healthy, 10_000, 0, None),  # policy 0: never the fallback
        (backing_off, healthy, 1, 2, None),  # held 1 s < 2 s
        (backing_off, healthy, 1.999, 2, None),
        (backing_off, healthy, 2, 2, FALLBACK),  # exactly the policy: long enough
        (backing_off, healthy, 3, 2, FALLBACK),
        (backing_off, backing_off, 3, 2, None),  # the fallback fails too
        (backing_off, probing, 3, 2, None),
        (backing_off, due, 3, 2, FALLBACK),  # the fallback's probe is due
        (probing, healthy, 3, 2, FALLBACK),
        (probing, healthy, 3, 0, None),
        # A failing default whose probe is due gets the payment (the probe).
        (due, healthy, 0, 0, DEFAULT),
        (due_now, healthy, 0, 0, DEFAULT),
        (due, healthy, 3, 2, DEFAULT),
        (probing, backing_off, 0, 0, None),  # probe in flight: not admitted
    ],
)
def test_choose(default, fallback, held_for_s, fallback_after_s, expected) -> None:
    circuits = (default(), fallback())
    assert choose(circuits, NOW, held_for_s, fallback_after_s) == expected


def test_choose_changes_no_circuit() -> None:
    circuits = (due(), backing_off())
    choose(circuits, NOW, 5, 2)
    assert circuits == (due(), backing_off())


@pytest.mark.parametrize(
    ("circuit", "now", "expected"),
    [
        (healthy, NOW, True),
        (backing_off, NOW, False),
        (backing_off, NOW + 0.5, True),  # the retry moment itself admits
        (due, NOW, True),
        (probing, NOW, False),
        (probing, NOW + 100, False),
    ],
)
def test_admits(circuit, now: float, expected: bool) -> None:
    assert admits(circuit(), now) is expected


# --- transitions --------------------------------------------------------------------------


def test_on_sent_to_a_healthy_processor_is_no_probe() -> None:
    circuit = healthy()
    assert on_sent(circuit, NOW) is False
    assert circuit == healthy()


def test_on_sent_to_a_failing_processor_is_a_probe_and_spaces_the_next() -> None:
    circuit = due()
    assert on_sent(circuit, NOW) is True
    assert circuit.probes_in_flight == 1
    assert not admits(circuit, NOW)  # the next probe waits one backoff
    assert admits(circuit, NOW + circuit.backoff_s)


def test_probes_in_flight_are_capped() -> None:
    circuit = due()
    now = NOW
    for _ in range(MAX_PROBES_IN_FLIGHT):
        assert admits(circuit, now)
        on_sent(circuit, now)
        now += circuit.backoff_s
    assert circuit.probes_in_flight == MAX_PROBES_IN_FLIGHT
    assert not admits(circuit, now + 100)
    on_failure(circuit, now, True, MIN_S, MAX_S)  # one probe comes back failed
    assert circuit.probes_in_flight == MAX_PROBES_IN_FLIGHT - 1
    assert admits(circuit, circuit.retry_at)


def test_first_failure_opens_the_circuit_with_the_minimum_backoff() -> None:
    circuit = healthy()
    on_failure(circuit, NOW, False, MIN_S, MAX_S)
    assert circuit == Circuit(failing=True, retry_at=NOW + MIN_S, backoff_s=MIN_S,
                              changed_at=NOW, failures=1)
    assert not admits(circuit, NOW)
    assert admits(circuit, NOW + MIN_S)


def test_non_probe_failures_while_failing_change_nothing() -> None:
    circuit = healthy()
    on_failure(circuit, NOW, False, MIN_S, MAX_S)
    for later in (0.01, 0.02, 0.03):
        on_failure(circuit, NOW + later, False, MIN_S, MAX_S)
    # Only the count of consecutive failures moves: the state changed once, at NOW.
    assert circuit == Circuit(failing=True, retry_at=NOW + MIN_S, backoff_s=MIN_S,
                              changed_at=NOW, failures=4)


def test_a_non_probe_failure_keeps_the_probe_in_flight() -> None:
    circuit = due()
    on_sent(circuit, NOW)
    on_failure(circuit, NOW, False, MIN_S, MAX_S)
    assert circuit.probes_in_flight == 1
    assert circuit.backoff_s == 0.5


def test_a_failed_probe_doubles_the_backoff() -> None:
    circuit = healthy()
    on_failure(circuit, NOW, False, MIN_S, MAX_S)
    now = NOW
    seen = []
    for _ in range(7):
        now = circuit.retry_at
        assert choose((circuit, backing_off()), now, 0, 0) == DEFAULT
        assert on_sent(circuit, now) is True
        on_failure(circuit, now + 0.001, True, MIN_S, MAX_S)
        assert circuit.probes_in_flight == 0
        assert circuit.retry_at == pytest.approx(now + 0.001 + circuit.backoff_s)
        seen.append(circuit.backoff_s)
    assert seen == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])  # capped at the maximum


def test_a_failed_probe_after_a_zero_backoff_waits_at_least_the_minimum() -> None:
    circuit = Circuit(failing=True, retry_at=NOW, backoff_s=0.0, probes_in_flight=1)
    on_failure(circuit, NOW, True, MIN_S, MAX_S)
    assert circuit.backoff_s == MIN_S
    assert circuit.retry_at == NOW + MIN_S


def test_on_success_closes_the_circuit() -> None:
    circuit = probing()
    circuit.failures = 3
    on_success(circuit, NOW + 1)
    assert not circuit.failing
    assert circuit.backoff_s == 0.0
    assert circuit.probes_in_flight == 0
    assert (circuit.failures, circuit.changed_at) == (0, NOW + 1)
    assert admits(circuit, NOW - 100)


def test_after_success_the_next_failure_starts_again_from_the_minimum() -> None:
    circuit = Circuit(failing=True, retry_at=NOW, backoff_s=MAX_S, probes_in_flight=1)
    on_success(circuit, NOW)
    on_failure(circuit, NOW, False, MIN_S, MAX_S)
    assert (circuit.backoff_s, circuit.retry_at) == (MIN_S, NOW + MIN_S)


def test_health_report_of_failing_opens_a_healthy_circuit() -> None:
    circuit = healthy()
    on_health_report(circuit, True, NOW, MIN_S)
    assert circuit == Circuit(failing=True, retry_at=NOW + MIN_S, backoff_s=MIN_S,
                              changed_at=NOW)
    assert not admits(circuit, NOW)


def test_health_report_of_failing_leaves_a_failing_circuit_alone() -> None:
    circuit = backing_off()
    on_health_report(circuit, True, NOW, MIN_S)
    assert circuit == backing_off()


def test_health_report_of_healthy_invites_a_probe_now() -> None:
    circuit = backing_off()
    assert not admits(circuit, NOW)
    on_health_report(circuit, False, NOW, MIN_S)
    assert circuit.failing  # only a live success closes it
    assert circuit.retry_at == NOW
    assert admits(circuit, NOW)


def test_health_report_of_healthy_does_not_exceed_the_probe_cap() -> None:
    circuit = probing()
    on_health_report(circuit, False, NOW, MIN_S)
    assert not admits(circuit, NOW)


def test_health_report_of_healthy_leaves_a_healthy_circuit_alone() -> None:
    circuit = healthy()
    on_health_report(circuit, False, NOW, MIN_S)
    assert circuit == healthy()
