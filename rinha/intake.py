"""The HTTP workers: validate, enqueue, answer; read the ledger for summaries.

Runs in each socketify worker process (WORKERS of them share PORT through SO_REUSEPORT).
Owns nothing but its App: the queue and the ledger belong to the supervisor, which created
them before forking. A worker never calls a processor (docs/architecture.md, invariant 1): a
payment is validated, written to the POSIX queue as a 24-byte record and answered 202 at once.

Handlers are synchronous and the loop is uv_run, not socketify's app.run(): app.run() busy-polls
a core and async handlers crashed under load (docs/measurements.md, socketify). The POST routes,
which read a body, run on uWS's C API through body_route.py, POST /payments in C for the bodies
it is certain about (native_ledger/_intake.c); the GET routes use socketify's app.get.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import posix_ipc

from rinha import wire
from rinha.heartbeat import BEAT_INTERVAL_S
from rinha.metrics import ROUTE_INDEX, ROUTES, WorkerCounters
from rinha.resources import Resources
from rinha.settings import Settings
from rinha.status_page import StatusPage

log = logging.getLogger("rinha.intake")

MAX_BODY_BYTES = 4096

_JSON = b"application/json"

# The 503 of POST /payments, from Python and from the native route alike.
QUEUE_FULL = "queue full, retry later"


class BadRequest(ValueError):
    """The request is invalid; the message goes back to the client as JSON with `status`:
    400 when the body or query cannot be read at all, 422 when a field has a bad value."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def parse_payment(body: bytes) -> tuple[bytes, int]:
    """(16 UUID bytes, cents) of a POST /payments body, or BadRequest naming what is wrong."""
    try:
        # What json.loads(bytes) does, with one decoder built once instead of per call.
        document = _PAYMENT_DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON", 400) from None
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object", 400)
    correlation_id = document.get("correlationId")
    if not isinstance(correlation_id, str):
        raise BadRequest("correlationId must be a UUID string")
    raw_id = wire.parse_uuid(correlation_id)
    if raw_id is None:
        raise BadRequest("correlationId must be a UUID string")
    amount = document.get("amount")
    if not isinstance(amount, Decimal):
        raise BadRequest("amount must be a number")
    cents = wire.parse_cents(str(amount))
    if cents is None:
        raise BadRequest("amount must be positive, at most 1000000.00, with at most 2 decimals")
    return raw_id, cents


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


# Decimal for every number: the amount is money and must never pass through a float.
_PAYMENT_DECODER = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal,
                                    parse_constant=_reject_constant)


def summary_json(totals: tuple[int, int, int, int]) -> bytes:
    """The contest's summary shape, amounts printed with two decimals."""
    default_count, default_cents, fallback_count, fallback_cents = totals
    return (
        f'{{"default":{{"totalRequests":{default_count},'
        f'"totalAmount":{wire.format_cents(default_cents)}}},'
        f'"fallback":{{"totalRequests":{fallback_count},'
        f'"totalAmount":{wire.format_cents(fallback_cents)}}}}}'
    ).encode()


def summary_window(from_text: str | None, to_text: str | None) -> tuple[int | None, int | None]:
    """The ledger seconds for ?from=&to=, or BadRequest if either is not an ISO instant."""
    return wire.window_seconds(_instant("from", from_text), _instant("to", to_text))


def _instant(name: str, text: str | None) -> wire.Instant | None:
    if not text:
        return None  # missing or empty: that side of the window is open
    instant = wire.parse_instant(text)
    if instant is None:
        raise BadRequest(
            f"{name} must be an ISO-8601 instant, e.g. 2025-07-10T12:34:56.000Z or "
            "2025-07-10T09:34:56.000-03:00", 400)
    return instant


class Intake:
    """One worker's HTTP face. Built in the child after fork (a socketify App made before fork
    aborted a child: docs/measurements.md)."""

    def __init__(self, settings: Settings, resources: Resources, slot: int) -> None:
        self._settings = settings
        self._queue = resources.queue
        self._ledger = resources.ledger
        # Called about once a second from the loop (heartbeat.py).
        self._heartbeat = lambda: resources.heartbeats.beat(slot)
        self._counters = WorkerCounters(resources.metrics, slot)
        self._status = StatusPage(settings, resources)
        self._routes: list[Any] = []  # the BodyRoutes: alive as long as the app serves

    def serve(self) -> None:
        """Listen and run uv's blocking loop until the process is killed."""
        from socketify import App

        from rinha.body_route import BodyRoute, NativePaymentRoute
        from rinha.listening import listen

        app = App()
        # The two POST routes read a body: on uWS's C API (body_route.py), not app.post.
        # POST /payments in C (native_ledger/_intake.c) for the bodies it is certain about;
        # every other body reaches _accept_payment, whose answer stands.
        self._routes = [
            NativePaymentRoute(app, "/payments", self._accept_payment, self._queue.mqd,
                               MAX_BODY_BYTES, _error_json(QUEUE_FULL),
                               shared_counts=self._counters.payments_row()),
            BodyRoute(app, "/purge-payments", self._purge, MAX_BODY_BYTES,
                      header=b"x-rinha-token"),
        ]
        app.get("/payments-summary", self._get_summary)
        app.get("/health", self._get_health)
        app.get("/status", self._get_status)
        app.get("/metrics", self._get_metrics)
        for path in ("/payments", "/payments-summary", "/purge-payments", "/health", "/status",
                     "/metrics"):
            app.any(path, self._method_not_allowed)
        app.any("/*", self._not_found)
        if not listen(app, self._settings.host, self._settings.port):
            raise OSError(f"cannot listen on {self._settings.host}:{self._settings.port}")
        heartbeat = self._heartbeat
        heartbeat()
        interval_ms = int(BEAT_INTERVAL_S * 1000)
        beat_timer = app.loop.uv_loop.create_timer(interval_ms, interval_ms,
                                                   lambda _: heartbeat(), None)
        app.loop.uv_loop.run()
        del beat_timer  # alive as long as the loop runs

    # POST /payments ----------------------------------------------------------------------

    def _accept_payment(self, body: bytes, _header: bytes | None) -> tuple[int, bytes]:
        """A body the C route left to Python (the C route counts its own answers)."""
        status, payload = accept_payment(self._queue, body)
        self._counters.count(_PAYMENTS, status)
        return status, payload

    # GET /payments-summary ---------------------------------------------------------------

    def _get_summary(self, res: Any, req: Any) -> None:
        try:
            first, last = summary_window(req.get_query("from"), req.get_query("to"))
        except BadRequest as exc:
            self._reply(res, _SUMMARY, exc.status, _error_json(str(exc)))
            return
        self._reply(res, _SUMMARY, 200, summary_json(self._ledger.summary(first, last)))

    # The operator's pages (status_page.py) ------------------------------------------------

    def _get_health(self, res: Any, req: Any) -> None:
        if self._no_query(res, req, _HEALTH):
            self._reply(res, _HEALTH, *self._status.health())

    def _get_status(self, res: Any, req: Any) -> None:
        if self._no_query(res, req, _STATUS):
            self._reply(res, _STATUS, 200, self._status.status())

    def _get_metrics(self, res: Any, req: Any) -> None:
        if self._no_query(res, req, _METRICS):
            self._counters.count(_METRICS, 200)  # counted before: the scrape sees itself
            res.write_status(200).write_header(b"Content-Type", _PROMETHEUS).end(
                self._status.prometheus())

    def _no_query(self, res: Any, req: Any, route: int) -> bool:
        """The operator's pages take no parameters: a query string is a mistake to report."""
        if "?" not in req.get_full_url():
            return True
        self._reply(res, route, 400, _error_json("this endpoint takes no query parameters"))
        return False

    def _not_found(self, res: Any, req: Any) -> None:
        self._reply(res, _OTHER, 404, _error_json("no such endpoint"))

    def _method_not_allowed(self, res: Any, req: Any) -> None:
        self._reply(res, _OTHER, 405, _error_json("method not allowed"))

    def _reply(self, res: Any, route: int, status: int, body: bytes) -> None:
        self._counters.count(route, status)
        res.write_status(status).write_header(b"Content-Type", _JSON).end(body)

    # POST /purge-payments ----------------------------------------------------------------

    def _purge(self, body: bytes, token: bytes | None) -> tuple[int, bytes]:
        status, payload = self._purge_answer(token)
        self._counters.count(_PURGE, status)
        return status, payload

    def _purge_answer(self, token: bytes | None) -> tuple[int, bytes]:
        expected = self._settings.admin_token
        if expected is not None and token != expected.encode():
            return 401, _error_json("X-Rinha-Token required")
        self._ledger.purge()
        try:
            self._queue.send(wire.encode_control(wire.CONTROL_PURGED), timeout=0)
        except posix_ipc.BusyError:
            return 503, _error_json("queue full, the peer was not told; retry")
        return 200, b'{"message":"purged"}'


def accept_payment(queue: posix_ipc.MessageQueue, body: bytes) -> tuple[int, bytes]:
    """POST /payments in Python: (status, JSON body or b"") for a body, queued if valid."""
    try:
        raw_id, cents = parse_payment(body)
    except BadRequest as exc:
        return exc.status, _error_json(str(exc))
    try:
        queue.send(wire.encode_payment(raw_id, cents), timeout=0)
    except posix_ipc.BusyError:
        # An explicit refusal, never a silent drop (invariant 1).
        return 503, _error_json(QUEUE_FULL)
    return 202, b""


def _error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


_PAYMENTS, _SUMMARY, _PURGE, _HEALTH, _STATUS, _METRICS, _OTHER = (
    ROUTE_INDEX[route] for route in ROUTES)
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
