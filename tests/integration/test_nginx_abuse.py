"""The load balancer under abuse: the repository's nginx.conf, rendered as the local stack runs it,
in front of real `rinha serve` instances (or, where an instance must misbehave in a way a real
one cannot be made to, a stub upstream that reads a request and closes without answering).

Slow clients that never finish their headers, refusals nginx produces itself, a 503 from an
instance (retried on the other) and a POST that reached an instance and got no answer (never
replayed).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import (
    Instance,
    Nginx,
    backend_totals,
    free_port,
    own_totals,
    payment_body,
    peered_pair,
    post_payments,
    processor_totals,
    wait_until,
)

# More than the 4,096 worker_connections nginx.conf had: with that limit these alone took every
# slot and nginx refused every new connection while they lasted.
CROWD = 4200


def processors_total(processors) -> dict[str, tuple[int, str]]:
    default, fallback = processors
    return {"default": processor_totals(default), "fallback": processor_totals(fallback)}


def summary_through(nginx: Nginx) -> dict[str, tuple[int, str]]:
    response = httpx.get(nginx.url + "/payments-summary", timeout=5)
    assert response.status_code == 200, (response.status_code, response.text)
    return {k: (v["totalRequests"], f'{v["totalAmount"]:.2f}') for k, v in response.json().items()}


def nginx_error_log(nginx: Nginx) -> str:
    # render_local sends error_log to error.log next to the rendered nginx.conf (the last
    # argument of nginx's command line).
    conf_path = Path(nginx.popen.args[-1])
    return (conf_path.parent / "error.log").read_text(errors="replace")


def assert_json_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body


@pytest.fixture
def pair(processors):
    first, second = peered_pair(*processors)
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture
def nginx(pair):
    balancer = Nginx(*pair)
    yield balancer
    balancer.stop()


# Slow clients ------------------------------------------------------------------------------


class HalfOpenCrowd:
    """`size` connections to `port`, each having sent the start of a request whose headers it
    never finishes (slowloris). A thread keeps the crowd at full size: whenever nginx closes
    one, it opens another, so the pressure lasts however long the test takes."""

    START = b"POST /payments HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"

    def __init__(self, port: int, size: int) -> None:
        self._port = port
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self.original_closed = 0  # of the first `size` connections, how many nginx closed
        for _ in range(size):
            self._open(original=True)
        self._thread = threading.Thread(target=self._keep_full, daemon=True)
        self._thread.start()

    def _open(self, original: bool) -> None:
        sock = socket.create_connection(("127.0.0.1", self._port), timeout=5)
        try:
            sock.sendall(self.START)
        except OSError:
            pass  # closed by nginx at once (no free slot): seen as closed, and replaced
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, original)

    def _keep_full(self) -> None:
        while not self._stop.is_set():
            # Readable means nginx closed it (reset or FIN): nginx never answers a request
            # whose headers have not ended.
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                self._selector.unregister(sock)
                sock.close()
                self.original_closed += key.data
                if not self._stop.is_set():
                    try:
                        self._open(original=False)
                    except OSError:
                        pass  # refused: the next round tries again

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            # Reset rather than close: no TIME_WAIT left behind for each of thousands of ports.
            key.fileobj.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            key.fileobj.close()
        self._selector.close()


@pytest.fixture
def enough_descriptors():
    """This process holds the whole crowd: raise its descriptor limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * CROWD + 1024  # the crowd, its replacements while they connect, the rest
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} and cannot be raised")
    elif soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_requests_are_served_while_thousands_of_connections_never_finish_their_headers(
    processors, pair, nginx, enough_descriptors
):
    crowd = HalfOpenCrowd(nginx.port, CROWD)
    try:
        # While the crowd holds its connections: new connections, payments and summaries.
        statuses = post_payments(nginx.url, 200, concurrency=16)
        assert statuses.count(202) == 200, sorted(set(statuses))
        default, _ = processors
        wait_until(lambda: processor_totals(default)[0] == 200, 15)
        expected = processors_total(processors)
        wait_until(lambda: summary_through(nginx) == expected, 5)
        assert expected["default"] == (200, "3980.00")
        # client_header_timeout: nginx closes every connection of the crowd that never
        # finished its headers (the crowd replaces each one, so the pressure goes on).
        wait_until(lambda: crowd.original_closed == CROWD, 30, interval=0.2)
        assert post_payments(nginx.url, 20, concurrency=4).count(202) == 20
    finally:
        crowd.close()
    wait_until(lambda: processor_totals(default)[0] == 220, 15)
    wait_until(lambda: summary_through(nginx) == processors_total(processors), 5)


# Refusals nginx produces itself --------------------------------------------------------------


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as bytes and read the answer up to the close nginx does after an error."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def test_every_refusal_nginx_makes_itself_is_json(nginx):
    with httpx.Client(timeout=10) as client:
        # Over nginx's body limit (the instance's own limit is 4 KB: see the next test).
        big = b'{"correlationId":"' + b"x" * 1_100_000 + b'"}'
        assert_json_error(client.post(nginx.url + "/payments", content=big,
                                      headers={"Content-Type": "application/json"}), 413)
        assert_json_error(client.get(nginx.url + "/payments-summary?from=" + "9" * 3000), 414)
        assert_json_error(client.get(nginx.url + "/payments-summary",
                                     headers={"X-Unknown": "y" * 3000}), 431)
        # The error page's own URI is not reachable from outside.
        assert_json_error(client.get(nginx.url + "/_nginx_error"), 404)
    for request, status in [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /payments-summary HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
        (b"POST /payments HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /payments-summary HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ]:
        got, headers, body = raw_exchange(nginx.port, request)
        assert (got, headers.get("content-type")) == (status, "application/json"), (request, body)
        assert list(json.loads(body)) == ["error"], body


def test_the_instances_own_answers_pass_through_untouched(pair, nginx):
    first, _ = pair
    too_large = b'{"correlationId":"' + b"x" * 5000 + b'"}'  # over 4 KB, under nginx's limit
    requests = [
        ("POST", "/payments", b'{"correlationId": "nope", "amount": 1}'),  # 422
        ("POST", "/payments", b"{not json"),  # 400
        ("POST", "/payments", too_large),  # 413 from the instance
        ("GET", "/no-such-thing", b""),  # 404
        ("DELETE", "/payments", b""),  # 405
        ("GET", "/payments-summary?from=yesterday", b""),  # 400
    ]
    with httpx.Client(timeout=10) as client:
        for method, path, body in requests:
            headers = {"Content-Type": "application/json"} if body else {}
            direct = client.request(method, first.url + path, content=body, headers=headers)
            proxied = client.request(method, nginx.url + path, content=body, headers=headers)
            assert direct.status_code >= 400, (path, direct.status_code)
            assert (proxied.status_code, proxied.headers.get("content-type"), proxied.content) \
                == (direct.status_code, direct.headers.get("content-type"), direct.content)
        accepted = client.post(nginx.url + "/payments", content=payment_body(),
                               headers={"Content-Type": "application/json"})
        assert (accepted.status_code, accepted.content) == (202, b"")


# Retries: a 503 goes to the other instance; a POST without an answer never does --------------


def process_state(pid: int) -> str:
    # /proc/PID/stat: "pid (comm) state ...", and comm may contain spaces.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def post_in_two_writes(port: int, body: bytes) -> int:
    """POST /payments with the body sent a moment after the headers, as some clients write
    them; returns the status."""
    head = (f"POST /payments HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)  # not a timing assertion: only so that the headers travel alone
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_503_is_retried_on_the_other_instance_and_nothing_is_counted_twice(processors):
    # api1 with a queue of 4 and its dispatcher stopped: once 4 payments wait there, it
    # answers 503 (nothing enqueued). api2 as usual. Peered as compose peers them.
    sync = [free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    common = {"SYNC_HOST": "127.0.0.1", "SYNC_RECOVER_TIMEOUT_S": "0.3"}
    full = Instance(*processors, QUEUE_MAX_MESSAGES="4", SYNC_PORT=str(sync[0]),
                    PEER_ADDR=f"127.0.0.1:{sync[1]}", HEALTH_POLL="1", **common)
    other = Instance(*processors, SYNC_PORT=str(sync[1]), PEER_ADDR=f"127.0.0.1:{sync[0]}",
                     HEALTH_POLL="0", **common)
    balancer = None
    try:
        full.wait_ready()
        other.wait_ready()
        balancer = Nginx(full, other)
        (dispatcher,) = full.child_pids("dispatch")
        os.kill(dispatcher, signal.SIGSTOP)
        wait_until(lambda: process_state(dispatcher) == "T")
        try:
            # Fill api1's queue directly: from now on it answers 503.
            assert post_payments(full.url, 4, concurrency=1) == [202] * 4
            assert post_payments(full.url, 1) == [503]
            # A fresh nginx's round robin starts with the first server, api1; the body comes
            # after the headers, and nginx still has it to send to api2 (request buffering).
            assert post_in_two_writes(balancer.port, payment_body()) == 202
            assert "temporarily disabled while reading response header" in \
                nginx_error_log(balancer)
            statuses = post_payments(balancer.url, 200, concurrency=8)
            assert statuses.count(202) == 200, sorted(set(statuses))
        finally:
            try:
                os.kill(dispatcher, signal.SIGCONT)
            except ProcessLookupError:
                pass  # replaced meanwhile (a hung child is replaced): its successor runs
        default, _ = processors
        wait_until(lambda: processor_totals(default)[0] == 205, 15)
        expected = processors_total(processors)
        assert expected["default"] == (205, "4079.50")
        wait_until(lambda: summary_through(balancer) == expected, 5)
        # Once both report it all, each one's own count is final (a reply the processor sent
        # may still be on its way to a dispatcher when the processor's count is reached).
        wait_until(lambda: all(backend_totals(i) == expected for i in (full, other)), 5)
        assert own_totals(full)[0] == 4  # exactly its queue: the 503s enqueued nothing
        assert own_totals(other)[0] == 201
    finally:
        if balancer is not None:
            balancer.stop()
        full.stop()
        other.stop()


class SilentUpstream:
    """An upstream that reads each request whole (headers and body) and closes the connection
    without answering: a request that reached an instance, which then died or reset before
    answering. Counts the requests it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                request_line = self._read_request(conn)
                if request_line is not None:
                    self.received.append(request_line)

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            body += chunk
        return head.split(b"\r\n")[0]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture
def silent_pair():
    upstreams = SilentUpstream(), SilentUpstream()
    balancer = Nginx(*upstreams)
    yield upstreams, balancer
    balancer.stop()
    for upstream in upstreams:
        upstream.stop()


def test_a_post_that_reached_an_instance_and_got_no_answer_is_not_replayed(silent_pair):
    upstreams, balancer = silent_pair
    response = httpx.post(balancer.url + "/payments", content=payment_body(),
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert_json_error(response, 502)
    # Exactly one instance got it, once: replayed on the other, it could be counted twice.
    assert [u.received for u in upstreams if u.received] == [[b"POST /payments HTTP/1.1"]]


def test_a_summary_that_got_no_answer_is_asked_of_the_other_instance(silent_pair):
    upstreams, balancer = silent_pair
    response = httpx.get(balancer.url + "/payments-summary", timeout=10)
    assert_json_error(response, 502)
    # A read is safe to repeat: both instances were asked, once each.
    assert [u.received for u in upstreams] == [[b"GET /payments-summary HTTP/1.1"]] * 2
