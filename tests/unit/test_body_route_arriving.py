"""body_route.BodyRoute's bookkeeping of requests whose body is still arriving (`_arriving`):
every request leaves it when answered or abandoned, whatever the shape of its body.

A bare worker serves two BodyRoutes (one that asks for a header, as POST /purge-payments does,
one that does not), run by this module as a script
(`python -m tests.unit.test_body_route_arriving PORT`); it answers each body with what the
route's `complete` received, and GET /counts tells how many requests each route still holds.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import httpx
import pytest

from tests.processes import Process, free_port, port_open, wait_until

MAX_BODY = 64


def head(path: str, length: int, token: str | None = None) -> bytes:
    extra = f"X-Token: {token}\r\n" if token is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\n{extra}Content-Length: {length}\r\n\r\n"
            ).encode()


class Worker(Process):
    def __init__(self) -> None:
        self.port = free_port()
        super().__init__("body-route-worker", [sys.executable, "-m", __name__, str(self.port)],
                         {})
        wait_until(lambda: self.popen.poll() is not None or port_open(self.port))
        assert self.popen.poll() is None, self.log()

    def in_progress(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/counts", timeout=5).json()


@pytest.fixture(scope="module")
def worker():
    started = Worker()
    yield started
    started.stop()


class Answers:
    """The responses of one connection, in order (pipelined ones arrive together)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""

    def _more(self) -> None:
        chunk = self._sock.recv(65536)
        assert chunk, f"connection closed before a whole response: {self._data!r}"
        self._data += chunk

    def next(self) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-case headers, body)."""
        while b"\r\n\r\n" not in self._data:
            self._more()
        header, _, _ = self._data.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        fields = {k.strip().lower(): v.strip()
                  for k, _, v in (x.partition(":") for x in lines[1:])}
        start = len(header) + 4
        end = start + int(fields["content-length"])
        while len(self._data) < end:
            self._more()
        body, self._data = self._data[start:end], self._data[end:]
        return int(lines[0].split(" ")[1]), fields, body


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """Separate writes with pauses between them: separate body chunks in the worker."""
    start = 0
    for cut in [*cuts, len(data)]:
        sock.sendall(data[start:cut])
        start = cut
        time.sleep(0.05)


def nothing_arriving(worker: Worker) -> None:
    wait_until(lambda: worker.in_progress() == {"with_header": 0, "plain": 0}, 10)


@pytest.mark.parametrize("path, token", [("/with-header", "s3cret"), ("/with-header", ""),
                                         ("/plain", None)])
def test_bodies_whole_in_pieces_and_pipelined_are_answered_and_forgotten(worker, path, token):
    bodies = [b'{"a":1}', b"x" * MAX_BODY, b"", b'{"pieces":"' + b"p" * 30 + b'"}']
    expected_header = token if path == "/with-header" else None
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        answers = Answers(sock)
        for body in bodies[:3]:  # one chunk each (or none)
            sock.sendall(head(path, len(body), token) + body)
            assert answers.next()[::2] == (200, json.dumps(
                {"body": body.decode(), "header": expected_header}).encode())
        request = head(path, len(bodies[3]), token) + bodies[3]
        send_in_pieces(sock, request, [len(request) - len(bodies[3]) + 5,
                                       len(request) - 10])
        assert answers.next()[::2] == (200, json.dumps(
            {"body": bodies[3].decode(), "header": expected_header}).encode())
        sock.sendall(b"".join(head(path, len(b), token) + b for b in bodies))  # pipelined
        for body in bodies:
            assert json.loads(answers.next()[2])["body"] == body.decode()
    nothing_arriving(worker)


@pytest.mark.parametrize("path", ["/with-header", "/plain"])
@pytest.mark.parametrize("pieces", [1, 3])
def test_a_body_over_the_limit_gets_413_and_is_forgotten(worker, path, pieces):
    body = b"y" * (MAX_BODY + 1 + 40 * (pieces - 1))
    request = head(path, len(body), "t" if path == "/with-header" else None) + body
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        body_at = len(request) - len(body)
        send_in_pieces(sock, request, [body_at + 40 * i for i in range(1, pieces)])
        status, fields, payload = Answers(sock).next()
        assert (status, fields["connection"]) == (413, "close")
        assert payload == json.dumps({"error": f"body over {MAX_BODY} bytes"}).encode()
    nothing_arriving(worker)


@pytest.mark.parametrize("path", ["/with-header", "/plain"])
def test_requests_abandoned_mid_body_are_forgotten(worker, path):
    body = b'{"abandoned":"' + b"z" * 30 + b'"}'
    request = head(path, len(body), "t" if path == "/with-header" else None) + body
    body_at = len(request) - len(body)
    for cut in (body_at, body_at + 1, body_at + 20, len(request) - 1):
        with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
            sock.sendall(request[:cut])
            time.sleep(0.05)  # the worker reads the head (and the piece) before the hang-up
    nothing_arriving(worker)
    too_large = head(path, MAX_BODY * 3, "t" if path == "/with-header" else None)
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as sock:
        sock.sendall(too_large + b"w" * (MAX_BODY + 10))  # being discarded, then gone
        time.sleep(0.05)
    nothing_arriving(worker)


def _serve(port: int) -> None:
    """The bare worker: two BodyRoutes whose `complete` echoes what it received."""
    from socketify import App

    from rinha.body_route import BodyRoute
    from rinha.listening import listen

    def echo(body: bytes, header: bytes | None) -> tuple[int, bytes]:
        return 200, json.dumps({"body": body.decode(),
                                "header": None if header is None else header.decode()}).encode()

    app = App()
    routes = {"with_header": BodyRoute(app, "/with-header", echo, MAX_BODY, header=b"X-Token"),
              "plain": BodyRoute(app, "/plain", echo, MAX_BODY)}

    def counts(res, req) -> None:  # type: ignore[no-untyped-def]
        res.write_status(200).write_header(b"Content-Type", b"application/json").end(
            json.dumps({name: route.in_progress() for name, route in routes.items()}).encode())

    app.get("/counts", counts)
    if not listen(app, "127.0.0.1", port):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    app.loop.uv_loop.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
