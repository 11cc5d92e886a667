"""The dispatcher: the loop that takes payments from the queue to the processors.

One process per instance, one asyncio loop. Each payment:
  1. arrives on the POSIX queue from a worker and moves at once into a holding-table slot
     (holding.py: the table does its own staging, so a kill at any instant loses nothing);
  2. waits there until the router admits a processor (router.py: default first, held while
     it fails, paced, one payment per correlationId at a time);
  3. is sent here with requestedAt = the current whole second, the slot marked SENDING first;
  4. is settled by what the processor answers (outcomes.py): on 2XX the recorder counts it in
     the ledger bucket of exactly that requestedAt (recorder.py), then its slot is freed.
An unknown outcome (timeout, reset) pins the payment to the same processor and requestedAt
until a 2XX says it is stored, or a 422 followed by the processor's own record of the payment
proves it is ours. A restarted dispatcher re-drives whatever the table holds, so a crash loses
nothing and counts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable

import posix_ipc

from rinha import wire
from rinha.health import HealthPoller, HealthReport
from rinha.heartbeat import BEAT_INTERVAL_S
from rinha.holding import QUEUED, RECORDING, SENDING, HeldPayment, HoldingTable
from rinha.ledger import PROCESSOR_NAMES, Ledger
from rinha.metrics import DispatcherCounters
from rinha.mirror import open_carrier
from rinha.outcomes import CONFIRM, DUPLICATE, RECORD, UNKNOWN, classify, judge_stored
from rinha.recorder import Recorder
from rinha.router import Router
from rinha.sender import Sender
from rinha.settings import Settings

log = logging.getLogger("rinha.dispatcher")


class Dispatcher:
    """Moves payments from the queue through the holding table to the processors."""

    def __init__(
        self,
        settings: Settings,
        queue: posix_ipc.MessageQueue,
        table: HoldingTable,
        ledger: Ledger,
        sync_socket: socket.socket | None = None,
        heartbeat: Callable[[], None] | None = None,
        counters: DispatcherCounters | None = None,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._table = table
        self._heartbeat = heartbeat
        self._counters = counters
        self._peer = open_carrier(settings, ledger, sync_socket, self._on_health, counters)
        self._router = Router(settings, time.monotonic())
        self._recorder = Recorder(table, ledger, self._peer, counters)
        self._sender = Sender(settings, counters)
        self._wakeup: asyncio.TimerHandle | None = None
        self._reading_queue = False
        self._stopping = False
        self.crashed = False
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
        self._recorder.start(self._loop)
        self.recover()
        if self._peer is not None:
            self._peer.start(self._loop)
        self._start_reading_queue()
        self._beat()
        poller = HealthPoller.configured(self._settings, self._sender.transport,
                                         self._on_polled_health)
        if poller is not None:
            self._spawn(poller.run())
        self._drain_queue()
        while not self._stopping:
            await asyncio.sleep(3600)

    def stop(self) -> None:
        """SIGTERM: stop taking payments and leave; whatever is held or in flight stays in the
        table for the next dispatcher of this instance."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._loop is not None:
            self._loop.call_soon(self._loop.stop)

    def recover(self) -> None:
        """Take the table over and rebuild the router's queues from what it holds."""
        held, committed = self._table.claim(time.time_ns() // 1_000_000)
        if committed:
            log.warning("committed a payment a previous dispatcher had received but not kept")
        waiting = []
        for payment in held:
            if payment.state == RECORDING:
                self._recorder.finish(payment)  # frees the slot
                continue
            if payment.state == SENDING:
                # Its request may have reached the processor: only the same processor with
                # the same requestedAt can tell us (invariant 3).
                payment.pinned = True
                self._table.mark(payment, QUEUED)
            waiting.append(payment)
        # A payment whose outcome is unknown goes first among those sharing its id.
        for payment in sorted(waiting, key=lambda p: not p.pinned):
            self._router.admit(payment)
        if held:
            log.warning("re-driving %d payments left by a previous dispatcher", len(held))

    def _beat(self) -> None:
        """Tell the supervisor this loop still turns (heartbeat.py), and the status page what
        the router holds (once a second: these gauges need not be fresher)."""
        if self._stopping:
            return
        if self._heartbeat is not None:
            self._heartbeat()
        if self._counters is not None:
            self._counters.router_state(self._sender.in_flight, self._router.counts(),
                                        self._router.circuit_states(time.monotonic(),
                                                                    time.time_ns() // 1_000_000))
        assert self._loop is not None
        self._loop.call_later(BEAT_INTERVAL_S, self._beat)

    # Queue -> holding table -----------------------------------------------------------------

    def _start_reading_queue(self) -> None:
        if not self._reading_queue and not self._stopping:
            assert self._loop is not None
            self._loop.add_reader(self._queue.mqd, self._drain_queue)
            self._reading_queue = True

    def _drain_queue(self) -> None:
        """Move every queued record into a slot (the kernel queue is only a short handoff).
        While payments keep coming, the loop runs this once per DISPATCH_BATCH_S for all of
        them (pacing.py), not once per payment."""
        now_ms = time.time_ns() // 1_000_000
        table, mqd = self._table, self._queue.mqd
        while not table.full:
            received = table.receive(mqd, now_ms)
            if received is None:
                break
            if isinstance(received, HeldPayment):
                self._router.admit(received)
            else:
                self._on_control(received)
        if table.full and self._reading_queue:
            # Leave the rest in the kernel queue; when that fills too the workers answer 503
            # (an explicit refusal, invariant 1). A freed slot reads again (_settled).
            assert self._loop is not None
            self._loop.remove_reader(mqd)
            self._reading_queue = False
            log.error("holding table full (%d slots): not reading the queue", table.capacity)
        self._pump()

    def _on_control(self, record: bytes) -> None:
        if wire.decode_control(record) == wire.CONTROL_PURGED:
            # The worker that took POST /purge-payments purged the ledger itself; the other
            # instances must be told, as a purge through nginx reaches one instance only.
            if self._peer is not None:
                self._peer.purged()
        else:
            log.error("dropped a %d-byte queue record that is neither a payment nor a control "
                      "record", len(record))

    # Holding table -> processors -----------------------------------------------------------

    def _pump(self) -> None:
        """Start as many sends as routing, concurrency and the drain pace allow."""
        router = self._router
        if self._stopping or not router.has_work:
            return
        now = time.monotonic()
        wall_ms = time.time_ns() // 1_000_000
        limit = self._settings.dispatch_concurrency
        while self._sender.in_flight < limit:
            if not router.take_token(now):
                self._schedule_wakeup(router.token_interval_s)
                return
            picked = router.next_send(now, wall_ms)
            if picked is None:
                router.return_token()
                due = router.next_due(now, wall_ms)
                if due is not None:
                    self._schedule_wakeup(max(0.0, due - now))
                return
            self._send(*picked)

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
            # processor may already hold, so its record can be recognised as ours.
            payment.processor = processor
            payment.requested_at = int(time.time())
        self._table.mark(payment, SENDING)
        was_probe = self._router.on_sent(processor, time.monotonic())
        self._sender.send(payment, processor,
                          lambda status: self._on_reply(payment, processor, was_probe, status))

    def _on_reply(self, payment: HeldPayment, processor: int, was_probe: bool,
                  status: int | None) -> None:
        outcome = classify(status, payment.pinned)
        if outcome in (RECORD, DUPLICATE, CONFIRM):
            # It answered with what it holds: it is up, whatever that says of this payment.
            if self._router.on_answered(processor, time.monotonic()):
                log.warning("processor %s answers again", PROCESSOR_NAMES[processor],
                            extra={"processor": PROCESSOR_NAMES[processor]})
            if outcome == CONFIRM:
                # A 422 on a pinned payment: it holds a payment with our id. Ask which one;
                # the slot stays SENDING meanwhile, so a restarted dispatcher asks again.
                self._sender.fetch_stored(
                    payment, lambda status, body: self._on_stored(payment, status, body))
            else:
                self._settle(payment, outcome)
        else:
            if outcome == UNKNOWN:
                payment.pinned = True
            if self._router.on_failed(processor, time.monotonic(), was_probe):
                log.warning("processor %s failing (%s); holding payments",
                            PROCESSOR_NAMES[processor], outcome,
                            extra={"processor": PROCESSOR_NAMES[processor], "outcome": outcome})
            self._table.mark(payment, QUEUED)
            self._router.retry_later(payment)
        self._pump()

    def _on_stored(self, payment: HeldPayment, status: int | None, body: bytes) -> None:
        """What the processor holds under our id: count ours only if the record is ours."""
        verdict = judge_stored(status, body, payment.correlation_id, payment.cents,
                               payment.requested_at)
        if verdict in (RECORD, DUPLICATE):
            self._settle(payment, verdict)
        else:
            # RESEND (it holds nothing under our id) or UNKNOWN (it did not say): send it again,
            # still pinned, after a pause, so a processor that keeps answering 422 and then
            # nothing cannot make this payment spin.
            log.warning("%s: the %s processor answered 422, then %s to GET; sending again",
                        wire.format_uuid(payment.correlation_id),
                        PROCESSOR_NAMES[payment.processor], status, extra=_about(payment))
            self._table.mark(payment, QUEUED)
            assert self._loop is not None
            self._loop.call_later(self._settings.retry_backoff_max_s, self._retry, payment)
        self._pump()

    def _retry(self, payment: HeldPayment) -> None:
        if not self._stopping:
            self._router.retry_later(payment)
            self._pump()

    def _settle(self, payment: HeldPayment, outcome: str) -> None:
        """Record it (RECORD) or refuse it (DUPLICATE: the processor holds another payment
        with this id), free its slot, and let the next payment with its id go."""
        if outcome == RECORD:
            table_was_full = self._recorder.record(payment)
        else:
            log.warning("%s: the %s processor holds another payment with this correlationId; "
                        "this one is not counted", wire.format_uuid(payment.correlation_id),
                        PROCESSOR_NAMES[payment.processor], extra=_about(payment))
            table_was_full = self._table.release(payment)
            if self._counters is not None:
                self._counters.duplicate(payment.processor)
        self._router.settled(payment)
        if table_was_full:
            self._start_reading_queue()

    # Health --------------------------------------------------------------------------------

    def _on_polled_health(self, report: HealthReport) -> None:
        self._on_health(report)
        if self._peer is not None:
            self._peer.share_health(report)

    def _on_health(self, report: HealthReport) -> None:
        """A service-health report, polled here or shared by the instance that polls."""
        self._router.on_health(report, time.monotonic())
        if self._counters is not None:
            self._counters.health(report.processor, report.failing, report.min_response_ms)
        self._pump()

    # Failures ------------------------------------------------------------------------------

    def _crash(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """An exception escaped a callback: an unexpected state. Stop the process; the
        supervisor restarts it and the new dispatcher re-drives the table."""
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
            log.error("dispatcher task failed", exc_info=task.exception())
            self.crashed = True
            if self._loop is not None:
                self._loop.stop()


def _about(payment: HeldPayment) -> dict[str, object]:
    """The fields a log line about one payment carries (LOG_FORMAT=json)."""
    return {"correlationId": wire.format_uuid(payment.correlation_id),
            "processor": PROCESSOR_NAMES[payment.processor], "cents": payment.cents}
