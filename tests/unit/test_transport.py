"""PooledTransport against real HTTP servers started in the test's own event loop."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from rinha.transport import PooledTransport

BODY = b'{"correlationId":"4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3","amount":19.9}'


@dataclass
class Req:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class Server:
    """A keep-alive HTTP/1.1 server; `respond` writes each response and says whether to go on."""

    respond: Callable[[Req, asyncio.StreamWriter], Awaitable[bool]]
    connections: int = 0
    closed: int = 0
    active: int = 0
    max_active: int = 0
    requests: list[Req] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/payments"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        for writer in self.writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = self.connections
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = Req(method, target, headers, body, index)
                self.requests.append(req)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    keep_going = await self.respond(req, writer)
                finally:
                    self.active -= 1
                if not keep_going:
                    break
        finally:
            writer.close()
            self.closed += 1



async def read_body(response: httpx.Response) -> bytes:
    """A transport hands back a stream (AsyncClient reads it); read it as a direct caller must."""
    await response.aread()
    return response.content

def response(body: bytes = b'{"ok":true}', status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b"
            % (status.encode(), len(body), extra, body))


async def answer_ok(req: Req, writer: asyncio.StreamWriter) -> bool:
    writer.write(response(b'{"echo":%d}' % len(req.body)))
    await writer.drain()
    return True


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def idle_connections(transport: PooledTransport) -> list:
    return [conn for pool in transport._pools.values() for conn in pool._idle]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sequential_requests_reuse_one_connection_through_async_client():
    async def main():
        async with Server(answer_ok) as server:
            async with httpx.AsyncClient(transport=PooledTransport()) as client:
                for _ in range(5):
                    resp = await client.post(server.url, content=BODY,
                                             headers={"Content-Type": "application/json"})
                    assert resp.status_code == 200
                    assert resp.json() == {"echo": len(BODY)}
                    assert resp.headers["content-type"] == "application/json"
            assert server.connections == 1
            assert [req.body for req in server.requests] == [BODY] * 5
            first = server.requests[0]
            assert (first.method, first.target) == ("POST", "/payments")
            assert first.headers["host"] == server.url.split("/")[2]
            assert first.headers["content-length"] == str(len(BODY))

    asyncio.run(main())


def test_handle_async_request_called_directly():
    async def main():
        async with Server(answer_ok) as server:
            transport = PooledTransport()
            url = httpx.URL(server.url)
            for _ in range(3):
                request = httpx.Request("POST", url, content=BODY,
                                        headers={"Content-Type": "application/json"})
                resp = await transport.handle_async_request(request)
                await resp.aread()  # a transport returns a stream; AsyncClient would read it
                assert resp.status_code == 200
                assert resp.content == b'{"echo":%d}' % len(BODY)
                assert resp.request is request
            get = await transport.handle_async_request(httpx.Request("GET", server.url))
            assert get.status_code == 200
            await transport.aclose()
            assert server.connections == 1
            assert server.requests[-1].method == "GET"
            assert "content-length" not in server.requests[-1].headers
            await wait_until(lambda: server.closed == 1)  # aclose closed the connection

    asyncio.run(main())


def test_concurrency_is_capped_and_extra_callers_queue_in_order():
    async def slow(req: Req, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.1)
        writer.write(response(req.body))
        await writer.drain()
        return True

    async def main():
        async with Server(slow) as server:
            transport = PooledTransport(max_connections=3)

            async def one(i: int) -> bytes:
                req = httpx.Request("POST", server.url, content=b"%d" % i)
                return await read_body(await transport.handle_async_request(req))

            started = time.monotonic()
            bodies = await asyncio.gather(*(one(i) for i in range(8)))
            elapsed = time.monotonic() - started
            await transport.aclose()
        assert bodies == [b"%d" % i for i in range(8)]
        assert server.connections == 3
        assert server.max_active == 3
        assert elapsed >= 0.29  # three waves of 0.1 s
        served = [int(req.body) for req in server.requests]
        assert sorted(served[:3]) == [0, 1, 2]
        assert sorted(served[3:6]) == [3, 4, 5]  # FIFO: waiters served in arrival order
        assert sorted(served[6:]) == [6, 7]

    asyncio.run(main())


def test_cancelled_waiter_does_not_leak_its_place():
    async def main():
        gate = asyncio.Event()

        async def gated(req: Req, writer: asyncio.StreamWriter) -> bool:
            if req.body == b"first":
                await gate.wait()
            writer.write(response(req.body))
            await writer.drain()
            return True

        async with Server(gated) as server:
            transport = PooledTransport(max_connections=1)

            async def call(body: bytes) -> bytes:
                req = httpx.Request("POST", server.url, content=body)
                return await read_body(await transport.handle_async_request(req))

            first = asyncio.create_task(call(b"first"))
            await wait_until(lambda: len(server.requests) == 1)
            queued = asyncio.create_task(call(b"cancelled"))
            await asyncio.sleep(0.01)
            queued.cancel()
            gate.set()
            assert await first == b"first"
            assert await asyncio.wait_for(call(b"third"), 2) == b"third"
            with pytest.raises(asyncio.CancelledError):
                await queued
            await transport.aclose()
        assert [req.body for req in server.requests] == [b"first", b"third"]
        assert server.connections == 1

    asyncio.run(main())


def test_chunked_response_split_across_segments_then_reuse():
    async def chunked(req: Req, writer: asyncio.StreamWriter) -> bool:
        if req.target.endswith("?plain"):
            return await answer_ok(req, writer)
        pieces = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
            b"Content-Type: text/plain\r\n\r\n5\r\nhel",
            b"lo\r\n7;ext=1\r\n, world\r",
            b"\n0\r\nX-Trailer: yes\r\n",
            b"\r\n",
        ]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    async def main():
        async with Server(chunked) as server:
            async with httpx.AsyncClient(transport=PooledTransport()) as client:
                resp = await client.get(server.url)
                assert resp.status_code == 200
                assert resp.text == "hello, world"
                again = await client.post(server.url + "?plain", content=BODY)
                assert again.status_code == 200
            assert server.connections == 1

    asyncio.run(main())


def test_close_delimited_response_then_new_connection():
    async def until_close(req: Req, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"this until EOF")
        await writer.drain()
        return False  # the server closes: that ends the body

    async def main():
        async with Server(until_close) as server:
            async with httpx.AsyncClient(transport=PooledTransport()) as client:
                for _ in range(2):
                    resp = await client.get(server.url)
                    assert resp.text == "all of this until EOF"
            assert server.connections == 2

    asyncio.run(main())


def test_connection_close_header_is_honoured():
    async def close_after(req: Req, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(extra=b"Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(0.05)  # linger so only the header, not an EOF, says "closed"
        return False

    async def main():
        async with Server(close_after) as server:
            transport = PooledTransport()
            for _ in range(3):
                resp = await transport.handle_async_request(
                    httpx.Request("POST", server.url, content=BODY))
                assert resp.status_code == 200
            assert idle_connections(transport) == []
            await transport.aclose()
            assert server.connections == 3

    asyncio.run(main())


def test_stale_idle_connection_is_replaced_before_writing():
    async def answer_then_idle_close(req: Req, writer: asyncio.StreamWriter) -> bool:
        await answer_ok(req, writer)
        return False  # closes the keep-alive connection right after answering

    async def main():
        async with Server(answer_then_idle_close) as server:
            transport = PooledTransport()
            request = httpx.Request("POST", server.url, content=BODY)
            assert (await transport.handle_async_request(request)).status_code == 200
            await wait_until(lambda: server.closed == 1)
            await wait_until(lambda: all(conn.closed for conn in idle_connections(transport)))
            second = await transport.handle_async_request(
                httpx.Request("POST", server.url, content=BODY))
            assert second.status_code == 200
            await transport.aclose()
        assert server.connections == 2
        assert len(server.requests) == 2

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["truncated-body", "reset", "no-response", "garbage"])
def test_failure_after_writing_raises_and_is_not_resent(mode):
    async def misbehave(req: Req, writer: asyncio.StreamWriter) -> bool:
        if mode == "truncated-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
            await writer.drain()
        elif mode == "reset":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
            await asyncio.sleep(0.02)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "garbage":
            writer.write(b"SPDY/9 what\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        return False

    async def main():
        async with Server(misbehave) as server:
            transport = PooledTransport()
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)) as caught:
                await transport.handle_async_request(
                    httpx.Request("POST", server.url, content=BODY))
            expected = httpx.ReadError if mode == "reset" else httpx.RemoteProtocolError
            assert type(caught.value) is expected
            assert caught.value.request.content == BODY
            assert len(server.requests) == 1  # never silently resent
            assert idle_connections(transport) == []
            await transport.aclose()

    asyncio.run(main())


async def answer_slow_body_late(req: Req, writer: asyncio.StreamWriter) -> bool:
    """Echoes the body; a body of b"slow" gets its answer only after 0.5 s."""
    if req.body == b"slow":
        await asyncio.sleep(0.5)
    writer.write(response(req.body))
    await writer.drain()
    return True


def test_slow_server_read_timeout_closes_the_connection():
    async def main():
        async with Server(answer_slow_body_late) as server:
            transport = PooledTransport(read_timeout_s=0.15)
            async with httpx.AsyncClient(transport=transport) as client:
                with pytest.raises(httpx.ReadTimeout):  # the answer would come at 0.5 s
                    await client.post(server.url, content=b"slow")
                await wait_until(lambda: server.closed == 1)  # the client hung up
                resp = await client.post(server.url, content=b"fast")
                assert resp.content == b"fast"
            assert server.connections == 2

    asyncio.run(main())


def test_read_timeouts_of_overlapping_requests_each_fire_and_only_theirs():
    """One deadline sweep serves every connection: it must come back for a later deadline
    after an earlier request finished, and must not fail a request that answered in time."""
    async def main():
        async with Server(answer_slow_body_late) as server:
            transport = PooledTransport(read_timeout_s=0.2)
            fast = asyncio.ensure_future(transport.handle_async_request(
                httpx.Request("POST", server.url, content=b"fast")))
            await asyncio.sleep(0.1)  # the sweep is due at the fast request's deadline
            slow = asyncio.ensure_future(transport.handle_async_request(
                httpx.Request("POST", server.url, content=b"slow")))
            answered = await fast
            assert answered.status_code == 200  # answered in time: untouched by the sweep
            with pytest.raises(httpx.ReadTimeout):  # its answer would come at 0.5 s
                await slow
            again = await transport.handle_async_request(
                httpx.Request("POST", server.url, content=b"fast"))
            assert again.status_code == 200
            await transport.aclose()

    asyncio.run(main())


def test_refused_port_is_connect_error():
    async def main():
        transport = PooledTransport()
        request = httpx.Request("POST", f"http://127.0.0.1:{free_port()}/payments", content=BODY)
        with pytest.raises(httpx.ConnectError) as caught:
            await transport.handle_async_request(request)
        assert caught.value.request is request
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(str(request.url), content=BODY)

    asyncio.run(main())


def test_unresolvable_host_is_connect_error():
    async def main():
        transport = PooledTransport(connect_timeout_s=2)
        with pytest.raises((httpx.ConnectError, httpx.ConnectTimeout)):
            await transport.handle_async_request(
                httpx.Request("GET", "http://no-such-host.invalid/"))

    asyncio.run(main())


def test_connect_timeout_when_the_listener_never_accepts():
    async def main():
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            # Fill the accept queue; further SYNs are dropped, so connecting hangs.
            fillers = []
            for _ in range(4):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                fillers.append(sock)
            await asyncio.sleep(0.05)
            transport = PooledTransport(connect_timeout_s=0.2)
            try:
                with pytest.raises(httpx.ConnectTimeout):
                    await transport.handle_async_request(
                        httpx.Request("GET", f"http://127.0.0.1:{port}/"))
            finally:
                for sock in fillers:
                    sock.close()

    asyncio.run(main())


def test_head_and_interim_responses():
    async def replies(req: Req, writer: asyncio.StreamWriter) -> bool:
        if req.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"after interim"))
        await writer.drain()
        return True

    async def main():
        async with Server(replies) as server:
            async with httpx.AsyncClient(transport=PooledTransport()) as client:
                head = await client.head(server.url)
                assert head.status_code == 200 and head.content == b""
                post = await client.post(server.url, content=BODY)
                assert post.status_code == 200 and post.content == b"after interim"
            assert server.connections == 1

    asyncio.run(main())


def test_streamed_request_body_is_sent_whole():
    async def main():
        async with Server(answer_ok) as server:
            async def parts():
                yield b'{"a":'
                yield b"1}"

            async with httpx.AsyncClient(transport=PooledTransport()) as client:
                resp = await client.post(server.url, content=parts(),
                                         headers={"Content-Length": "7"})
                assert resp.json() == {"echo": 7}
            assert server.requests[0].body == b'{"a":1}'

    asyncio.run(main())


def test_one_pool_per_origin_with_reused_url_objects():
    async def main():
        async with Server(answer_ok) as first, Server(answer_ok) as second:
            transport = PooledTransport()
            urls = [httpx.URL(first.url), httpx.URL(second.url)]
            for i in range(6):
                request = httpx.Request("POST", urls[i % 2], content=b"x" * i)
                resp = await transport.handle_async_request(request)
                await resp.aread()
                assert resp.json() == {"echo": i}
            await transport.aclose()
        assert [len(req.body) for req in first.requests] == [0, 2, 4]
        assert [len(req.body) for req in second.requests] == [1, 3, 5]
        assert (first.connections, second.connections) == (1, 1)

    asyncio.run(main())


async def start_and_wait(transport: PooledTransport, request: httpx.Request):
    """PooledTransport.start, awaited: its callback's argument (a Response or an exception)."""
    done = asyncio.get_running_loop().create_future()
    transport.start(request, done.set_result)
    return await done


def test_start_calls_back_with_the_response_and_reuses_the_connection():
    async def main():
        async with Server(answer_ok) as server:
            transport = PooledTransport()
            url = httpx.URL(server.url)
            for i in range(4):
                body = b"x" * (i + 1)
                request = httpx.Request("POST", url, stream=httpx.ByteStream(body),
                                        headers={"Content-Length": str(len(body))})
                reply = await start_and_wait(transport, request)
                assert isinstance(reply, httpx.Response)
                assert reply.status_code == 200 and reply.request is request
                await reply.aread()
                assert reply.json() == {"echo": len(body)}
            assert server.connections == 1  # the first call opened it (task path), then reuse
            assert [r.body for r in server.requests] == [b"x", b"xx", b"xxx", b"xxxx"]
            await transport.aclose()

    asyncio.run(main())


def test_start_reports_a_timeout_and_a_refusal_as_their_httpx_errors():
    async def main():
        async with Server(answer_slow_body_late) as server:
            transport = PooledTransport(read_timeout_s=0.15)
            url = httpx.URL(server.url)
            first = await start_and_wait(transport, httpx.Request("POST", url, content=b"fast"))
            assert isinstance(first, httpx.Response)  # an idle connection exists now
            slow_request = httpx.Request("POST", url, content=b"slow")
            timed_out = await start_and_wait(transport, slow_request)
            assert isinstance(timed_out, httpx.ReadTimeout)  # outcome unknown
            await wait_until(lambda: server.closed == 1)  # that connection is not reused
            again = await start_and_wait(transport, httpx.Request("POST", url, content=b"fast"))
            assert isinstance(again, httpx.Response) and server.connections == 2
            await transport.aclose()
        nobody = httpx.Request("POST", f"http://127.0.0.1:{free_port()}/", content=b"x")
        refused = await start_and_wait(PooledTransport(), nobody)
        assert isinstance(refused, httpx.ConnectError)  # never sent

    asyncio.run(main())
