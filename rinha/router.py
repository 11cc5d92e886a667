"""The router: which held payment goes next, to which processor, and when.

Runs in the dispatcher, which asks it for the next send and tells it every outcome. It owns
the dispatcher's in-memory queues (the holding table is the durable copy), the two circuits
(what we believe of each processor, routing.py), the pace of sends (a token bucket) and the
rule of one payment per correlationId in flight. It does no I/O: the dispatcher sends, reads
replies and keeps the time.

Queues:
  waiting    payments free to go to any processor, oldest first;
  pinned[p]  payments whose earlier attempt on processor p has an unknown outcome: they may
             only go there again, with the same requestedAt (docs/architecture.md, invariant 3);
  parked     later payments with the id of one still unsettled (see `admit`).
"""

from __future__ import annotations

from collections import deque

from rinha import routing
from rinha.health import HealthReport
from rinha.holding import HeldPayment
from rinha.routing import DEFAULT, FALLBACK
from rinha.settings import Settings

Circuits = tuple[routing.Circuit, routing.Circuit]


class Router:
    def __init__(self, settings: Settings, now: float) -> None:
        self._fallback_after_s = settings.fallback_after_s
        self._backoff = (settings.retry_backoff_min_s, settings.retry_backoff_max_s)
        self.circuits: Circuits = (routing.Circuit(), routing.Circuit())
        self._waiting: deque[HeldPayment] = deque()
        self._pinned: tuple[deque[HeldPayment], deque[HeldPayment]] = (deque(), deque())
        # One payment per correlationId at a time: ids of payments admitted to the queues above
        # or in flight, and the later payments with one of those ids, parked until the earlier
        # one is settled. Two payments with one id, the same amount and the same requestedAt
        # are indistinguishable in the processor's record (the 422 check, outcomes.py), so the
        # second is never sent while the first's outcome is unknown.
        self._active_ids: set[bytes] = set()
        self._parked: dict[bytes, deque[HeldPayment]] = {}
        # A token bucket on send starts: draining a backlog must not burn the container's CPU
        # quota, or the kernel throttles the workers too and their p99 jumps
        # (docs/measurements.md, the HTTP client's cost).
        self._rate = settings.drain_rate_per_s
        self._burst = max(1.0, self._rate / 10)
        self._tokens = float(self._rate) / 10
        self._tokens_at = now

    # Payments in --------------------------------------------------------------------------

    def admit(self, payment: HeldPayment) -> None:
        """A held payment is ready to be sent, unless an earlier one with its id is unsettled."""
        if payment.correlation_id in self._active_ids:
            self._parked.setdefault(payment.correlation_id, deque()).append(payment)
            return
        self._active_ids.add(payment.correlation_id)
        self._enqueue(payment)

    def settled(self, payment: HeldPayment) -> None:
        """The payment is recorded or refused for good: let the next one with its id go."""
        parked = self._parked.get(payment.correlation_id)
        if parked:
            following = parked.popleft()
            if not parked:
                del self._parked[payment.correlation_id]
            self._enqueue(following)  # its id stays active
        else:
            self._active_ids.discard(payment.correlation_id)

    def retry_later(self, payment: HeldPayment) -> None:
        """Back in line after an attempt that did not settle it (its pin decides where)."""
        if payment.pinned:
            self._pinned[payment.processor].append(payment)
        else:
            # Back to the head: it is the oldest, and a probe should be the oldest payment.
            self._waiting.appendleft(payment)

    def _enqueue(self, payment: HeldPayment) -> None:
        if payment.pinned:
            self._pinned[payment.processor].append(payment)
        else:
            self._waiting.append(payment)

    # Payments out --------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._pinned[DEFAULT] or self._pinned[FALLBACK])

    def take_token(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def return_token(self) -> None:
        self._tokens += 1

    @property
    def token_interval_s(self) -> float:
        return 1.0 / self._rate

    def next_send(self, now: float, wall_ms: int) -> tuple[HeldPayment, int] | None:
        """The payment to send now and its processor, or None while everything must wait."""
        for processor in (DEFAULT, FALLBACK):
            pinned = self._pinned[processor]
            if pinned and routing.admits(self.circuits[processor], now):
                return pinned.popleft(), processor
        if self._waiting:
            head = self._waiting[0]
            processor = routing.choose(self.circuits, now, (wall_ms - head.held_since_ms) / 1000,
                                       self._fallback_after_s)
            if processor is not None:
                return self._waiting.popleft(), processor
        return None

    def next_due(self, now: float, wall_ms: int) -> float | None:
        """When something waiting could go (a probe of a failing processor, a payment reaching
        the fallback's hold time), or None if nothing waits on time."""
        waiting_on = []
        if self._waiting or self._pinned[DEFAULT]:
            waiting_on.append(self.circuits[DEFAULT])
        if self._pinned[FALLBACK] or (self._waiting and self._fallback_after_s):
            waiting_on.append(self.circuits[FALLBACK])
        due = [c.retry_at for c in waiting_on
               if c.failing and c.probes_in_flight < routing.MAX_PROBES_IN_FLIGHT]
        if self._waiting and self._fallback_after_s > 0:
            held_for = (wall_ms - self._waiting[0].held_since_ms) / 1000
            due.append(now + max(0.0, self._fallback_after_s - held_for))
        return min(due) if due else None

    # What the processors say ---------------------------------------------------------------

    def on_sent(self, processor: int, now: float) -> bool:
        """A request goes out; True if it probes a failing processor."""
        return routing.on_sent(self.circuits[processor], now)

    def on_answered(self, processor: int, now: float) -> bool:
        """The processor answered with what it holds (2XX, 422): it is up. True if it had
        been taken for failing."""
        was_failing = self.circuits[processor].failing
        routing.on_success(self.circuits[processor], now)
        return was_failing

    def on_failed(self, processor: int, now: float, was_probe: bool) -> bool:
        """A definite failure or an unknown outcome. True if the processor was taken for
        healthy until now."""
        was_failing = self.circuits[processor].failing
        routing.on_failure(self.circuits[processor], now, was_probe, *self._backoff)
        return not was_failing

    def on_health(self, report: HealthReport, now: float) -> None:
        """The shared service-health poll: a hint (live outcomes stay the primary signal)."""
        routing.on_health_report(self.circuits[report.processor], report.failing, now,
                                 self._backoff[0])

    # For the status page and the tests ------------------------------------------------------

    def circuit_state(self, processor: int) -> tuple[int, float, int]:
        """(state: 0 closed, 1 open, 2 probing; since (monotonic); consecutive failures)."""
        circuit = self.circuits[processor]
        state = 0 if not circuit.failing else 2 if circuit.probes_in_flight else 1
        return state, circuit.changed_at, circuit.failures

    def circuit_states(self, now: float, wall_ms: int) -> list[tuple[int, int, int]]:
        """Each processor's (state, since as unix ms or 0, consecutive failures)."""
        states = []
        for processor in (DEFAULT, FALLBACK):
            state, since, failures = self.circuit_state(processor)
            since_ms = wall_ms - int((now - since) * 1000) if since else 0
            states.append((state, since_ms, failures))
        return states

    def counts(self) -> dict[str, int]:
        return {"waiting": len(self._waiting),
                "pinned": len(self._pinned[DEFAULT]) + len(self._pinned[FALLBACK]),
                "parked": sum(len(q) for q in self._parked.values())}
