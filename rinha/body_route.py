"""POST routes that read a body, on uWebSockets' C API (through socketify's cffi bindings).

Why not socketify's `app.post`: for every request it builds an AppResponse and an AppRequest
(each with a cffi handle), asks `inspect` whether the handler is a coroutine function, and for
every body chunk looks its handler up again; and the response object, referenced only by a cffi
handle to itself, can be collected mid-request unless the handler pins it (docs/measurements.md,
socketify). Here the route is one object, reached from three module-level callbacks through the
user-data handle, and a request in progress is a list of chunks under its `uws_res_t` address.
Measured with benchmarks/budgets.py (3 alternating rounds, POST /payments): worker CPU per
request 112-142 us with socketify's wrapper, 100-121 us here; server-side p99 0.60-0.93 ms, here
0.40-0.57 ms.

uWebSockets' rules kept here: a handler that returns without responding registers an abort
handler (uWS terminates the process otherwise); a response is ended exactly once, at its last
body chunk, so no callback can reach a response that has ended. A body over `max_body` bytes
is read to its end and discarded, then answered 413 with the connection closed.

POST /payments itself is a NativePaymentRoute: the same route in C (native_ledger/_intake.c),
which queues and answers the bodies it is certain about without Python and hands every other
body to the same `complete` function, whose answer stands. Measured with benchmarks/budgets.py
(550 req/s, 0.5 CPU, 2026-11-29, three sets of 3-4 interleaved before/after runs, each beside
nginx answering 202 itself on the same CPU; machine load 2-6 from other test suites): worker
CPU per request 1.64-1.77x nginx's with the Python route (median 74-81 us), 0.96-1.07x with
the native one (45-53 us); server-side p50 1.7-2x nginx's before, 1.0-1.1x after. Per request
the worker makes four system calls (epoll_wait, recvfrom, mq_timedsend, sendto), nginx three.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from socketify.native import ffi, lib, library_path

from native_ledger._intake import PaymentRoute
from rinha.metrics import STATUS_INDEX

log = logging.getLogger("rinha.body_route")

# What a route does with a whole body and the value of the header it asked for (None if the
# request had none): (HTTP status, JSON body or b"" for none).
Complete = Callable[[bytes, bytes | None], tuple[int, bytes]]

_JSON = b"application/json"
_NO_ENTRY = object()


class BodyRoute:
    """POST `pattern` on `app`: collects each request's body, calls `complete` once with it,
    answers what `complete` returns. Keep the object alive as long as the app serves."""

    def __init__(self, app: Any, pattern: str, complete: Complete, max_body: int,
                 header: bytes | None = None) -> None:
        self.ssl = app.SSL
        self._complete = complete
        self._max_body = max_body
        self.header = header.lower() if header is not None else None
        # Requests whose body is still arriving: address -> [header value, chunk, ...], or
        # None while a too-large body is being discarded.
        self._arriving: dict[int, list[Any] | None] = {}
        self.handle = ffi.new_handle(self)  # the callbacks' user data: lives as long as self
        lib.uws_app_post(app.SSL, app.app, pattern.encode(), _on_request, self.handle)

    def on_request(self, res: Any, header_value: bytes | None) -> None:
        if header_value is not None:
            self._arriving[_address(res)] = [header_value]

    def on_chunk(self, res: Any, data: bytes, is_last: bool) -> None:
        key = _address(res)
        parts = self._arriving.get(key, _NO_ENTRY)
        if not is_last:
            if parts is _NO_ENTRY:
                self._arriving[key] = [None, data]
            elif parts is not None:
                parts.append(data)
                if sum(len(part) for part in parts[1:]) > self._max_body:
                    self._arriving[key] = None  # discard the rest, answer at the end
            return
        if parts is not _NO_ENTRY:
            del self._arriving[key]
        if parts is _NO_ENTRY:
            header_value, body = None, data  # the usual case: the whole body in one chunk
        elif parts is None:
            self._reply(res, 413, _error(f"body over {self._max_body} bytes"), close=True)
            return
        else:
            header_value, body = parts[0], b"".join(parts[1:]) + data
        if len(body) > self._max_body:
            self._reply(res, 413, _error(f"body over {self._max_body} bytes"), close=True)
            return
        status, payload = answer(self._complete, body, header_value)
        self._reply(res, status, payload)

    def on_aborted(self, res: Any) -> None:
        self._arriving.pop(_address(res), None)

    def in_progress(self) -> int:
        """Requests whose body is still arriving (for tests: aborted ones must not stay)."""
        return len(self._arriving)

    def _reply(self, res: Any, status: int, payload: bytes, close: bool = False) -> None:
        lib.socketify_res_write_int_status(self.ssl, res, status)
        if payload:
            lib.uws_res_write_header(self.ssl, res, b"Content-Type", 12, _JSON, len(_JSON))
        # uws_res_end with an empty body still sends Content-Length: 0, which nginx's
        # keep-alive upstreams need (docs/measurements.md).
        lib.uws_res_end(self.ssl, res, payload, len(payload), close)


class NativePaymentRoute:
    """POST `pattern` on `app` in C (native_ledger._intake.PaymentRoute): a body it is certain
    about is queued on the queue descriptor `mqd` as wire.PAYMENT_RECORD and answered 202 (503
    with `queue_full` when the queue is full) without Python; a body over `max_body` is read to
    its end and answered 413 with the connection closed, as BodyRoute does; any other body goes
    to `complete(body, None)`, whose answer stands. Lives as long as the process (uWS cannot
    remove a route)."""

    def __init__(self, app: Any, pattern: str, complete: Complete, mqd: int, max_body: int,
                 queue_full: bytes, shared_counts: memoryview | None = None) -> None:
        """`shared_counts`: the worker's counters of this route, indexed like
        rinha.metrics.STATUSES, where the C route adds the answers it gives itself."""
        self._complete = complete
        counters = {}
        if shared_counts is not None:
            counters = {"shared_counts": shared_counts,
                        "accepted_index": STATUS_INDEX[202], "full_index": STATUS_INDEX[503],
                        "too_large_index": STATUS_INDEX[413]}
        self.route = PaymentRoute(library_path, _address(app.app), bool(app.SSL), pattern, mqd,
                                  self._on_body, max_body,
                                  _error(f"body over {max_body} bytes"), queue_full, **counters)

    def _on_body(self, body: bytes) -> tuple[int, bytes]:
        return answer(self._complete, body, None)

    def counts(self) -> dict[str, int]:
        """accepted/full/too_large (answered in C), deferred (by `complete`), aborted,
        in_progress (see PaymentRoute.counts)."""
        return self.route.counts()


def answer(complete: Complete, body: bytes, header_value: bytes | None) -> tuple[int, bytes]:
    """`complete`'s answer, or 500: a bug must neither kill the worker nor leave the client
    hanging."""
    try:
        return complete(body, header_value)
    except Exception:
        log.exception("POST handler failed")
        return 500, _error("internal error")


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _address(res: Any) -> int:
    return int(ffi.cast("uintptr_t", res))


@ffi.callback("void(uws_res_t*, uws_req_t*, void*)")
def _on_request(res: Any, req: Any, user_data: Any) -> None:
    route: BodyRoute = ffi.from_handle(user_data)
    header_value = None
    if route.header is not None:
        # The request object is valid only inside this callback: copy the header now.
        dest = ffi.new("char **")
        length = lib.uws_req_get_header(req, route.header, len(route.header), dest)
        header_value = ffi.unpack(dest[0], length) if length else b""
    route.on_request(res, header_value)
    lib.uws_res_on_aborted(route.ssl, res, _on_aborted, user_data)
    lib.uws_res_on_data(route.ssl, res, _on_data, user_data)


@ffi.callback("void(uws_res_t*, const char*, size_t, bool, void*)")
def _on_data(res: Any, chunk: Any, length: int, is_last: bool, user_data: Any) -> None:
    route: BodyRoute = ffi.from_handle(user_data)
    route.on_chunk(res, ffi.unpack(chunk, length) if length else b"", is_last)


@ffi.callback("void(uws_res_t*, void*)")
def _on_aborted(res: Any, user_data: Any) -> None:
    ffi.from_handle(user_data).on_aborted(res)
