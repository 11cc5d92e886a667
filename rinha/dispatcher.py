"""The dispatcher: the queue loop, the processor calls, the ledger writes.

One process per instance, one asyncio loop. It owns the holding table's contents and is the
only writer of the ledger's OWN region. Each payment:
  1. arrives on the POSIX queue from a worker and moves at once into a holding-table slot;
  2. waits there until routing admits a processor (default first; held while it fails);
  3. is sent with requestedAt = the current whole second, the slot marked SENDING first;
  4. on 2XX is recorded in the ledger bucket of exactly that requestedAt, then freed.
An unknown outcome (timeout, reset) pins the payment to the same processor and requestedAt
until a 2XX says it is stored, or a 422 followed by the processor's own record of the payment
proves it is ours (outcomes.py). A restarted dispatcher re-drives whatever the table holds, so
a crash loses nothing and counts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from collections.abc import Callable

import httpx
import posix_ipc

from native_ledger._mqueue import receive_into
from rinha import routing, wire
from rinha.health import HealthPoller, HealthReport
from rinha.heartbeat import BEAT_INTERVAL_S
from rinha.holding import QUEUED, RECORDING, SENDING, HeldPayment, HoldingTable
from rinha.intake import PURGE_CENTS
from rinha.ledger import PROCESSOR_NAMES, Ledger
from rinha.outcomes import (
    CONFIRM,
    DUPLICATE,
    RECORD,
    UNKNOWN,
    classify,
    judge_stored,
)
from rinha.peers import PeerSync
from rinha.settings import Settings
from rinha.transport import PooledTransport

log = logging.getLogger("rinha.dispatcher")

_JSON_HEADER = (b"Content-Type", b"application/json")

# Errors raised before a single byte of the request left: the processor cannot have it.
_NOT_DELIVERED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Dispatcher:
    """Moves payments from the queue through the holding table to the processors."""

    def __init__(
        self,
        settings: Settings,
        queue: posix_ipc.MessageQueue,
        table: HoldingTable,
        ledger: Ledger,
        peer: PeerSync | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._table = table
        self._ledger = ledger
        self._peer = peer
        self._heartbeat = heartbeat
        self._circuits = (routing.Circuit(), routing.Circuit())
        self._waiting: deque[HeldPayment] = deque()  # free to go to any processor
        self._pinned: tuple[deque[HeldPayment], deque[HeldPayment]] = (deque(), deque())
        self._free_slots: list[int] = []
        # One payment per correlationId at a time: ids of payments admitted to the queues above
        # or in flight, and the later payments with one of those ids, parked until the earlier
        # one is settled. Two payments with one id, the same amount and the same requestedAt
        # are indistinguishable in the processor's record (the 422 check, outcomes.py), so the
        # second is never sent while the first's outcome is unknown.
        self._active_ids: set[bytes] = set()
        self._parked: dict[bytes, deque[HeldPayment]] = {}
        self._in_flight = 0
        self._tokens = float(settings.drain_rate_per_s) / 10
        self._tokens_at = time.monotonic()
        self._token_burst = max(1.0, settings.drain_rate_per_s / 10)
        self._wakeup: asyncio.TimerHandle | None = None
        self._reading_queue = False
        self._dirty: set[tuple[int, int]] = set()
        self._stopping = False
        self.crashed = False
        # Parsed once: building an httpx.Request from a string re-parses the URL (~10 us).
        self._urls = tuple(httpx.URL(f"{url}/payments") for url in settings.processor_urls)
        self._host_headers = tuple((b"Host", url.netloc) for url in self._urls)
        self._transport = PooledTransport(
            max_connections=settings.dispatch_concurrency,
            connect_timeout_s=min(2.0, settings.request_timeout_s),
            read_timeout_s=settings.request_timeout_s,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # Lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGTERM, self.stop)
        self._loop.set_exception_handler(self._crash)
        # Non-blocking reads: receive(0) on an empty queue goes through a timed wait that
        # costs ~16 us per drain; a non-blocking read fails in under 1 us.
        self._queue.block = False
        self.recover()
        if self._peer is not None:
            self._peer.start(self._loop)
        self._start_reading_queue()
        self._beat()
        client = httpx.AsyncClient(transport=self._transport, timeout=5.0)
        if self._settings.health_poll:
            watched = [routing.DEFAULT]
            if self._settings.fallback_after_s > 0:
                watched.append(routing.FALLBACK)
            poller = HealthPoller(client, self._settings.processor_urls, watched,
                                  self._settings.health_interval_s, self._on_polled_health)
            self._spawn(poller.run())
        self._drain_queue()
        while not self._stopping:
            await asyncio.sleep(3600)

    def _beat(self) -> None:
        """Tell the supervisor this loop still turns (heartbeat.py)."""
        if self._heartbeat is not None and not self._stopping:
            self._heartbeat()
            assert self._loop is not None
            self._loop.call_later(BEAT_INTERVAL_S, self._beat)

    def stop(self) -> None:
        """SIGTERM: stop taking payments and leave; whatever is held or in flight stays in the
        table for the next dispatcher of this instance."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._loop is not None:
            self._loop.call_soon(self._loop.stop)

    def recover(self) -> None:
        """Rebuild the in-memory queues from the table a previous dispatcher left."""
        staged = self._table.recover_staged(time.time_ns() // 1_000_000,
                                            lambda cents: cents != PURGE_CENTS)
        if staged is not None:
            log.warning("committed a payment a previous dispatcher had received but not kept")
        held = sorted(self._table.held(), key=lambda p: (p.held_since_ms, p.slot))
        used = set()
        for payment in held:
            if payment.state == RECORDING:
                self._finish_recording(payment)  # frees the slot
                continue
            used.add(payment.slot)
            if payment.state == SENDING:
                # Its request may have reached the processor: only the same processor with
                # the same requestedAt can tell us (invariant 3).
                payment.pinned = True
                self._table.set_state(payment, QUEUED)
        # A payment whose outcome is unknown goes first among those sharing its id.
        for payment in sorted((p for p in held if p.state != RECORDING),
                              key=lambda p: not p.pinned):
            self._admit(payment)
        self._free_slots = [s for s in range(self._table.capacity - 1, -1, -1) if s not in used]
        if held:
            log.warning("re-driving %d payments left by a previous dispatcher", len(held))

    # Queue -> holding table -----------------------------------------------------------------

    def _start_reading_queue(self) -> None:
        if not self._reading_queue and not self._stopping:
            assert self._loop is not None
            self._loop.add_reader(self._queue.mqd, self._drain_queue)
            self._reading_queue = True

    def _stop_reading_queue(self) -> None:
        if self._reading_queue:
            assert self._loop is not None
            self._loop.remove_reader(self._queue.mqd)
            self._reading_queue = False

    def _drain_queue(self) -> None:
        """Move every queued record into a slot (the kernel queue is only a short handoff).
        The kernel copies each record straight into its slot (see staging in holding.py), so
        a kill at any instant loses nothing. While payments keep coming, the loop runs this
        once per DISPATCH_BATCH_S for all of them (pacing.py), not once per payment."""
        now_ms = time.time_ns() // 1_000_000
        table, view, mqd = self._table, self._table.view, self._queue.mqd
        while self._free_slots:
            slot = self._free_slots[-1]
            table.stage(slot)
            try:
                size = receive_into(mqd, view, table.record_offset(slot))
            except BlockingIOError:
                table.unstage()
                break
            correlation_id, cents = wire.decode_payment(table.staged_record(slot))
            if cents == PURGE_CENTS or size != wire.PAYMENT_RECORD_SIZE:
                table.stage(slot)  # empties the record again: nothing to keep
                table.unstage()
                if cents == PURGE_CENTS:
                    self._on_purge()
                else:
                    log.error("dropped a %d-byte queue message that is not a payment", size)
                continue
            self._free_slots.pop()
            payment = HeldPayment(slot, correlation_id, cents, now_ms)
            table.write(payment)
            table.unstage()
            self._admit(payment)
        if not self._free_slots:
            # The table is full: leave the rest in the kernel queue; when that fills too the
            # workers answer 503 (an explicit refusal, invariant 1). A freed slot reads again.
            self._stop_reading_queue()
            log.error("holding table full (%d slots): not reading the queue",
                      self._table.capacity)
        self._pump()

    def _on_purge(self) -> None:
        # The worker that took POST /purge-payments purged the ledger itself; the peer must be
        # told, as a purge through nginx reaches one instance only (FINDINGS.md).
        if self._peer is not None:
            self._peer.purged()

    # Holding table -> processors -----------------------------------------------------------

    def _admit(self, payment: HeldPayment) -> None:
        """Queue a held payment for sending, unless an earlier one with its id is unsettled."""
        if payment.correlation_id in self._active_ids:
            self._parked.setdefault(payment.correlation_id, deque()).append(payment)
            return
        self._active_ids.add(payment.correlation_id)
        self._enqueue(payment)

    def _enqueue(self, payment: HeldPayment) -> None:
        if payment.pinned:
            self._pinned[payment.processor].append(payment)
        else:
            self._waiting.append(payment)

    def _pump(self) -> None:
        """Start as many sends as routing, concurrency and the drain pace allow."""
        if self._stopping or not (self._waiting or self._pinned[0] or self._pinned[1]):
            return
        now = time.monotonic()
        wall_ms = time.time_ns() // 1_000_000
        limit = self._settings.dispatch_concurrency
        while self._in_flight < limit:
            if not self._take_token(now):
                self._schedule_wakeup(1.0 / self._settings.drain_rate_per_s)
                return
            picked = self._next_sendable(now, wall_ms)
            if picked is None:
                self._tokens += 1  # unused
                self._schedule_retry(now)
                return
            self._send(*picked)

    def _next_sendable(self, now: float, wall_ms: int) -> tuple[HeldPayment, int] | None:
        for processor in (routing.DEFAULT, routing.FALLBACK):
            pinned = self._pinned[processor]
            if pinned and routing.admits(self._circuits[processor], now):
                return pinned.popleft(), processor
        if self._waiting:
            head = self._waiting[0]
            processor = routing.choose(
                self._circuits, now, (wall_ms - head.held_since_ms) / 1000,
                self._settings.fallback_after_s,
            )
            if processor is not None:
                return self._waiting.popleft(), processor
        return None

    def _take_token(self, now: float) -> bool:
        """A token bucket on send starts: draining a backlog must not burn the container's CPU
        quota, or the kernel throttles the workers too and their p99 jumps (FINDINGS.md)."""
        rate = self._settings.drain_rate_per_s
        self._tokens = min(self._token_burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _schedule_retry(self, now: float) -> None:
        """Something waits for a failing processor: wake when its next probe is due."""
        waiting_on = []
        if self._waiting or self._pinned[routing.DEFAULT]:
            waiting_on.append(self._circuits[routing.DEFAULT])
        if self._pinned[routing.FALLBACK] or (self._waiting and self._settings.fallback_after_s):
            waiting_on.append(self._circuits[routing.FALLBACK])
        due = [c.retry_at for c in waiting_on
               if c.failing and c.probes_in_flight < routing.MAX_PROBES_IN_FLIGHT]
        if self._waiting and self._settings.fallback_after_s > 0:
            held_for = time.time() - self._waiting[0].held_since_ms / 1000
            due.append(now + max(0.0, self._settings.fallback_after_s - held_for))
        if due:
            self._schedule_wakeup(max(0.0, min(due) - now))

    def _schedule_wakeup(self, delay_s: float) -> None:
        assert self._loop is not None
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup = self._loop.call_later(delay_s, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = None
        self._pump()

    def _send(self, payment: HeldPayment, processor: int) -> None:
        if not payment.pinned:
            # A fresh attempt gets the current second; a pinned one keeps the requestedAt the
            # processor may already hold, so a 422 names the bucket we count it in.
            payment.processor = processor
            payment.requested_at = int(time.time())
        payment.attempts += 1
        self._table.set_state(payment, SENDING)
        was_probe = routing.on_sent(self._circuits[processor], time.monotonic())
        self._in_flight += 1
        body = (
            f'{{"correlationId":"{wire.format_uuid(payment.correlation_id)}",'
            f'"amount":{wire.format_cents(payment.cents)},'
            f'"requestedAt":"{wire.format_requested_at(payment.requested_at)}"}}'
        ).encode()
        # stream= with the headers spelled out builds a Request in ~2 us; content= takes ~10.
        headers = (self._host_headers[processor], _JSON_HEADER,
                   (b"Content-Length", b"%d" % len(body)))
        request = httpx.Request("POST", self._urls[processor], stream=httpx.ByteStream(body),
                                headers=headers)
        # A callback, not a Task per payment: fewer loop turns per payment (the CPU budget).
        self._transport.start(
            request, lambda reply: self._on_reply(payment, processor, was_probe, reply))

    def _on_reply(
        self, payment: HeldPayment, processor: int, was_probe: bool, reply: httpx.Response
        | BaseException
    ) -> None:
        self._in_flight -= 1
        if isinstance(reply, httpx.Response):
            status: int | None = reply.status_code
        elif isinstance(reply, _NOT_DELIVERED):
            status = 503  # never left: as definite as a refusal
        elif isinstance(reply, httpx.TransportError):
            status = None
        else:
            raise reply  # not a network outcome: a bug; the loop's handler crashes the process
        self._settle(payment, processor, classify(status, payment.pinned), was_probe)
        self._pump()

    def _settle(self, payment: HeldPayment, processor: int, outcome: str, was_probe: bool) -> None:
        circuit = self._circuits[processor]
        if outcome in (RECORD, DUPLICATE, CONFIRM):
            # It answered with what it holds: it is up, whatever that says of this payment.
            if circuit.failing:
                log.warning("processor %s answers again", PROCESSOR_NAMES[processor])
            routing.on_success(circuit)
            if outcome == RECORD:
                self._record(payment)
            elif outcome == DUPLICATE:
                self._refuse_duplicate(payment)
            else:
                self._confirm(payment)
            return
        if outcome == UNKNOWN:
            payment.pinned = True
        if not circuit.failing:
            log.warning("processor %s failing (%s); holding payments",
                        PROCESSOR_NAMES[processor], outcome)
        routing.on_failure(circuit, time.monotonic(), was_probe,
                           self._settings.retry_backoff_min_s, self._settings.retry_backoff_max_s)
        self._table.set_state(payment, QUEUED)
        if payment.pinned:
            self._pinned[processor].append(payment)
        else:
            # Back to the head: it is the oldest, and a probe should be the oldest payment.
            self._waiting.appendleft(payment)

    def _confirm(self, payment: HeldPayment) -> None:
        """A 422 on a pinned payment: the processor holds a payment with our id. Ask it which
        one (GET /payments/{id}); count ours only if the record is ours. The slot stays
        SENDING meanwhile, so a restarted dispatcher asks again."""
        self._in_flight += 1
        processor = payment.processor
        url = self._urls[processor].copy_with(
            path=f"/payments/{wire.format_uuid(payment.correlation_id)}")
        request = httpx.Request("GET", url, headers=(self._host_headers[processor],))
        self._transport.start(request, lambda reply: self._on_confirmed(payment, reply))

    def _on_confirmed(self, payment: HeldPayment, reply: httpx.Response | BaseException) -> None:
        self._in_flight -= 1
        status, body = None, b""
        if isinstance(reply, httpx.Response):
            status, body = reply.status_code, reply.read()
        elif not isinstance(reply, httpx.TransportError):
            raise reply  # not a network outcome: a bug; the loop's handler crashes the process
        verdict = judge_stored(status, body, payment.correlation_id, payment.cents,
                               payment.requested_at)
        if verdict == RECORD:
            self._record(payment)
        elif verdict == DUPLICATE:
            self._refuse_duplicate(payment)
        else:
            # RESEND (it holds nothing under our id) or UNKNOWN (it did not say): send it again,
            # still pinned, after a pause, so a processor that keeps answering 422 and then
            # nothing cannot make this payment spin.
            log.warning("%s: the %s processor answered 422, then %s to GET; sending again",
                        wire.format_uuid(payment.correlation_id),
                        PROCESSOR_NAMES[payment.processor], status)
            self._table.set_state(payment, QUEUED)
            assert self._loop is not None
            self._loop.call_later(self._settings.retry_backoff_max_s, self._repin, payment)
        self._pump()

    def _repin(self, payment: HeldPayment) -> None:
        if not self._stopping:
            self._pinned[payment.processor].append(payment)
            self._pump()

    def _refuse_duplicate(self, payment: HeldPayment) -> None:
        log.warning("%s: the %s processor holds another payment with this correlationId; "
                    "this one is not counted", wire.format_uuid(payment.correlation_id),
                    PROCESSOR_NAMES[payment.processor])
        self._release(payment)

    def _record(self, payment: HeldPayment) -> None:
        """Count the payment once, crash-safely (see RECORDING in holding.py), then free it."""
        payment.word_before = self._ledger.own_word(payment.requested_at, payment.processor)
        self._table.set_state(payment, RECORDING)
        self._ledger.record(payment.requested_at, payment.processor, payment.cents)
        self._release(payment)
        self._mark_dirty(payment.requested_at, payment.processor)

    def _finish_recording(self, payment: HeldPayment) -> None:
        if self._ledger.own_word(payment.requested_at, payment.processor) == payment.word_before:
            self._ledger.record(payment.requested_at, payment.processor, payment.cents)
        self._table.free(payment.slot)
        self._mark_dirty(payment.requested_at, payment.processor)

    def _release(self, payment: HeldPayment) -> None:
        """The payment is settled: free its slot and let the next one with its id go."""
        self._table.free(payment.slot)
        self._free_slots.append(payment.slot)
        if len(self._free_slots) == 1 and not self._reading_queue:
            self._start_reading_queue()  # the table was full: read the queue again
        parked = self._parked.get(payment.correlation_id)
        if parked:
            following = parked.popleft()
            if not parked:
                del self._parked[payment.correlation_id]
            self._enqueue(following)  # its id stays active
        else:
            self._active_ids.discard(payment.correlation_id)

    def _mark_dirty(self, second: int, processor: int) -> None:
        """Coalesce the cells recorded in this loop turn into one push to the peer."""
        if self._peer is None:
            return
        if not self._dirty and self._loop is not None:
            self._loop.call_soon(self._flush_dirty)
        self._dirty.add((second, processor))

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if self._peer is not None and dirty:
            self._peer.recorded(dirty)

    # Health ------------------------------------------------------------------------------

    def _on_polled_health(self, report: HealthReport) -> None:
        self.on_health_report(report.processor, report.failing, report.min_response_ms)
        if self._peer is not None:
            self._peer.share_health(report.processor, report.failing, report.min_response_ms)

    def on_health_report(self, processor: int, failing: bool, min_response_ms: int) -> None:
        """A service-health report, polled here or shared by the peer that polls."""
        routing.on_health_report(self._circuits[processor], failing, time.monotonic(),
                                 self._settings.retry_backoff_min_s)
        self._pump()

    def _crash(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """An exception escaped a callback: an unexpected state. Stop the process; the
        supervisor restarts it and the new dispatcher re-drives the table (STYLE.md, Errors)."""
        log.error("dispatcher failed: %s", context.get("message"),
                  exc_info=context.get("exception"))
        self._stopping = True
        self.crashed = True
        loop.stop()

    def _spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # An unexpected state: crash the process; the supervisor restarts it and the new
            # dispatcher re-drives the table.
            log.error("dispatcher task failed", exc_info=task.exception())
            self.crashed = True
            if self._loop is not None:
                self._loop.stop()
