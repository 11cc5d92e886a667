"""Routing: which processor gets the next payment, if any. Pure, no I/O, table-tested.

Used by the router. The fallback charges three times the default's fee (docs/contest.md), so a
payment is held while the default fails and sent when it recovers (docs/architecture.md,
invariant 4);
the fallback is used only when a payment has been held longer than FALLBACK_AFTER_S (0, the
default, never). Live outcomes are the primary signal; the shared health poll only hints.

A failing processor gets probes spaced by an exponential backoff (RETRY_BACKOFF_MIN_S..MAX_S),
so it is not hammered; a few may be in flight at once, because a failing processor may answer
only after a long delay (the contest's 2 s), and one slow probe at a time would notice its
recovery late.
"""

from __future__ import annotations

from dataclasses import dataclass

from rinha.ledger import DEFAULT, FALLBACK

__all__ = ["DEFAULT", "FALLBACK", "MAX_PROBES_IN_FLIGHT", "Circuit", "admits", "choose",
           "on_failure", "on_health_report", "on_sent", "on_success"]

MAX_PROBES_IN_FLIGHT = 4


@dataclass(slots=True)
class Circuit:
    """What the dispatcher believes of one processor."""

    failing: bool = False
    retry_at: float = 0.0  # when failing: the earliest moment for the next probe
    backoff_s: float = 0.0
    probes_in_flight: int = 0
    changed_at: float = 0.0  # when `failing` last changed (for the status page)
    failures: int = 0  # consecutive definite failures and unknown outcomes


def admits(circuit: Circuit, now: float) -> bool:
    """May a payment be sent to this processor now?"""
    if not circuit.failing:
        return True
    return circuit.probes_in_flight < MAX_PROBES_IN_FLIGHT and now >= circuit.retry_at


def choose(
    circuits: tuple[Circuit, Circuit], now: float, held_for_s: float, fallback_after_s: float
) -> int | None:
    """The processor for a payment held for `held_for_s`, or None to keep holding it. (A
    pinned payment has no choice: the router sends it to its processor when that admits it.)"""
    if admits(circuits[DEFAULT], now):
        return DEFAULT
    if 0 < fallback_after_s <= held_for_s and admits(circuits[FALLBACK], now):
        return FALLBACK
    return None


def on_sent(circuit: Circuit, now: float) -> bool:
    """Note a request going out; returns whether it is a probe of a failing processor (the
    next probe then waits one backoff)."""
    if circuit.failing:
        circuit.probes_in_flight += 1
        circuit.retry_at = now + circuit.backoff_s
        return True
    return False


def on_success(circuit: Circuit, now: float) -> None:
    if circuit.failing:
        circuit.changed_at = now
    circuit.failing = False
    circuit.backoff_s = 0.0
    circuit.probes_in_flight = 0
    circuit.failures = 0


def on_failure(
    circuit: Circuit, now: float, was_probe: bool, backoff_min_s: float, backoff_max_s: float
) -> None:
    """A definite failure or an unknown outcome. Only a failed probe doubles the backoff: the
    other requests that were in flight when the processor started failing say nothing new."""
    circuit.failures += 1
    if was_probe:
        circuit.probes_in_flight = max(0, circuit.probes_in_flight - 1)
    if not circuit.failing:
        circuit.failing = True
        circuit.changed_at = now
        circuit.backoff_s = backoff_min_s
        circuit.retry_at = now + backoff_min_s
    elif was_probe:
        circuit.backoff_s = min(max(circuit.backoff_s * 2, backoff_min_s), backoff_max_s)
        circuit.retry_at = max(circuit.retry_at, now + circuit.backoff_s)


def on_health_report(circuit: Circuit, failing: bool, now: float, backoff_min_s: float) -> None:
    """The shared service-health poll: a hint that opens the circuit or invites a probe now."""
    if failing and not circuit.failing:
        circuit.failing = True
        circuit.changed_at = now
        circuit.backoff_s = backoff_min_s
        circuit.retry_at = now + backoff_min_s
    elif not failing and circuit.failing:
        circuit.retry_at = now
