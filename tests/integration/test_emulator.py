"""The payment-processor emulator (rinha_lab/emulator.py), run as a real subprocess over real HTTP.

Each test gets a fresh emulator on a free port, so configuration changes (delay, failure,
token) and rows never leak between tests. The behaviours checked are the ones docs/contest.md
states for the real processors.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "123"
ADMIN = {"X-Rinha-Token": TOKEN}
HEALTH_WINDOW_S = 1.0


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@dataclass
class Emulator:
    process: subprocess.Popen[bytes]
    url: str
    client: httpx.Client

    def pay(self, correlation_id: str, amount: str = "19.90", at: str = "2025-07-10T12:00:00.000Z"):
        # The body is written by hand so the amount goes on the wire exactly as given.
        body = f'{{"correlationId":"{correlation_id}","amount":{amount},"requestedAt":"{at}"}}'
        headers = {"Content-Type": "application/json"}
        return self.client.post("/payments", content=body, headers=headers)

    def summary(self, **params: str) -> dict:
        reply = self.client.get("/admin/payments-summary", params=params, headers=ADMIN)
        assert reply.status_code == 200, reply.text
        return json.loads(reply.text, parse_float=Decimal)

    def configure(self, name: str, value: object, token: str = TOKEN) -> httpx.Response:
        headers = {"X-Rinha-Token": token}
        return self.client.put(f"/admin/configurations/{name}", json={name: value}, headers=headers)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rinha_lab.emulator",
            "--port",
            str(port),
            "--fee",
            "0.05",
            "--health-window-s",
            str(HEALTH_WINDOW_S),
        ],
        cwd=REPO_ROOT,
    )
    try:
        wait_until(lambda: process.poll() is not None or accepts_connections(port), timeout=10)
        assert process.poll() is None, "the emulator exited during startup"
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            yield Emulator(process, url, client)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def new_id() -> str:
    return str(uuid.uuid4())


def test_payment_is_stored_once_and_a_duplicate_gets_422(emulator: Emulator) -> None:
    correlation_id = new_id()
    first = emulator.pay(correlation_id)
    assert first.status_code == 200
    assert first.json() == {"message": "payment processed successfully"}

    again = emulator.pay(correlation_id, amount="5.00")
    assert again.status_code == 422
    assert summary_totals(emulator.summary()) == (1, Decimal("19.90"))


def test_get_payment_returns_the_stored_row(emulator: Emulator) -> None:
    correlation_id = new_id()
    assert emulator.pay(correlation_id, amount="19.905", at="2025-07-10T12:34:56.789Z").is_success

    reply = emulator.client.get(f"/payments/{correlation_id}")
    assert reply.status_code == 200
    # Rounded to 2 decimals on insert, written with two decimals.
    assert '"amount":19.91' in reply.text
    assert reply.json() == {
        "correlationId": correlation_id,
        "amount": 19.91,
        "requestedAt": "2025-07-10T12:34:56.789Z",
    }
    assert emulator.client.get(f"/payments/{new_id()}").status_code == 404


def test_failure_comes_after_the_delay_and_stores_nothing(emulator: Emulator) -> None:
    assert emulator.configure("delay", 200).status_code == 200
    assert emulator.configure("failure", True).status_code == 200
    correlation_id = new_id()

    started = time.monotonic()
    reply = emulator.pay(correlation_id)
    elapsed = time.monotonic() - started

    assert reply.status_code == 500
    assert elapsed >= 0.2
    assert emulator.client.get(f"/payments/{correlation_id}").status_code == 404
    assert summary_totals(emulator.summary()) == (0, Decimal("0.00"))


def test_delay_applies_to_successful_payments_and_health_reports_it(emulator: Emulator) -> None:
    emulator.configure("delay", 150)
    started = time.monotonic()
    assert emulator.pay(new_id()).status_code == 200
    assert time.monotonic() - started >= 0.15

    health = emulator.client.get("/payments/service-health")
    assert health.status_code == 200
    assert health.json() == {"failing": False, "minResponseTime": 150}


def test_summary_windows_are_inclusive_at_millisecond_instants(emulator: Emulator) -> None:
    instants = [
        "2025-07-10T12:00:00.000Z",
        "2025-07-10T12:00:00.001Z",
        "2025-07-10T12:00:00.999Z",
        "2025-07-10T12:00:01.000Z",
        "2025-07-10T12:00:01.000500Z",  # half a millisecond past the last instant
    ]
    for instant in instants:
        assert emulator.pay(new_id(), at=instant).status_code == 200

    def count(start: str | None, end: str | None) -> int:
        params = {}
        if start is not None:
            params["from"] = f"2025-07-10T12:00:{start}Z"
        if end is not None:
            params["to"] = f"2025-07-10T12:00:{end}Z"
        return emulator.summary(**params)["totalRequests"]

    assert count("00.000", "01.000") == 4
    assert count("00.001", "00.999") == 2
    assert count("00.000", "00.000") == 1
    assert count("01.000", "01.000") == 1
    assert count("00.002", "00.998") == 0
    assert count("01.001", "59.000") == 0
    assert count("01.000", "00.000") == 0  # from after to: BETWEEN selects nothing
    # Either bound missing (or empty) selects every row, like the real SQL.
    assert count(None, "00.000") == 5
    assert count("59.000", None) == 5
    assert count(None, None) == 5
    assert emulator.summary(**{"from": "", "to": ""})["totalRequests"] == 5


def test_summary_totals_and_fees(emulator: Emulator) -> None:
    for _ in range(3):
        emulator.pay(new_id())
    emulator.pay(new_id(), amount="0.10")

    reply = emulator.client.get("/admin/payments-summary", headers=ADMIN)
    assert '"totalAmount":59.80' in reply.text
    summary = json.loads(reply.text, parse_float=Decimal)
    assert summary == {
        "totalRequests": 4,
        "totalAmount": Decimal("59.80"),
        "totalFee": Decimal("2.99"),  # 59.80 * 0.05, exact
        "feePerTransaction": Decimal("0.05"),
    }


def test_admin_requires_the_current_token(emulator: Emulator) -> None:
    client = emulator.client
    assert client.get("/admin/payments-summary").status_code == 401
    assert client.get("/admin/payments-summary", headers={"X-Rinha-Token": "x"}).status_code == 401
    assert emulator.configure("delay", 10, token="wrong").status_code == 401
    assert client.post("/admin/purge-payments").status_code == 401

    assert emulator.configure("token", "s3cret").is_success
    assert client.get("/admin/payments-summary", headers=ADMIN).status_code == 401
    renewed = {"X-Rinha-Token": "s3cret"}
    assert client.get("/admin/payments-summary", headers=renewed).status_code == 200


def test_purge_removes_every_payment(emulator: Emulator) -> None:
    correlation_id = new_id()
    emulator.pay(correlation_id)
    emulator.pay(new_id())

    reply = emulator.client.post("/admin/purge-payments", headers=ADMIN)
    assert reply.status_code == 200
    assert "message" in reply.json()
    assert summary_totals(emulator.summary()) == (0, Decimal("0.00"))
    assert emulator.client.get(f"/payments/{correlation_id}").status_code == 404
    assert emulator.pay(correlation_id).status_code == 200  # the key is free again


def test_service_health_allows_one_call_per_window(emulator: Emulator) -> None:
    first = emulator.client.get("/payments/service-health")
    assert first.status_code == 200

    def timed_health_call(_: int) -> tuple[int, float]:
        with httpx.Client(base_url=emulator.url, timeout=10) as client:
            status = client.get("/payments/service-health").status_code
        return status, time.monotonic()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = sorted(pool.map(timed_health_call, range(3)))

    statuses = [status for status, _ in results]
    assert statuses == [200, 200, 429]
    rejected_at = results[2][1]
    assert rejected_at - started < 0.5 * HEALTH_WINDOW_S  # refused at once, not queued
    queued_done = sorted(at for _, at in results[:2])
    # The two queued callers are served as later windows open, one window each.
    assert queued_done[1] - queued_done[0] >= 0.8 * HEALTH_WINDOW_S


def test_unknown_paths_and_wrong_methods(emulator: Emulator) -> None:
    client = emulator.client
    assert client.get("/nope").status_code == 404
    assert client.get("/payments").status_code == 405
    assert client.post("/payments/service-health").status_code == 405
    assert client.delete(f"/payments/{new_id()}").status_code == 405
    assert client.get("/admin/purge-payments", headers=ADMIN).status_code == 405


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"correlationId": "not-a-uuid", "amount": 1, "requestedAt": "2025-07-10T12:00:00Z"}',
        b'{"correlationId": "%s", "amount": "19.90", "requestedAt": "2025-07-10T12:00:00Z"}',
        b'{"correlationId": "%s", "amount": 19.90, "requestedAt": "yesterday"}',
        b'{"correlationId": "%s", "requestedAt": "2025-07-10T12:00:00Z"}',
        b'{"correlationId": "%s", "amount": NaN, "requestedAt": "2025-07-10T12:00:00Z"}',
        b'{"correlationId": "%s", "amount": 1e999, "requestedAt": "2025-07-10T12:00:00Z"}',
    ],
)
def test_bad_payment_bodies_get_4xx_and_store_nothing(emulator: Emulator, body: bytes) -> None:
    if b"%s" in body:
        body = body % new_id().encode()
    headers = {"Content-Type": "application/json"}
    reply = emulator.client.post("/payments", content=body, headers=headers)
    assert 400 <= reply.status_code < 500
    assert "message" in reply.json()
    assert summary_totals(emulator.summary()) == (0, Decimal("0.00"))


def test_bad_admin_bodies_get_400(emulator: Emulator) -> None:
    headers = {**ADMIN, "Content-Type": "application/json"}
    put = emulator.client.put
    assert put("/admin/configurations/delay", content=b"{", headers=headers).status_code == 400
    assert emulator.configure("delay", "slow").status_code == 400
    assert emulator.configure("failure", "yes").status_code == 400
    assert emulator.configure("token", 5).status_code == 400
    health = emulator.client.get("/payments/service-health").json()
    assert health == {"failing": False, "minResponseTime": 0}


def test_malformed_http_closes_the_connection_and_the_server_survives(emulator: Emulator) -> None:
    port = int(emulator.url.rsplit(":", 1)[1])
    for garbage in (
        b"garbage\r\n\r\n",
        b"POST /payments HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"\x00\xff" * 20_000,
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(garbage)
            assert raw.recv(1024) == b""  # closed without an answer
    assert emulator.pay(new_id()).status_code == 200


def test_keep_alive_answers_pipelined_requests_in_order(emulator: Emulator) -> None:
    port = int(emulator.url.rsplit(":", 1)[1])
    emulator.configure("delay", 50)
    body = (
        f'{{"correlationId":"{new_id()}","amount":1.00,"requestedAt":"2025-07-10T12:00:00Z"}}'
    ).encode()
    post = (
        b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    missing = b"GET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(post + post + missing)
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert statuses == [b"200", b"422", b"404"]


def test_sigterm_stops_the_emulator_promptly(emulator: Emulator) -> None:
    emulator.process.terminate()
    assert emulator.process.wait(timeout=5) == 0


def summary_totals(summary: dict) -> tuple[int, Decimal]:
    return summary["totalRequests"], summary["totalAmount"]


def test_json_bodies_need_a_json_content_type(emulator: Emulator) -> None:
    body = f'{{"correlationId":"{new_id()}","amount":1,"requestedAt":"2025-07-10T12:00:00Z"}}'
    reply = emulator.client.post("/payments", content=body, headers={"Content-Type": "text/plain"})
    assert reply.status_code == 415
    assert emulator.client.post("/payments", content=body).status_code == 415
    assert summary_totals(emulator.summary()) == (0, Decimal("0.00"))
