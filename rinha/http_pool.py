"""A pool of keep-alive connections to one origin (rinha.transport).

Runs in the dispatcher's loop. At most `limit` connections, idle ones reused LIFO, callers
waiting for a connection served FIFO, one read-deadline sweep per pool instead of a timer per
request.
"""

from __future__ import annotations

import asyncio
import collections

import httpx

from rinha.http_connection import Connection

_READ_BUFFER_BYTES = 65536
_DEADLINE_SLACK_S = 0.001


class Pool:
    """Connections to one origin: at most `limit`, idle ones reused LIFO, waiters served FIFO."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, netloc: bytes,
                 limit: int, connect_timeout_s: float) -> None:
        self.loop = loop
        self._host = host
        self._port = port
        self._limit = limit
        self._connect_timeout_s = connect_timeout_s
        self.host_line = b"Host: %b\r\n" % netloc
        self._idle: list[Connection] = []
        self.read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
        self._sweep: asyncio.TimerHandle | None = None
        # Futures of callers waiting for a connection. Each is resolved with a connection to
        # use, or with None meaning "a slot is yours, open a connection in it".
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._size = 0  # connections open or being opened, idle or busy
        self._all: set[Connection] = set()
        self._closed = False

    def take_idle(self) -> Connection | None:
        """Most recently used live idle connection, if any; stale ones are dropped."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._forget(conn)  # stale keep-alive: nothing was written on it
            self._size -= 1
        return None

    async def acquire(self) -> Connection:
        """Wait for a connection: a free slot opens one, else queue behind earlier callers."""
        if self._closed:
            raise httpx.ConnectError("transport is closed")
        conn = self.take_idle()
        if conn is not None:
            return conn
        if self._size < self._limit and not self._waiters:
            self._size += 1
            return await self._open()

        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    self.release(handed)
            else:
                self._waiters.remove(waiter)
            raise
        if conn is not None and not conn.closed:
            return conn
        if conn is not None:
            self._forget(conn)  # went stale between hand-over and resumption: reuse its slot
        return await self._open()

    def release(self, conn: Connection) -> None:
        """Give back a connection whose last response completed and allows reuse."""
        if conn.closed or self._closed:
            self.discard(conn)
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def discard(self, conn: Connection) -> None:
        """Close a connection that must not be reused and pass its slot on."""
        conn.abort()
        self._forget(conn)
        self._free_slot()

    def watch_deadline(self, deadline: float) -> None:
        """A request went out: make sure a sweep is due by its deadline."""
        if self._sweep is None:
            self._sweep = self.loop.call_at(deadline, self._expire_overdue)

    def _expire_overdue(self) -> None:
        """Fail the requests past their deadline; come back at the earliest one left. With
        steady traffic this runs about once per read timeout, whatever the request rate."""
        self._sweep = None
        # A deadline this close counts as reached: the loop may run a timer a hair early.
        now = self.loop.time() + _DEADLINE_SLACK_S
        next_due: float | None = None
        for conn in list(self._all):  # a failed request discards its connection from _all
            due = conn.deadline
            if due is None:
                continue
            if due <= now:
                conn.on_read_timeout()
            elif next_due is None or due < next_due:
                next_due = due
        if next_due is not None and not self._closed:
            self._sweep = self.loop.call_at(next_due, self._expire_overdue)

    def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("transport is closed"))

    async def _open(self) -> Connection:
        """Open a connection in a slot the caller already holds."""
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self),
                                             self._host, self._port),
                self._connect_timeout_s,
            )
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            self._free_slot()
            raise httpx.ConnectTimeout(
                f"connect to {self._host}:{self._port} timed out") from exc
        except OSError as exc:  # refused, unreachable, DNS failure
            self._free_slot()
            raise httpx.ConnectError(str(exc) or repr(exc)) from exc
        except BaseException:
            self._free_slot()
            raise
        if self._closed:
            conn.abort()
            raise httpx.ConnectError("transport is closed")
        self._all.add(conn)
        return conn

    def _forget(self, conn: Connection) -> None:
        self._all.discard(conn)

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to this waiter; size unchanged
                return
        self._size -= 1
