"""Payment-processor emulator: a local stand-in for the contest's two payment processors.

Runs in its own process (``python -m rinha_lab.emulator --port P --fee F``, or ``rinha processor``),
one process per emulated processor; the backend never imports it. It owns one listening socket
and, in memory, that processor's payments table, its admin configuration (delay, failure,
token) and its two limiters.

It follows docs/contest.md, "The two payment processors", and the public source of the real
processor (zanfranceschi/rinha-de-backend-2025-payment-processor, ``Endpoints.cs``):

* ``POST /payments`` runs the real filter order: the concurrency limiter (800 in flight, 500
  queued, else 429), then body binding (400), THEN the configured delay, THEN the failure
  switch (500 and nothing stored), then the insert (422 on a duplicate correlationId).
  So a failing processor answers 500 only after its delay, as the contest says.
* ``GET /payments/service-health`` sits behind a fixed-window limiter: one permit per window
  for every caller, up to two callers queued oldest-first (each served when a later window
  opens, one per window), 429 beyond that.
* ``GET /admin/payments-summary`` counts ``requested_at BETWEEN from AND to`` (both ends
  inclusive, microsecond precision like the real TIMESTAMP column), every row when either
  bound is missing, like the real SQL; totalFee is the unrounded decimal product.
* Smaller habits of the real ASP.NET app, kept so a client that only works against this
  emulator also works against the real one: JSON bodies need ``Content-Type:
  application/json`` (415 otherwise), and ``PUT /admin/configurations/token`` answers 204.
* One endpoint the real processor does not have, for tests and benchmarks to see what a backend
  did: ``GET /admin/counters`` (token required), how many POST /payments, GET /payments/{id}
  and service-health calls arrived since start or the last purge.

The HTTP/1.1 server is a small asyncio.Protocol (keep-alive, Content-Length bodies, pipelined
requests answered in order); anything it cannot parse closes the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import functools
import json
import signal
import sys
import traceback
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

# docs/contest.md: at most 800 requests in flight and 500 queued, then 429.
PAYMENTS_IN_FLIGHT_MAX = 800
PAYMENTS_QUEUED_MAX = 500
# docs/contest.md: two more callers wait for the next window, others get 429.
HEALTH_QUEUED_MAX = 2

# Generous bounds: the processors' clients send a few hundred bytes; anything far beyond is
# an attack or a bug, and closing is the cheapest answer that cannot crash us.
HEAD_BYTES_MAX = 16 * 1024
BODY_BYTES_MAX = 1024 * 1024
# Stop reading from a client that pipelines faster than we answer.
PIPELINE_PAUSE_AT = 64

ADMIN_TOKEN_HEADER = "x-rinha-token"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_NAIVE = datetime(1970, 1, 1)
ONE_MICROSECOND = timedelta(microseconds=1)
CENT = Decimal("0.01")

REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


# ---------------------------------------------------------------------------------------------
# Values on the wire


class Reply(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[str, ...] = ()


class Request(NamedTuple):
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class Payment(NamedTuple):
    correlation_id: str
    amount_cents: int
    requested_at_us: int


def message(status: int, text: str) -> Reply:
    return Reply(status, orjson.dumps({"message": text}))


def encode_reply(reply: Reply, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Unknown')}"]
    if reply.status != 204:  # RFC 9110: a 204 carries neither a body nor its length.
        lines.append(f"Content-Type: {reply.content_type}")
        lines.append(f"Content-Length: {len(reply.body)}")
    lines.extend(reply.headers)
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + reply.body if reply.status != 204 else head


PAYMENT_OK = message(200, "payment processed successfully")
PAYMENT_OK_KEEP_ALIVE = encode_reply(PAYMENT_OK, keep_alive=True)


def parse_instant_us(text: str) -> int | None:
    """An ISO-8601 instant as integer microseconds since the epoch, or None if unparseable.

    Microseconds, not milliseconds: the real table is a Postgres TIMESTAMP (microsecond
    precision), so a row at .000500 lies outside a window ending at .000, and must here too.
    A value without an offset is taken as UTC, as the contest only ever sends UTC.
    """
    try:
        instant = datetime.fromisoformat(text)
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=UTC)
        # astimezone raises OverflowError past year 9999 in UTC, the edge of .NET's DateTime.
        return (instant.astimezone(UTC) - EPOCH) // ONE_MICROSECOND
    except (ValueError, TypeError, OverflowError):
        return None


def format_instant(us: int) -> str:
    instant = EPOCH_NAIVE + timedelta(microseconds=us)
    spec = "milliseconds" if us % 1000 == 0 else "microseconds"
    return instant.isoformat(timespec=spec) + "Z"


def format_cents(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole}.{part:02d}"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# Decimal on each number's own text keeps 19.90 exactly 19.90 (no float detour), as the real
# processor's C# decimal does. Built once: json.loads with options builds a decoder per call.
JSON_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def parse_json(body: bytes) -> Any:
    """The body (UTF-8 JSON) with every non-integer number as a Decimal; ValueError if bad."""
    try:
        return JSON_DECODER.decode(body.decode("utf-8"))
    except RecursionError as error:
        raise ValueError("JSON nested too deeply") from error


def parse_payment(body: bytes) -> Payment | str:
    """The payment in a POST /payments body, or the reason it is unacceptable."""
    try:
        document = parse_json(body)
    except ValueError:
        return "body is not valid JSON"
    if not isinstance(document, dict):
        return "body must be a JSON object"
    correlation_id = document.get("correlationId")
    amount = document.get("amount")
    requested_at = document.get("requestedAt")
    if not isinstance(correlation_id, str):
        return "correlationId must be a UUID string"
    try:
        # The real column is a UUID, so any spelling of the same UUID is the same key.
        key = str(uuid.UUID(correlation_id))
    except ValueError:
        return "correlationId must be a UUID string"
    if isinstance(amount, bool) or not isinstance(amount, int | Decimal):
        return "amount must be a JSON number"
    try:
        # docs/contest.md: the amount is stored rounded to cents; Postgres rounds numeric half
        # away from zero, which is Decimal's ROUND_HALF_UP.
        cents = int(Decimal(amount).quantize(CENT, rounding=ROUND_HALF_UP).scaleb(2))
    except (InvalidOperation, ValueError, OverflowError):
        return "amount is out of range"
    if not isinstance(requested_at, str):
        return "requestedAt must be an ISO-8601 string"
    requested_at_us = parse_instant_us(requested_at)
    if requested_at_us is None:
        return "requestedAt must be an ISO-8601 string"
    return Payment(key, cents, requested_at_us)


# ---------------------------------------------------------------------------------------------
# State


class Ledger:
    """The payments table: a dict by correlationId plus two lists sorted by requested_at.

    The sorted lists make a summary two bisects and one sum over a slice, so the contest's
    check (a window every few seconds over ~20,000 rows) costs well under a millisecond.
    Payments arrive nearly in time order, so insort mostly appends.
    """

    def __init__(self) -> None:
        self.rows: dict[str, Payment] = {}
        self.times_us: list[int] = []
        self.cents: list[int] = []

    def insert(self, payment: Payment) -> bool:
        """Store the payment; False if its correlationId is already there (the primary key)."""
        if payment.correlation_id in self.rows:
            return False
        self.rows[payment.correlation_id] = payment
        at = bisect.bisect_right(self.times_us, payment.requested_at_us)
        self.times_us.insert(at, payment.requested_at_us)
        self.cents.insert(at, payment.amount_cents)
        return True

    def get(self, correlation_id: str) -> Payment | None:
        return self.rows.get(correlation_id)

    def summary(self, from_us: int | None, to_us: int | None) -> tuple[int, int]:
        """(count, cents) of rows with from <= requested_at <= to; every row if a bound is None."""
        if from_us is None or to_us is None:
            return len(self.cents), sum(self.cents)
        low = bisect.bisect_left(self.times_us, from_us)
        high = bisect.bisect_right(self.times_us, to_us)
        if high <= low:
            return 0, 0
        return high - low, sum(self.cents[low:high])

    def purge(self) -> None:
        self.rows.clear()
        self.times_us.clear()
        self.cents.clear()


class ConcurrencyLimiter:
    """At most `permits` holders at once and `queue_max` waiters (oldest first); else refuse."""

    def __init__(self, permits: int, queue_max: int) -> None:
        self.permits = permits
        self.queue_max = queue_max
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_acquire(self) -> bool:
        if self.in_use < self.permits and not self.waiters:
            self.in_use += 1
            return True
        return False

    def enqueue(self) -> asyncio.Future[None] | None:
        """A future resolved when a permit passes to this waiter, or None if the queue is full."""
        if len(self.waiters) >= self.queue_max:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    def release(self) -> None:
        # Hand the permit straight to the oldest live waiter so nobody can overtake the queue.
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_use -= 1


class WindowLimiter:
    """A fixed-window rate limiter like .NET's FixedWindowRateLimiter(PermitLimit=1, QueueLimit=2).

    Windows are aligned to the limiter's creation. Each window holds one permit; a caller who
    finds it taken waits (oldest first) for the next window with an unclaimed permit, and
    each window opening serves one waiter. This is the one call per 5 s of docs/contest.md.
    """

    def __init__(self, window_s: float, queue_max: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.window_s = window_s
        self.queue_max = queue_max
        self.origin = self.loop.time()
        self.granted_window = -1
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def _window_at(self, now: float) -> int:
        return int((now - self.origin) // self.window_s)

    def acquire(self) -> bool | asyncio.Future[None]:
        """True if granted now, a future if queued, False if the caller must get a 429."""
        window = self._window_at(self.loop.time())
        if not self.waiters and self.granted_window < window:
            self.granted_window = window
            return True
        if len(self.waiters) >= self.queue_max:
            return False
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        self._arm(max(window, self.granted_window) + 1)
        return waiter

    def _arm(self, window: int) -> None:
        if self.timer is None:
            at = self.origin + window * self.window_s
            # The window index travels with the timer: asyncio may fire a hair early, and
            # recomputing it from the clock could then name the window that just closed.
            self.timer = self.loop.call_at(at, self._open_window, window)

    def _open_window(self, window: int) -> None:
        self.timer = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.granted_window = window
                break
        if self.waiters:
            self._arm(window + 1)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


# ---------------------------------------------------------------------------------------------
# The processor's endpoints


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Processor:
    """One emulated payment processor: its configuration, its ledger, its limiters, its routes."""

    def __init__(self, *, fee: Decimal, token: str, health_window_s: float) -> None:
        self.fee = fee
        self.token = token
        self.delay_ms = 0
        self.failing = False
        self.ledger = Ledger()
        self.payments_limiter = ConcurrencyLimiter(PAYMENTS_IN_FLIGHT_MAX, PAYMENTS_QUEUED_MAX)
        self.health_limiter = WindowLimiter(health_window_s, HEALTH_QUEUED_MAX)
        self.health_retry_after = f"Retry-After: {max(1, round(health_window_s))}"
        self.counters = collections.Counter()  # emulator-only: GET /admin/counters
        self.routes = {
            "/payments": ("POST", self.post_payment),
            "/payments/service-health": ("GET", self.get_service_health),
            "/admin/payments-summary": ("GET", self.get_admin_summary),
            "/admin/configurations/delay": ("PUT", self.put_delay),
            "/admin/configurations/failure": ("PUT", self.put_failure),
            "/admin/configurations/token": ("PUT", self.put_token),
            "/admin/purge-payments": ("POST", self.post_purge),
            "/admin/counters": ("GET", self.get_counters),
        }

    def handle(self, request: Request) -> Reply | Awaitable[Reply]:
        """The answer now, or an awaitable of it (a delay, a queue in a limiter)."""
        route = self.routes.get(request.path)
        if route is None and request.path.startswith("/payments/"):
            route = ("GET", self.get_payment)
        if route is None:
            return message(404, "not found")
        method, handler = route
        if request.method != method:
            allow = (f"Allow: {method}",)
            return Reply(405, orjson.dumps({"message": "method not allowed"}), headers=allow)
        if request.path.startswith("/admin/") and not self._authorized(request):
            return message(401, "missing or wrong X-Rinha-Token")
        return handler(request)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get(ADMIN_TOKEN_HEADER) == self.token

    # -- POST /payments -------------------------------------------------------------------------

    def post_payment(self, request: Request) -> Reply | Awaitable[Reply]:
        self.counters["paymentRequests"] += 1
        if self.payments_limiter.try_acquire():
            return self._pay_holding_permit(request)
        waiter = self.payments_limiter.enqueue()
        if waiter is None:
            return message(429, "too many requests in flight")
        return self._pay_after_queue(waiter, request)

    async def _pay_after_queue(self, waiter: asyncio.Future[None], request: Request) -> Reply:
        await waiter
        outcome = self._pay_holding_permit(request)
        return outcome if isinstance(outcome, Reply) else await outcome

    def _pay_holding_permit(self, request: Request) -> Reply | asyncio.Future[Reply]:
        bound = self._bind(request)
        if isinstance(bound, Reply) or self.delay_ms <= 0:
            try:
                return bound if isinstance(bound, Reply) else self._fail_or_store(bound)
            finally:
                self.payments_limiter.release()
        # The filter order of the real processor: delay first, failure after it. A bare timer
        # and future rather than a task with asyncio.sleep: at 600 payments/s under delay the
        # difference is a good part of the emulator's CPU.
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Reply] = loop.create_future()
        loop.call_later(self.delay_ms / 1000, self._pay_after_delay, bound, answer)
        return answer

    def _pay_after_delay(self, payment: Payment, answer: asyncio.Future[Reply]) -> None:
        try:
            reply = self._fail_or_store(payment)
        finally:
            # Released here, not by whoever awaits the answer: a client that hangs up must
            # not leak a permit.
            self.payments_limiter.release()
        if not answer.done():
            answer.set_result(reply)

    def _bind(self, request: Request) -> Payment | Reply:
        # ASP.NET binds the body before any endpoint filter runs, so a bad body is a 400 that
        # never waits for the delay.
        if not is_json_media_type(request.headers.get("content-type")):
            return message(415, "Content-Type must be application/json")
        payment = parse_payment(request.body)
        if isinstance(payment, str):
            return message(400, payment)
        return payment

    def _fail_or_store(self, payment: Payment) -> Reply:
        if self.failing:
            return message(500, "simulated failure")
        if not self.ledger.insert(payment):
            return message(
                422,
                "Payment could not be processed. CorrelationId already exists: "
                + payment.correlation_id,
            )
        return PAYMENT_OK

    # -- GET /payments/service-health and /payments/{id} ----------------------------------------

    def get_service_health(self, request: Request) -> Reply | Awaitable[Reply]:
        self.counters["serviceHealthCalls"] += 1
        granted = self.health_limiter.acquire()
        if granted is True:
            return self._health_reply()
        if granted is False:
            return Reply(
                429,
                b"Too many service-health calls; one per window. Try again later.",
                "text/plain; charset=utf-8",
                (self.health_retry_after,),
            )
        return self._health_when_granted(granted)

    async def _health_when_granted(self, waiter: asyncio.Future[None]) -> Reply:
        await waiter
        return self._health_reply()

    def _health_reply(self) -> Reply:
        # The state at the moment of answering, as a queued caller of the real one sees.
        body = orjson.dumps({"failing": self.failing, "minResponseTime": self.delay_ms})
        return Reply(200, body)

    def get_payment(self, request: Request) -> Reply:
        self.counters["paymentLookups"] += 1
        try:
            key = str(uuid.UUID(request.path[len("/payments/") :]))
        except ValueError:
            return message(400, "id must be a UUID")
        payment = self.ledger.get(key)
        if payment is None:
            return Reply(404)
        body = (
            f'{{"correlationId":"{payment.correlation_id}",'
            f'"amount":{format_cents(payment.amount_cents)},'
            f'"requestedAt":"{format_instant(payment.requested_at_us)}"}}'
        )
        return Reply(200, body.encode())

    # -- admin ---------------------------------------------------------------------------------

    def get_admin_summary(self, request: Request) -> Reply:
        query = parse_qs(request.query, keep_blank_values=True)
        bounds: list[int | None] = []
        for name in ("from", "to"):
            # An empty or absent bound binds to null in ASP.NET, which selects every row.
            text = query.get(name, [""])[0].strip()
            if not text:
                bounds.append(None)
                continue
            # A literal "+00:00" offset arrives as a space once the query is form-decoded.
            instant = parse_instant_us(text.replace(" ", "+"))
            if instant is None:
                return message(400, f"{name} must be an ISO-8601 instant")
            bounds.append(instant)
        count, cents = self.ledger.summary(bounds[0], bounds[1])
        # The real response multiplies decimals without rounding (19.90 * 0.05 = 0.9950), and
        # so do we; the amount keeps its two decimals. Written by hand so 19.90 stays 19.90.
        total_fee = Decimal(cents).scaleb(-2) * self.fee
        body = (
            f'{{"totalRequests":{count},"totalAmount":{format_cents(cents)},'
            f'"totalFee":{total_fee:f},"feePerTransaction":{self.fee:f}}}'
        )
        return Reply(200, body.encode())

    def _admin_value(self, request: Request, field: str) -> Any:
        """The JSON body's `field`, or a 400 Reply when the body is not an object holding it."""
        if not is_json_media_type(request.headers.get("content-type")):
            return message(415, "Content-Type must be application/json")
        try:
            document = parse_json(request.body)
        except ValueError:
            return message(400, "body is not valid JSON")
        if not isinstance(document, dict) or field not in document:
            return message(400, f'body must be a JSON object with "{field}"')
        return document[field]

    def put_delay(self, request: Request) -> Reply:
        value = self._admin_value(request, "delay")
        if isinstance(value, Reply):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
            return message(400, "delay must be a non-negative integer of milliseconds")
        was, self.delay_ms = self.delay_ms, value
        return Reply(200, orjson.dumps({"config": "delay", "was": was, "is": value}))

    def put_failure(self, request: Request) -> Reply:
        value = self._admin_value(request, "failure")
        if isinstance(value, Reply):
            return value
        if not isinstance(value, bool):
            return message(400, "failure must be a boolean")
        was, self.failing = self.failing, value
        return Reply(200, orjson.dumps({"config": "failure", "was": was, "is": value}))

    def put_token(self, request: Request) -> Reply:
        value = self._admin_value(request, "token")
        if isinstance(value, Reply):
            return value
        if not isinstance(value, str):
            return message(400, "token must be a string")
        self.token = value
        return Reply(204)  # The real endpoint answers Results.NoContent().

    def post_purge(self, request: Request) -> Reply:
        self.ledger.purge()
        self.counters.clear()
        return message(200, "All payments purged.")

    def get_counters(self, request: Request) -> Reply:
        names = ("paymentRequests", "paymentLookups", "serviceHealthCalls")
        return Reply(200, orjson.dumps({name: self.counters[name] for name in names}))


# ---------------------------------------------------------------------------------------------
# HTTP/1.1


class MalformedRequest(Exception):
    """The bytes are not an HTTP/1.x request we accept; the connection gets closed."""


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], int, bool]:
    """(method, path, query, headers, content length, keep-alive) of one request head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise MalformedRequest("bad request line")
    method, target, version = parts
    if not target.startswith(b"/") or not method.isalpha():
        raise MalformedRequest("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise MalformedRequest("bad header line")
        key = name.decode("latin-1").lower()
        if key in headers and key in ("content-length", "transfer-encoding"):
            raise MalformedRequest("repeated framing header")
        headers[key] = value.strip().decode("latin-1")
    if "transfer-encoding" in headers:
        raise MalformedRequest("only Content-Length bodies are supported")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        raise MalformedRequest("bad Content-Length")
    length = int(length_text)
    if length > BODY_BYTES_MAX:
        raise MalformedRequest("body too large")
    connection = headers.get("connection", "").lower()
    if version == b"HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    path, _, query = target.decode("latin-1").partition("?")
    return method.decode("ascii"), path, query, headers, length, keep_alive


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them strictly in arrival order."""

    def __init__(self, processor: Processor, connections: set[HttpConnection]) -> None:
        self.processor = processor
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: tuple[str, str, str, dict[str, str], int, bool] | None = None
        self.pending: collections.deque[Request] = collections.deque()
        self.awaiting: asyncio.Future[Reply] | None = None
        self.reading_paused = False
        self.done = False  # no more requests will be read or answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A running payment is left to finish: a client that gives up does not undo a payment
        # the processor already took, the "unknown outcome" a backend must be ready for.
        self.done = True
        self.pending.clear()
        self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            self._parse_requests()
        except MalformedRequest:
            self.close()
            return
        self._answer_pending()

    def _parse_requests(self) -> None:
        while not self.done:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > HEAD_BYTES_MAX:
                        raise MalformedRequest("head too large")
                    return
                self.head = parse_head(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
            method, path, query, headers, length, keep_alive = self.head
            if len(self.buffer) < length:
                return
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            self.head = None
            self.pending.append(Request(method, path, query, headers, body, keep_alive))
            if not keep_alive:
                self.done = True  # nothing after a "Connection: close" request is answered
        if len(self.pending) >= PIPELINE_PAUSE_AT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _answer_pending(self) -> None:
        while self.pending and self.awaiting is None:
            request = self.pending.popleft()
            try:
                outcome = self.processor.handle(request)
            except Exception:
                outcome = internal_error(request)
            if isinstance(outcome, Reply):
                self._send(outcome, request.keep_alive)
            else:
                self.awaiting = asyncio.ensure_future(outcome)
                self.awaiting.add_done_callback(functools.partial(self._on_answer_ready, request))
        if self.reading_paused and len(self.pending) < PIPELINE_PAUSE_AT // 2:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _on_answer_ready(self, request: Request, answer: asyncio.Future[Reply]) -> None:
        self.awaiting = None
        if answer.cancelled():
            return
        error = answer.exception()
        if error is None:
            reply = answer.result()
        else:
            traceback.print_exception(error, file=sys.stderr)
            reply = internal_error(request, log=False)
        self._send(reply, request.keep_alive)
        self._answer_pending()

    def _send(self, reply: Reply, keep_alive: bool) -> None:
        if self.transport.is_closing():
            return
        if reply is PAYMENT_OK and keep_alive:
            self.transport.write(PAYMENT_OK_KEEP_ALIVE)  # the hot path, encoded once
        else:
            self.transport.write(encode_reply(reply, keep_alive))
        if not keep_alive:
            self.close()

    def close(self) -> None:
        self.done = True
        self.pending.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def internal_error(request: Request, *, log: bool = True) -> Reply:
    """A 500 for a bug in a handler: logged, answered, and the server keeps running."""
    if log:
        traceback.print_exc(file=sys.stderr)
    print(f"emulator: error handling {request.method} {request.path}", file=sys.stderr)
    return message(500, "internal error in the emulator")


# ---------------------------------------------------------------------------------------------
# Process entry points


async def serve(*, host: str, port: int, fee: Decimal, token: str, health_window_s: float) -> None:
    """Listen until SIGTERM or SIGINT, then close the listener and every connection."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    processor = Processor(fee=fee, token=token, health_window_s=health_window_s)
    connections: set[HttpConnection] = set()
    server = await loop.create_server(
        lambda: HttpConnection(processor, connections), host, port, reuse_address=True, backlog=1024
    )
    print(
        f"rinha emulator listening on http://{host}:{port} (fee {fee}, "
        f"health window {health_window_s:g} s)",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(connections):
            connection.close()
        processor.health_limiter.close()
        await server.wait_closed()


def run(
    *,
    host: str = "127.0.0.1",
    port: int,
    fee: float,
    token: str = "123",
    health_window_s: float = 5.0,
) -> None:
    """Run one emulated processor in this process; blocks until SIGTERM or SIGINT."""
    # str() first: Decimal(0.05) would carry the float's binary error into every totalFee.
    fee_decimal = Decimal(str(fee))
    if not fee_decimal.is_finite() or fee_decimal < 0:
        raise ValueError(f"fee must be a non-negative number, got {fee!r}")
    if not health_window_s > 0:
        raise ValueError(f"health_window_s must be positive, got {health_window_s!r}")
    asyncio.run(
        serve(host=host, port=port, fee=fee_decimal, token=token, health_window_s=health_window_s)
    )


def fee_argument(text: str) -> Decimal:
    try:
        fee = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    if not fee.is_finite() or fee < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {text!r}")
    return fee


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rinha processor",
        description="Emulate one Rinha de Backend 2025 payment processor: every endpoint, "
                    "its delay-then-failure order, 422 on duplicates, the health rate limit.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--fee", type=fee_argument, required=True, help="fee per payment, e.g. 0.05"
    )
    parser.add_argument("--token", default="123", help="initial X-Rinha-Token for /admin")
    parser.add_argument(
        "--health-window-s",
        type=float,
        default=5.0,
        help="service-health rate-limit window in seconds (the contest uses 5)",
    )
    args = parser.parse_args(argv)
    try:
        run(
            host=args.host,
            port=args.port,
            fee=args.fee,
            token=args.token,
            health_window_s=args.health_window_s,
        )
    except (ValueError, OSError) as error:
        print(f"rinha emulator: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
