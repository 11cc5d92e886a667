"""Operating an instance: GET /health, /status and /metrics against real processes, the JSON
log format, and `rinha status` over a running stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import (
    backend_totals,
    post_payments,
    processor_totals,
    wait_until,
)


def get(instance, path: str) -> httpx.Response:
    return httpx.get(instance.url + path, timeout=5)


def status(instance) -> dict:
    response = get(instance, "/status")
    assert response.status_code == 200
    return response.json()


def metrics(instance) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = get(instance, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def settled_and_conserved(instance) -> bool:
    document = status(instance)
    conservation = document["conservation"]
    return (conservation["heldInTable"] == 0 and conservation["inKernelQueue"] == 0
            and conservation["difference"] == 0)


def test_health_goes_503_while_the_dispatcher_is_stopped_and_back_after(
    processors, start_instance
):
    instance = start_instance(HEARTBEAT_TIMEOUT_S="0")  # nobody replaces the stopped one
    assert get(instance, "/health").json() == {"status": "ok"}
    [dispatcher] = instance.child_pids("dispatch")
    os.kill(dispatcher, signal.SIGSTOP)
    try:
        wait_until(lambda: get(instance, "/health").status_code == 503, 15)
        answer = get(instance, "/health").json()
        assert answer["status"] == "unavailable"
        assert "dispatcher" in answer["reasons"][0]
    finally:
        os.kill(dispatcher, signal.SIGCONT)
    wait_until(lambda: get(instance, "/health").status_code == 200, 10)


def test_conservation_holds_after_a_burst_an_outage_and_a_dispatcher_restart(
    processors, start_instance
):
    default, fallback = processors
    instance = start_instance()
    accepted = post_payments(instance.url, 400).count(202)
    wait_until(lambda: settled_and_conserved(instance), 20)
    default.set_failure(True)
    accepted += post_payments(instance.url, 300).count(202)
    # During the outage every accepted payment is somewhere: held, recorded or refused.
    during = status(instance)["conservation"]
    assert during["heldInTable"] + during["inKernelQueue"] > 0
    assert during["difference"] == 0
    [dispatcher] = instance.child_pids("dispatch")
    os.kill(dispatcher, signal.SIGKILL)
    wait_until(lambda: instance.child_pids("dispatch") not in ([], [dispatcher]), 15)
    default.set_failure(False)
    wait_until(lambda: settled_and_conserved(instance), 30)
    document = status(instance)
    assert document["conservation"]["accepted"] == accepted
    assert document["conservation"]["recorded"] == accepted == processor_totals(default)[0]
    own = document["recorded"]["own"]
    assert own["default"]["totalRequests"] == backend_totals(instance)["default"][0]
    restarts = {child["role"]: child["restarts"] for child in document["children"]}
    assert restarts["dispatch"] == 1 and restarts["worker0"] == 0
    assert document["processors"]["default"]["circuit"]["state"] == "closed"
    assert document["processors"]["default"]["health"]["polledAt"] is not None


def test_metrics_parse_and_count_exactly_what_was_sent(processors, start_instance):
    default, fallback = processors
    instance = start_instance(FALLBACK_AFTER_S="0.2")
    accepted = post_payments(instance.url, 120).count(202)
    default.set_failure(True)
    accepted += post_payments(instance.url, 30).count(202)
    bad = [b"not json", b"[1]", b'{"correlationId": "x", "amount": 1}', b"{" + b" " * 5000]
    with httpx.Client(base_url=instance.url, timeout=5) as client:
        refused = [client.post("/payments", content=body).status_code for body in bad]
        same = str(uuid.uuid4())
        for _ in range(2):  # the second one is refused by the processor as a duplicate
            client.post("/payments", json={"correlationId": same, "amount": 1})
        client.get("/nowhere")
        client.get("/payments-summary?from=bogus")
    accepted += 2
    assert refused == [400, 400, 422, 413]
    wait_until(lambda: settled_and_conserved(instance), 30)
    default.set_failure(False)
    samples = metrics(instance)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("rinha_payments_accepted_total") == accepted
    assert value("rinha_payments_refused_total", reason="unreadable_body") == 2
    assert value("rinha_payments_refused_total", reason="invalid_field") == 1
    assert value("rinha_payments_refused_total", reason="too_large") == 1
    assert value("rinha_http_requests_total", route="POST /payments", status="202") == accepted
    assert value("rinha_http_requests_total", route="other", status="404") == 1
    assert value("rinha_http_requests_total", route="GET /payments-summary", status="400") == 1
    for processor, emulator in (("default", default), ("fallback", fallback)):
        assert value("rinha_payments_recorded_total", processor=processor) == \
            processor_totals(emulator)[0]
    assert processor_totals(fallback)[0] > 0  # the outage sent some there
    duplicates = sum(value("rinha_payments_duplicates_total", processor=p)
                     for p in ("default", "fallback"))
    assert duplicates == 1
    assert value("rinha_processor_replies_total", processor="default", **{"class": "500"}) > 0
    answered = sum(value("rinha_processor_replies_total", processor="default", **{"class": c})
                   for c in ("2xx", "422", "500", "429", "other_status", "timeout", "reset",
                             "refused"))
    assert value("rinha_processor_request_seconds_count", processor="default") == answered
    assert value("rinha_payments_held") == 0


@pytest.mark.parametrize("path", ["/health", "/status", "/metrics"])
def test_the_operator_pages_refuse_a_query_and_other_methods_with_json(
    processors, start_instance, path
):
    instance = start_instance()
    with httpx.Client(base_url=instance.url, timeout=5) as client:
        response = client.get(path + "?format=xml")
        assert response.status_code == 400 and "error" in response.json()
        response = client.post(path)
        assert response.status_code == 405 and "error" in response.json()


def test_json_logs_are_one_object_per_line_with_the_payment_s_id(processors, start_instance):
    default, _ = processors
    instance = start_instance(LOG_FORMAT="json")
    same = str(uuid.uuid4())
    for _ in range(2):
        httpx.post(instance.url + "/payments", json={"correlationId": same, "amount": 1})
    wait_until(lambda: "holds another payment" in instance.log(), 15)
    lines = [json.loads(line) for line in instance.log().splitlines() if line.strip()]
    assert all({"time", "instance", "process", "level", "event"} <= set(line) for line in lines)
    assert {line["process"] for line in lines} >= {"supervisor", "dispatch"}
    [duplicate] = [line for line in lines if "holds another payment" in line["event"]]
    assert duplicate["correlationId"] == same and duplicate["level"] == "WARNING"


def test_rinha_status_prints_both_instances_of_a_running_stack(tmp_path):
    from tests.integration.test_stack import start_stack, stop, wait_ready

    stack, port = start_stack(tmp_path)
    try:
        wait_ready(stack)
        post_payments(f"http://127.0.0.1:{port}", 20)
        result = subprocess.run([sys.executable, "-m", "rinha", "status", "--stack",
                                 str(tmp_path)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        header = result.stdout.splitlines()[0]
        assert "-api1" in header and "-api2" in header
        assert "conservation difference" in result.stdout
    finally:
        assert stop(stack) == 0
