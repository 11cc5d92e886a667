"""The sender: a payment's HTTP requests to the processors, and what came back.

Runs in the dispatcher. It owns the HTTP client (rinha.transport.PooledTransport, called without
httpx's AsyncClient and without a Task per request: the CPU budget per payment), the parsed
processor URLs, and the count of requests in flight. It turns each reply into a status for
outcomes.py: the HTTP status, 503 for a request that never left (a refused or timed-out
connection: as definite as a refusal), None for no answer after it left (unknown outcome).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from rinha import wire
from rinha.holding import HeldPayment
from rinha.metrics import REPLY_CLASSES, DispatcherCounters
from rinha.settings import Settings
from rinha.transport import PooledTransport

_JSON_HEADER = (b"Content-Type", b"application/json")

# Errors raised before a single byte of the request left: the processor cannot have it.
_NOT_DELIVERED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_CLASS = {name: i for i, name in enumerate(REPLY_CLASSES)}
_STATUS_CLASS = {422: _CLASS["422"], 500: _CLASS["500"], 429: _CLASS["429"]}


class Sender:
    def __init__(self, settings: Settings, counters: DispatcherCounters | None = None) -> None:
        self._counters = counters
        # Parsed once: building an httpx.Request from a string re-parses the URL (~10 us).
        self._urls = tuple(httpx.URL(f"{url}/payments") for url in settings.processor_urls)
        self._host_headers = tuple((b"Host", url.netloc) for url in self._urls)
        self.transport = PooledTransport(
            max_connections=settings.dispatch_concurrency,
            connect_timeout_s=min(2.0, settings.request_timeout_s),
            read_timeout_s=settings.request_timeout_s,
        )
        self.in_flight = 0

    def send(self, payment: HeldPayment, processor: int,
             on_status: Callable[[int | None], None]) -> None:
        """POST the payment (its requestedAt already chosen) and call `on_status` with what came
        back."""
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
        self.in_flight += 1
        sent_at = time.monotonic()

        def on_reply(reply: httpx.Response | BaseException) -> None:
            self.in_flight -= 1
            if isinstance(reply, httpx.Response):
                status: int | None = reply.status_code
                reply_class = (_CLASS["2xx"] if 200 <= status < 300
                               else _STATUS_CLASS.get(status, _CLASS["other_status"]))
            elif isinstance(reply, _NOT_DELIVERED):
                status, reply_class = 503, _CLASS["refused"]  # never left: a refusal
            elif isinstance(reply, httpx.TransportError):
                status = None
                reply_class = _CLASS["timeout" if isinstance(reply, httpx.TimeoutException)
                                     else "reset"]
            else:
                raise reply  # not a network outcome: a bug; the loop's handler crashes it
            if self._counters is not None:
                self._counters.reply(processor, reply_class, time.monotonic() - sent_at)
            on_status(status)

        self.transport.start(request, on_reply)

    def fetch_stored(self, payment: HeldPayment,
                     on_answer: Callable[[int | None, bytes], None]) -> None:
        """GET /payments/{id} on the payment's processor: `on_answer(status, body)`, status None
        if it did not answer."""
        processor = payment.processor
        url = self._urls[processor].copy_with(
            path=f"/payments/{wire.format_uuid(payment.correlation_id)}")
        request = httpx.Request("GET", url, headers=(self._host_headers[processor],))
        self.in_flight += 1

        def on_reply(reply: httpx.Response | BaseException) -> None:
            self.in_flight -= 1
            if isinstance(reply, httpx.Response):
                on_answer(reply.status_code, reply.read())
            elif isinstance(reply, httpx.TransportError):
                on_answer(None, b"")
            else:
                raise reply

        self.transport.start(request, on_reply)
