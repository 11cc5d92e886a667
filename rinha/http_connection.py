"""One keep-alive HTTP/1.1 client connection, with its response parser (rinha.transport).

Runs in the dispatcher's loop. An asyncio.BufferedProtocol that writes one request at a time
and parses the response into (status, headers, body, keep-alive) from a read buffer its pool
shares between connections (a new 256 KiB bytes object per read cost ~12 us of mmap/munmap
per response). Bodies by Content-Length, chunked, or until EOF; anything else is a
malformed response and closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from rinha.http_pool import Pool

_MAX_HEAD_BYTES = 65536
_HEX_DIGITS = b"0123456789abcdefABCDEF"

# Parser states of a connection.
_IDLE = 0
_HEAD = 1
_BODY_LENGTH = 2
_BODY_CHUNKED = 3
_BODY_UNTIL_EOF = 4

# Sub-states of a chunked body.
_CHUNK_SIZE = 0
_CHUNK_DATA = 1
_CHUNK_DATA_END = 2
_CHUNK_TRAILER = 3


# status, headers, body, keep-alive
RawReply = tuple[int, list[tuple[bytes, bytes]], bytes, bool]


class _MalformedResponse(Exception):
    pass


class Connection(asyncio.BufferedProtocol):
    """One keep-alive TCP connection that carries one request at a time.

    A BufferedProtocol: asyncio reads into the pool's `read_buffer` (shared by its connections,
    as the loop runs one callback at a time). A plain Protocol gets a fresh 256 KiB bytes object
    per read, which glibc maps and unmaps each time: ~12 us of mmap/mremap/munmap per response.
    The read timeout is the pool's too: `deadline` is checked by one sweep per pool, not by a
    timer per request (a TimerHandle, a heap push and a cancel cost ~4 us a request).
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._read_buffer = pool.read_buffer
        # loop.time() by which the response must be complete; None while no request is out.
        self.deadline: float | None = None
        self._transport: asyncio.Transport | None = None
        # True once the peer sent EOF, the socket failed, or we gave the connection up.
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self._on_reply: Callable[[RawReply | httpx.TransportError], None] | None = None
        self._request: httpx.Request | None = None
        self._state = _IDLE
        self._no_body = False
        self._pending = b""
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep_alive = True
        self._remaining = 0
        self._parts: list[bytes] = []
        self._chunk_buf = bytearray()
        self._chunk_state = _CHUNK_SIZE

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def eof_received(self) -> bool:
        self.closed = True
        return False  # let asyncio close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _IDLE:
            return
        if self._state == _BODY_UNTIL_EOF and exc is None:
            self._finish(b"".join(self._parts), b"")
        elif exc is None:
            self._fail(httpx.RemoteProtocolError(
                "server closed the connection before the response was complete",
                request=self._request,
            ))
        else:
            self._fail(httpx.ReadError(str(exc) or repr(exc), request=self._request))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:
            # Bytes nobody asked for: the next response on this connection could not be trusted.
            self.abort()
            return
        try:
            self._feed(data)
        except _MalformedResponse as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}",
                                                 request=self._request))

    # Used by the pool

    def send(self, data: bytes, request: httpx.Request, read_timeout_s: float) -> asyncio.Future:
        """Write one request; the future resolves to (status, headers, body, keep_alive)."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._write(data, request, read_timeout_s)
        return waiter

    def send_then(self, data: bytes, request: httpx.Request, read_timeout_s: float,
                  on_reply: Callable[[RawReply | httpx.TransportError], None]) -> None:
        """Write one request; call `on_reply` with the reply tuple or the error, from inside
        the loop callback that completes it (one loop turn fewer than a future)."""
        self._on_reply = on_reply
        self._write(data, request, read_timeout_s)

    def _write(self, data: bytes, request: httpx.Request, read_timeout_s: float) -> None:
        self._request = request
        self._state = _HEAD
        self._no_body = request.method == "HEAD"
        self.deadline = self._loop.time() + read_timeout_s
        self._pool.watch_deadline(self.deadline)
        self._transport.write(data)  # type: ignore[union-attr]

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # Internals

    def on_read_timeout(self) -> None:
        self._fail(httpx.ReadTimeout("timed out waiting for the response", request=self._request))

    def _fail(self, exc: httpx.TransportError) -> None:
        waiter, on_reply = self._waiter, self._on_reply
        self._reset()
        # A connection whose response went wrong is in an unknown state: never reuse it.
        self.abort()
        if on_reply is not None:
            on_reply(exc)
        elif waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes, leftover: bytes | bytearray) -> None:
        """The last thing a parsing step does: `on_reply` may reuse this connection at once."""
        waiter, on_reply = self._waiter, self._on_reply
        result = (self._status, self._headers, body, self._keep_alive and not leftover)
        self._reset()
        if on_reply is not None:
            on_reply(result)
        elif waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _reset(self) -> None:
        self.deadline = None
        self._waiter = None
        self._on_reply = None
        self._request = None
        self._state = _IDLE
        self._pending = b""
        self._headers = []
        self._parts = []
        if self._chunk_buf:
            self._chunk_buf = bytearray()

    def _feed(self, data: bytes) -> None:
        while self._state == _HEAD:
            buf = self._pending + data if self._pending else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD_BYTES:
                    raise _MalformedResponse("response head too large")
                self._pending = buf
                return
            self._pending = b""
            data = buf[end + 4:]
            self._parse_head(buf[:end])

        state = self._state
        if state == _BODY_LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._parts.append(data)
                self._remaining = remaining - len(data)
                return
            parts = self._parts
            if parts:
                parts.append(data[:remaining])
                body = b"".join(parts)
            else:
                body = data[:remaining]
            self._finish(body, data[remaining:])
        elif state == _BODY_CHUNKED:
            self._feed_chunked(data)
        elif state == _BODY_UNTIL_EOF:
            if data:
                self._parts.append(data)
        elif data:
            # Content arrived after a response that was already complete (e.g. a 204 body).
            self.abort()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise _MalformedResponse(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        keep_alive = version == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1] in b" \t" or name[0] in b" \t":
                raise _MalformedResponse(f"bad header line {line[:80]!r}")
            value = value.strip(b" \t")
            headers.append((name, value))
            lname = name.lower()
            if lname == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise _MalformedResponse("bad Content-Length")
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = value.lower().rstrip().endswith(b"chunked")
                if not chunked:
                    length = None
            elif lname == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True

        if 100 <= status < 200:
            if status == 101:
                raise _MalformedResponse("protocol upgrade is not supported")
            return  # interim response: the final head follows on this connection

        self._status = status
        self._headers = headers
        self._keep_alive = keep_alive
        if self._no_body or status == 204 or status == 304:
            self._state = _BODY_LENGTH
            self._remaining = 0
        elif chunked:
            if length is not None:
                # RFC 9112 6.3: both framings present -> chunked wins, then close.
                self._keep_alive = False
            self._state = _BODY_CHUNKED
            self._chunk_state = _CHUNK_SIZE
        elif length is not None:
            self._state = _BODY_LENGTH
            self._remaining = length
        else:
            self._state = _BODY_UNTIL_EOF
            self._keep_alive = False

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._chunk_buf
        buf += data
        pos = 0
        end = len(buf)
        while True:
            chunk_state = self._chunk_state
            if chunk_state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 4096:
                        raise _MalformedResponse("chunk size line too long")
                    break
                size_field = bytes(buf[pos:eol]).split(b";", 1)[0].strip(b" \t")
                if not size_field or size_field.strip(_HEX_DIGITS):
                    raise _MalformedResponse(f"bad chunk size {size_field[:20]!r}")
                size = int(size_field, 16)
                pos = eol + 2
                if size == 0:
                    self._chunk_state = _CHUNK_TRAILER
                else:
                    self._remaining = size
                    self._chunk_state = _CHUNK_DATA
            elif chunk_state == _CHUNK_DATA:
                take = min(end - pos, self._remaining)
                if take == 0:
                    break
                self._parts.append(bytes(buf[pos:pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._chunk_state = _CHUNK_DATA_END
            elif chunk_state == _CHUNK_DATA_END:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise _MalformedResponse("missing CRLF after chunk data")
                pos += 2
                self._chunk_state = _CHUNK_SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_HEAD_BYTES:
                        raise _MalformedResponse("trailer section too large")
                    break
                blank = eol == pos
                pos = eol + 2
                if blank:
                    leftover = bytes(buf[pos:])
                    self._finish(b"".join(self._parts), leftover)
                    return
        del buf[:pos]
