"""POST bodies on the wire as clients really send them (body_route.py): in pieces, pipelined,
too large, abandoned halfway. Raw sockets against a real `rinha serve`."""

from __future__ import annotations

import socket
import time

from tests.processes import backend_totals, payment_body, post_payments, wait_until


def head(length: int, path: str = "/payments") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


class Responses:
    """Reads the responses of one connection in order (pipelined ones arrive together)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""

    def next(self) -> tuple[int, bytes]:
        """(status, body); responses here always carry Content-Length."""
        while b"\r\n\r\n" not in self._data:
            self._more()
        header, _, rest = self._data.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            self._data = header + b"\r\n\r\n" + rest
            self._more()
            header, _, rest = self._data.partition(b"\r\n\r\n")
        self._data = rest[length:]
        return status, rest[:length]

    def _more(self) -> None:
        chunk = self._sock.recv(4096)
        assert chunk, f"connection closed before a whole response: {self._data!r}"
        self._data += chunk


def recorded(instance) -> int:
    totals = backend_totals(instance)
    return totals["default"][0] + totals["fallback"][0]


def test_a_body_arriving_in_pieces_is_read_whole_and_the_connection_stays_usable(
    processors, start_instance
):
    instance = start_instance()
    body = payment_body()
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
        sock.sendall(head(len(body)) + body[:7])
        for piece in (body[7:30], body[30:]):
            time.sleep(0.1)  # separate TCP segments: separate body chunks in the worker
            sock.sendall(piece)
        responses = Responses(sock)
        assert responses.next() == (202, b"")
        other = payment_body()
        sock.sendall(head(len(other)) + other)  # the same keep-alive connection again
        assert responses.next() == (202, b"")
    wait_until(lambda: recorded(instance) == 2)


def test_pipelined_requests_each_get_their_answer(processors, start_instance):
    instance = start_instance()
    bodies = [payment_body() for _ in range(3)] + [b'{"amount":1}']
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
        sock.sendall(b"".join(head(len(body)) + body for body in bodies))  # one write
        responses = Responses(sock)
        answers = [responses.next() for _ in bodies]
    assert [status for status, _ in answers] == [202, 202, 202, 422]
    assert b"correlationId" in answers[3][1]
    wait_until(lambda: recorded(instance) == 3)


def test_a_body_over_4_kb_in_pieces_gets_413_and_the_connection_is_closed(
    processors, start_instance
):
    instance = start_instance()
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
        sock.sendall(head(6000) + b"{" + b" " * 1999)
        for _ in range(2):
            time.sleep(0.05)
            sock.sendall(b" " * 2000)
        status, body = Responses(sock).next()
        assert status == 413 and b"error" in body
        assert sock.recv(4096) == b""  # closed after the answer
    assert post_payments(instance.url, 1) == [202]  # the worker serves on
    wait_until(lambda: recorded(instance) == 1)


def test_clients_hanging_up_mid_body_leave_the_workers_serving(processors, start_instance):
    instance = start_instance()
    workers = sorted(instance.child_pids("worker"))
    body = payment_body()
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
            sock.sendall(head(len(body)) + body[:20])  # ...and gone before the rest
    time.sleep(0.2)
    assert post_payments(instance.url, 20).count(202) == 20
    assert sorted(instance.child_pids("worker")) == workers  # none crashed and restarted
    wait_until(lambda: recorded(instance) == 20)
    assert recorded(instance) == 20  # none of the abandoned halves became a payment
