"""HTTP/1.1 keep-alive transport for httpx, used by the dispatcher process.

The dispatcher forwards every payment to a payment processor through httpx (a product-owner
requirement), but httpx's default transport (httpcore's pool on anyio) is far too expensive for
a budget of 150 us CPU per payment for the whole dispatcher. This module keeps httpx's API
(`httpx.Request` in, `httpx.Response` out) and speaks HTTP/1.1 itself on an asyncio
BufferedProtocol.

`python benchmarks/transports.py --repeat 3` (open loop, 550 req/s, server delay 90 ms so ~50
requests in flight, client pinned to one core; CPU per request, median of 3 runs; the driver
alone costs 84-114 us per request on this VM: each wake-up from idle costs ~20 us and runs
Python on cold caches):
- httpx default: cannot keep up; 100 % of the core, 26-36 req/s served, the backlog grows without
  bound (at 150 req/s it holds on at 2.2 ms per request). sniffio made no measurable difference.
- httpx + httpx-aiohttp: 619 us (net of the driver: 524).
- httpx.AsyncClient(transport=PooledTransport()): 413 us (318).
- PooledTransport.handle_async_request(httpx.Request(...)) with a prebuilt URL and Headers:
  179 us (85), of which ~2 us (hot) is building the httpx.Request and ~2 us the httpx.Response.
  Before reading into a reused buffer and sweeping deadlines per pool: 224 us.

Outcome classes, so the caller can decide what to retry (a POST may or may not have been
applied once its bytes left):
- `httpx.ConnectError` / `httpx.ConnectTimeout`: the request was never sent.
- `httpx.ReadTimeout`, `httpx.ReadError`, `httpx.RemoteProtocolError`: the request was written
  and the outcome is unknown. The connection is closed, never reused, and the request is never
  resent here.
An idle pooled connection the server has already closed (stale keep-alive) is replaced before
anything is written, which is the only case this module retries on its own. A server that
closes an idle connection at the very moment a request is written to it cannot be told apart
from one that failed after receiving it: that is reported as RemoteProtocolError.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from rinha.http_connection import Connection, RawReply
from rinha.http_pool import Pool

__all__ = ["PooledTransport"]


Reply = httpx.Response | BaseException


def _outcome(task: asyncio.Future) -> Reply:
    if task.cancelled():
        return httpx.ReadError("cancelled")
    return task.exception() or task.result()


class PooledTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport: one pool per (scheme, host, port).

    `connect_timeout_s` bounds opening a connection; `read_timeout_s` bounds the whole response
    once the request is written. httpx's own timeout settings (`AsyncClient(timeout=...)`)
    are not consulted: set them here. Only `http` URLs are supported. Request bodies must be
    in memory (`content=`/`json=`); a streamed body is read first and sent as one chunk.
    """

    def __init__(self, max_connections: int = 64, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 5.0) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._pools: dict[tuple[bytes, bytes, int | None], Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            request.content  # noqa: B018 - raises RequestNotRead for a streamed body
        except httpx.RequestNotRead:
            await request.aread()
        pool, data = self._encode(request)
        conn = pool.take_idle()
        if conn is None:
            conn = await self._acquire(pool, request)
        try:
            reply = await conn.send(data, request, self._read_timeout_s)
        except BaseException:
            # Timed out, failed or cancelled mid-response: the connection state is unknown.
            pool.discard(conn)
            raise
        return self._response(pool, conn, request, reply)

    def start(self, request: httpx.Request, on_done: Callable[[Reply], None]) -> None:
        """handle_async_request without a coroutine, for a caller on the hot path.

        Writes the request now when an idle connection is there (else waits for one in a task)
        and calls `on_done(response_or_exception)` from the loop once the reply is in. Saves
        the Task and the loop turns a coroutine costs per request. The body must be in memory
        (`content=`, or `stream=httpx.ByteStream(...)`, which builds a Request 4x faster).
        """
        pool, data = self._encode(request)
        conn = pool.take_idle()
        if conn is None:
            task = asyncio.ensure_future(self.handle_async_request(request))
            task.add_done_callback(lambda done: on_done(_outcome(done)))
            return
        def on_reply(reply: RawReply | httpx.TransportError) -> None:
            if isinstance(reply, BaseException):
                pool.discard(conn)
                on_done(reply)
            else:
                on_done(self._response(pool, conn, request, reply))

        conn.send_then(data, request, self._read_timeout_s, on_reply)

    def _response(self, pool: Pool, conn: Connection, request: httpx.Request,
                  reply: RawReply) -> httpx.Response:
        status, headers, content, keep_alive = reply
        if keep_alive:
            pool.release(conn)
        else:
            pool.discard(conn)
        # A stream, as httpx's transport contract has it: AsyncClient reads it; a direct caller
        # that only needs the status (the dispatcher) skips the read (~9 us a response).
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content),
                              request=request)

    async def _acquire(self, pool: Pool, request: httpx.Request) -> Connection:
        try:
            return await pool.acquire()
        except httpx.TransportError as exc:
            exc.request = request  # AsyncClient sets it too; direct callers need it
            raise

    def _encode(self, request: httpx.Request) -> tuple[Pool, bytes]:
        """The pool for the request's origin and the request's bytes (body in memory)."""
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._new_pool(url, origin)
        # No cache keyed by the URL object: httpx.Request wraps even a reused URL in a new one.
        request_line = b"%b %b HTTP/1.1\r\n" % (request.method.encode("ascii"), url.raw_path)
        stream = request.stream
        if type(stream) is httpx.ByteStream:
            body = b"".join(stream)  # in memory: iterating yields its bytes, no exception path
        else:
            body = request.content  # read by now (handle_async_request awaits aread first)
        parts = [request_line]
        has_host = has_length = chunked = False
        for name, value in request.headers.raw:
            parts += (name, b": ", value, b"\r\n")
            lname = name.lower()
            if lname == b"host":
                has_host = True
            elif lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                chunked = True
        if not has_host:
            parts.append(pool.host_line)
        if chunked:  # a streamed body, read by now: one chunk
            body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        elif body and not has_length:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        parts.append(body)
        return pool, b"".join(parts)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _new_pool(self, url: httpx.URL, origin: tuple[bytes, bytes, int | None]) -> Pool:
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only plain http is supported, not {url.scheme!r}")
        if not url.host:
            raise httpx.UnsupportedProtocol(f"no host in URL {url}")
        pool = Pool(asyncio.get_running_loop(), url.host, url.port or 80, url.netloc,
                     self._max_connections, self._connect_timeout_s)
        self._pools[origin] = pool
        return pool
