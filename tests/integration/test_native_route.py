"""POST /payments answered in C (native_ledger/_intake.c) inside a real socketify worker.

Two kinds of server: `rinha serve` itself (its summary shows what the C path and the Python path
queued), and a bare worker built like Intake.serve() builds its POST /payments route, run by this
module as a script (`python -m tests.integration.test_native_route PORT QUEUE`), whose queue the
test reads record by record and which tells what its route did on GET /counts. The request
shapes of tests/integration/test_body_route.py (pieces, pipelining, 413, hang-ups) run against
the native route there, as they run against `rinha serve`.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
import uuid
from decimal import Decimal

import httpx
import posix_ipc
import pytest

from native_ledger import _intake
from rinha import wire
from rinha.intake import MAX_BODY_BYTES, QUEUE_FULL, BadRequest, parse_payment
from tests.integration.test_body_route import Responses, head
from tests.processes import Process, free_port, port_open, wait_until
from tests.unit.test_native_intake import contest_body, generated

JSON_QUEUE_FULL = json.dumps({"error": QUEUE_FULL}).encode()
TOO_LARGE = json.dumps({"error": f"body over {MAX_BODY_BYTES} bytes"}).encode()


def expected_answer(body: bytes) -> tuple[int, bytes | None]:
    """(status, queued record or None) of the Python path: parse_payment, then the queue."""
    if len(body) > MAX_BODY_BYTES:
        return 413, None
    try:
        raw_id, cents = parse_payment(body)
    except BadRequest as exc:
        return exc.status, None
    return 202, wire.encode_payment(raw_id, cents)


class Worker(Process):
    """A bare worker with the native POST /payments route on its own queue."""

    def __init__(self, max_messages: int = 10) -> None:
        self.port = free_port()
        self.queue_name = f"/rinha-native-{uuid.uuid4().hex[:10]}"
        self.queue = posix_ipc.MessageQueue(self.queue_name, posix_ipc.O_CREX,
                                            max_messages=max_messages,
                                            max_message_size=wire.PAYMENT_RECORD_SIZE)
        super().__init__("native-worker", [sys.executable, "-m", __name__, str(self.port),
                                           self.queue_name], {})
        try:
            wait_until(lambda: self.popen.poll() is not None or port_open(self.port))
            assert self.popen.poll() is None, self.log()
        except BaseException:
            self.stop()  # unlinks the queue: root's queue budget is small and shared
            raise

    def counts(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/counts", timeout=5).json()

    def queued(self) -> list[bytes]:
        records = []
        while True:
            try:
                records.append(self.queue.receive(timeout=0)[0])
            except posix_ipc.BusyError:
                return records

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        self.queue.close()
        self.queue.unlink()
        return code


@pytest.fixture
def worker():
    started: list[Worker] = []

    def start(**kwargs: int) -> Worker:
        started.append(Worker(**kwargs))
        return started[-1]

    yield start
    for w in started:
        w.stop()


def headers_of(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request; (status, lower-case headers, body) of its answer."""
    sock.sendall(data)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    header, _, rest = raw.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(fields["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split(" ")[1]), fields, rest[:length]


def test_what_c_queues_is_what_python_would(worker):
    """Thousands of generated bodies, one keep-alive connection: the same status and the same
    24 queued bytes as the Python path; the C path takes every body its parser takes."""
    w = worker()
    rng = random.Random(7)
    bodies = [data for _, data in generated()]
    sample = rng.sample(bodies, 3000)
    sample += [contest_body(str(uuid.uuid4()), rng.randint(1, 10**8) / 100) for _ in range(500)]
    in_c = 0
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
        for body in sample:
            status, fields, answer = headers_of(sock, head(len(body)) + body)
            expected_status, expected_record = expected_answer(body)
            assert (status, w.queued()) == (
                expected_status, [expected_record] if expected_record else []), body
            if status == 413:
                assert answer == TOO_LARGE and fields.get("connection") == "close"
                sock.close()
                sock = socket.create_connection(("127.0.0.1", w.port), timeout=5)
            in_c += _intake.parse(body) is not None
    counts = w.counts()
    assert counts["accepted"] == in_c >= 500  # every contest body, at least
    assert counts["accepted"] + counts["deferred"] + counts["too_large"] == len(sample)
    assert counts["full"] == counts["in_progress"] == 0


def test_the_c_answers_are_202_with_content_length_0_and_503_as_python_says(worker):
    w = worker(max_messages=2)
    c_body = contest_body(str(uuid.uuid4()), 19.9)
    python_body = c_body.replace(b":19.9", b": 19.900")  # valid, but Python's to answer
    assert _intake.parse(c_body) is not None and _intake.parse(python_body) is None
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
        status, fields, answer = headers_of(sock, head(len(c_body)) + c_body)
        assert (status, fields["content-length"], answer) == (202, "0", b"")
        assert "content-type" not in fields
        status, fields, answer = headers_of(sock, head(len(python_body)) + python_body)
        assert (status, answer) == (202, b"")
        # The queue holds 2 records: now it is full, for C and for Python alike.
        for body in (c_body, python_body):
            status, fields, answer = headers_of(sock, head(len(body)) + body)
            assert (status, fields["content-type"], answer) == (
                503, "application/json", JSON_QUEUE_FULL)
    assert w.queued() == [expected_answer(c_body)[1], expected_answer(python_body)[1]]
    counts = w.counts()
    assert (counts["accepted"], counts["full"], counts["deferred"]) == (1, 1, 2)


def test_bodies_in_pieces_pipelined_and_too_large(worker):
    w = worker()
    body = contest_body(str(uuid.uuid4()), 19.9)
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
        sock.sendall(head(len(body)) + body[:7])
        for piece in (body[7:30], body[30:]):
            time.sleep(0.05)
            sock.sendall(piece)
        responses = Responses(sock)
        assert responses.next() == (202, b"")  # in pieces: Python's, the same record
        assert w.queued() == [expected_answer(body)[1]]
        bodies = [contest_body(str(uuid.uuid4()), 0.01) for _ in range(3)] + [b'{"amount":1}']
        sock.sendall(b"".join(head(len(b)) + b for b in bodies))
        assert [responses.next()[0] for _ in bodies] == [202, 202, 202, 422]
        assert w.queued() == [expected_answer(b)[1] for b in bodies[:3]]
    for size in (MAX_BODY_BYTES + 1, 100_000):  # one chunk, then many
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
            big = b"{" + b" " * (size - 2) + b"}"
            status, fields, answer = headers_of(sock, head(len(big)) + big)
            assert (status, answer, fields["connection"]) == (413, TOO_LARGE, "close")
            assert sock.recv(4096) == b""
    at_the_limit = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"}"
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
        assert headers_of(sock, head(len(at_the_limit)) + at_the_limit)[0] == 202
    counts = w.counts()
    assert counts["too_large"] == 2
    assert counts["accepted"] == 3 and counts["in_progress"] == 0


def test_clients_leaving_mid_request_free_their_requests(worker):
    w = worker()
    body = contest_body(str(uuid.uuid4()), 19.9)
    request = head(len(body)) + body
    # Cut everywhere: in the head (no request yet), right after it, mid-body, one byte short.
    cuts = range(1, len(request))
    for cut in cuts:
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as sock:
            sock.sendall(request[:cut])
    # Those cut after the head had a request to abort; the worker sees the closes in its time.
    aborts = sum(cut >= len(head(len(body))) for cut in cuts)
    counts = wait_until(lambda: (c := w.counts())["aborted"] == aborts and c, 30)
    assert counts["in_progress"] == 0
    assert counts["accepted"] == counts["deferred"] == 0
    assert w.queued() == []
    status, _, _ = headers_of(socket.create_connection(("127.0.0.1", w.port), timeout=5),
                              head(len(body)) + body)
    assert status == 202 and w.queued() == [expected_answer(body)[1]]


def test_a_real_instance_counts_what_both_paths_accepted(processors, start_instance):
    """Through `rinha serve`: C-path bodies, Python-path bodies and refused bodies; the
    summary counts exactly the accepted ones, to the cent."""
    instance = start_instance()
    rng = random.Random(11)
    accepted_cents = 0
    accepted = 0
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
        responses = Responses(sock)
        for i in range(300):
            cid = str(uuid.uuid4())
            amount = rng.choice(["19.9", "0.01", "1000000.00", "19.900", "1e2", "-1", "0",
                                 "19.901", "1000000.01", str(rng.randint(1, 10**6))])
            shape = (f'{{"correlationId":"{cid}","amount":{amount}}}' if i % 3 else
                     f'{{ "amount": {amount}, "correlationId": "{cid}" }}')
            body = shape.encode()
            sock.sendall(head(len(body)) + body)
            status, _ = responses.next()
            expected_status, record = expected_answer(body)
            assert status == expected_status, body
            if record:
                accepted += 1
                accepted_cents += wire.decode_payment(record)[1]
    assert 100 < accepted < 300

    def totals() -> tuple[int, Decimal]:
        summary = instance.summary()
        return (summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"],
                Decimal(str(summary["default"]["totalAmount"]))
                + Decimal(str(summary["fallback"]["totalAmount"])))

    wait_until(lambda: totals()[0] == accepted, 30)  # the dispatcher runs under SCHED_IDLE
    assert totals() == (accepted, Decimal(accepted_cents) / 100)


def _serve(port: int, queue_name: str) -> None:
    """The bare worker: POST /payments as Intake.serve() registers it, on `queue_name`."""
    from socketify import App

    from rinha.body_route import NativePaymentRoute
    from rinha.intake import accept_payment
    from rinha.listening import listen

    queue = posix_ipc.MessageQueue(queue_name)
    app = App()
    route = NativePaymentRoute(app, "/payments",
                               lambda body, _header: accept_payment(queue, body), queue.mqd,
                               MAX_BODY_BYTES, JSON_QUEUE_FULL)

    def counts(res, req) -> None:  # type: ignore[no-untyped-def]
        res.write_status(200).write_header(b"Content-Type", b"application/json").end(
            json.dumps(route.counts()).encode())

    app.get("/counts", counts)
    if not listen(app, "127.0.0.1", port):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    app.loop.uv_loop.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
