"""One instance end to end: real emulators, real `rinha serve`, real HTTP."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime

import httpx
import pytest

from tests.processes import backend_totals, post_payments, processor_totals, wait_until


def iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def assert_summaries_equal(instance, default, fallback, params=None):
    backend = backend_totals(instance, params)
    # Our missing bound means "unbounded on that side"; the processors' admin summary ignores
    # the window when either bound is missing, so ask them with the far bound spelled out.
    spelled = None
    if params:
        spelled = {"from": "2000-01-01T00:00:00.000Z", "to": "2100-01-01T00:00:00.000Z", **params}
    assert backend["default"] == processor_totals(default, spelled), params
    assert backend["fallback"] == processor_totals(fallback, spelled), params


def wait_recorded(instance, expected: int, timeout: float = 30.0):
    def done():
        totals = backend_totals(instance)
        return totals["default"][0] + totals["fallback"][0] == expected

    wait_until(done, timeout, interval=0.05)


def test_concurrent_payments_match_processors_for_any_window(processors, start_instance):
    default, fallback = processors
    instance = start_instance(FALLBACK_AFTER_S="0.2")
    started_ms = time.time_ns() // 1_000_000
    statuses = post_payments(instance.url, 1500, concurrency=64)
    wait_recorded(instance, 1500)
    default.set_failure(True)  # then held 0.2 s and sent to the fallback
    statuses += post_payments(instance.url, 500, concurrency=64, amount="5.01")
    assert statuses.count(202) == 2000
    wait_recorded(instance, 2000)
    default.set_failure(False)
    ended_ms = time.time_ns() // 1_000_000
    assert processor_totals(default) == (1500, "29850.00")
    assert processor_totals(fallback) == (500, "2505.00")
    first_second = started_ms // 1000 * 1000
    middle = (started_ms + ended_ms) // 2 // 1000 * 1000
    windows = [
        None,
        {"from": iso(started_ms - 1000), "to": iso(ended_ms + 1000)},
        {"from": iso(first_second), "to": iso(first_second)},  # one instant on a second boundary
        {"from": iso(middle + 500), "to": iso(ended_ms)},  # cut inside a second
        {"from": iso(started_ms), "to": iso(middle + 999)},
        {"from": iso(middle + 1), "to": iso(middle + 1000)},  # excludes middle, includes middle+1
        {"to": iso(middle + 300)},
        {"from": iso(middle + 700)},
        {"from": iso(ended_ms + 5000), "to": iso(ended_ms + 9000)},  # nothing there
    ]
    for params in windows:
        assert_summaries_equal(instance, default, fallback, params)


def test_windows_at_any_precision_and_offset_match_the_processors(processors, start_instance):
    """The processors compare requestedAt at microsecond precision: a window that starts a
    microsecond after a whole second must leave that second out here too."""
    default, fallback = processors
    instance = start_instance()
    started = time.time_ns() // 1_000_000_000
    assert post_payments(instance.url, 300).count(202) == 300
    wait_recorded(instance, 300)
    ended = time.time_ns() // 1_000_000_000
    seconds = range(started, ended + 1)
    with_data = [s for s in seconds
                 if processor_totals(default, {"from": iso(s * 1000), "to": iso(s * 1000)})[0]]
    assert with_data
    for second in with_data:
        whole = iso(second * 1000)[:-1]  # "...T12:34:56.000"
        windows = [
            {"from": whole + "999Z", "to": iso((second + 1) * 1000)},  # .000999: after s
            {"from": whole + "001Z", "to": whole + "001Z"},  # .000001: after s
            {"from": iso(second * 1000 - 1000)[:-4] + "999999Z", "to": whole + "000Z"},
            {"from": whole + "Z", "to": whole + "999Z"},
        ]
        for params in windows:
            assert_summaries_equal(instance, default, fallback, params)
        # Nanosecond digits (beyond the emulator's microseconds): a second is in the window
        # iff from <= s.000000000 <= to, at the precision given.
        nanos = instance.summary({"from": whole + "000001Z"})
        later = instance.summary({"from": iso((second + 1) * 1000)})
        assert nanos == later
        # A "+hh:mm" offset, URL-encoded or not ("+" unencoded arrives as a space).
        local = datetime.fromtimestamp(second + 3 * 3600, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        exact = instance.summary({"from": whole + "Z", "to": whole + "Z"})
        encoded = httpx.get(f"{instance.url}/payments-summary?from={local}.000%2B03:00"
                            f"&to={local}.000%2B03:00", timeout=5)
        raw = httpx.get(f"{instance.url}/payments-summary?from={local}.000+03:00"
                        f"&to={local}.000+03:00", timeout=5)
        assert encoded.status_code == raw.status_code == 200, raw.text
        assert encoded.json() == raw.json() == exact
        assert exact["default"]["totalRequests"] > 0


def test_failing_default_holds_payments_then_sends_them_all_to_default(processors, start_instance):
    default, fallback = processors
    instance = start_instance()
    default.set_delay(100)
    default.set_failure(True)
    assert post_payments(instance.url, 300).count(202) == 300
    time.sleep(2)
    assert backend_totals(instance)["default"] == (0, "0.00")
    assert processor_totals(fallback) == (0, "0.00")
    default.set_failure(False)
    wait_recorded(instance, 300)
    assert processor_totals(default) == (300, "5970.00")
    assert processor_totals(fallback) == (0, "0.00")
    assert_summaries_equal(instance, default, fallback)


def test_long_outage_holds_8000_payments_and_delivers_them_after(processors, start_instance):
    default, fallback = processors
    instance = start_instance(QUEUE_MAX_MESSAGES="500")
    default.set_failure(True)
    statuses = post_payments(instance.url, 8000, concurrency=64)
    assert statuses.count(202) == 8000, {s: statuses.count(s) for s in set(statuses)}
    assert backend_totals(instance)["default"] == (0, "0.00")
    default.set_failure(False)
    wait_recorded(instance, 8000, timeout=60)
    assert processor_totals(default) == (8000, "159200.00")
    assert processor_totals(fallback) == (0, "0.00")


def test_a_backlog_drains_no_faster_than_drain_rate_per_s(processors, start_instance):
    """300 payments held through an outage go out at DRAIN_RATE_PER_S (100/s, bursts of 10),
    not all at once: no second of the processor's record holds more than that."""
    default, fallback = processors
    instance = start_instance(DRAIN_RATE_PER_S="100")
    default.set_failure(True)
    assert post_payments(instance.url, 300).count(202) == 300
    time.sleep(0.5)
    resumed = int(time.time())
    default.set_failure(False)
    wait_recorded(instance, 300)
    ended = int(time.time())
    per_second = [
        processor_totals(default, {"from": iso(s * 1000), "to": iso(s * 1000)})[0]
        for s in range(resumed, ended + 1)
    ]
    assert sum(per_second) == 300
    assert max(per_second) <= 100 + 10, per_second
    assert_summaries_equal(instance, default, fallback)


def test_fallback_only_after_the_configured_hold_time(processors, start_instance):
    """With FALLBACK_AFTER_S=2, no payment reaches the fallback before it was held 2 s: the
    fallback's record holds nothing in the two seconds the payments were posted in."""
    default, fallback = processors
    instance = start_instance(FALLBACK_AFTER_S="2")
    default.set_failure(True)
    posted = int(time.time())
    assert post_payments(instance.url, 50).count(202) == 50
    wait_recorded(instance, 50)
    assert processor_totals(fallback) == (50, "995.00")
    assert processor_totals(default) == (0, "0.00")
    early = {"from": iso(posted * 1000), "to": iso(posted * 1000 + 1999)}
    assert processor_totals(fallback, early) == (0, "0.00")
    assert_summaries_equal(instance, default, fallback)


def test_unknown_outcome_is_retried_on_the_same_processor_and_counted_once(
    processors, start_instance
):
    default, fallback = processors
    # Every first attempt times out, yet the processor stores it after its delay: the retry
    # must go to the same processor, get 422, and count the payment exactly once.
    default.set_delay(400)
    instance = start_instance(REQUEST_TIMEOUT_S="0.2", RETRY_BACKOFF_MIN_S="0.3",
                              RETRY_BACKOFF_MAX_S="0.6", FALLBACK_AFTER_S="0.1")
    assert post_payments(instance.url, 20).count(202) == 20
    wait_until(lambda: processor_totals(default)[0] == 20, 10)
    default.set_delay(0)
    wait_recorded(instance, 20)
    time.sleep(0.5)
    assert backend_totals(instance)["default"] == (20, "398.00")
    assert processor_totals(fallback) == (0, "0.00")
    assert_summaries_equal(instance, default, fallback)


BAD_PAYMENTS = [
    (b"", 400),
    (b"not json", 400),
    (b"[1, 2]", 400),
    (b'{"amount": 19.90}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"}', 422),
    (b'{"correlationId": 12, "amount": 19.90}', 422),
    (b'{"correlationId": "not-a-uuid", "amount": 19.90}', 422),
    (b'{"correlationId": "4a7901b87d264d9daa194dc1c7cf60b3", "amount": 19.90}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": "19.90"}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": true}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 0}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": -5}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": NaN}', 400),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": Infinity}', 400),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.901}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 1e400}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 1000000.01}', 422),
    (b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.90, "x": "'
     + b"a" * 5000 + b'"}', 413),
]


def test_bad_input_gets_a_4xx_json_message_and_changes_nothing(processors, start_instance):
    default, fallback = processors
    instance = start_instance(RINHA_ADMIN_TOKEN="s3cret")
    with httpx.Client(base_url=instance.url, timeout=5) as client:
        for body, status in BAD_PAYMENTS:
            response = client.post("/payments", content=body)
            assert response.status_code == status, body[:80]
            assert "error" in response.json(), body[:80]
        bad_queries = ("from=yesterday", "to=2025-13-45T00:00:00Z", "from=2025-07-10T12:34Z&to=x")
        for query in bad_queries:
            response = client.get(f"/payments-summary?{query}")
            assert response.status_code == 400, query
            assert "error" in response.json()
        assert client.get("/nowhere").status_code == 404
        assert client.delete("/payments").status_code == 405
        assert client.get("/payments").status_code == 405
        assert client.post("/payments-summary").status_code == 405
        assert client.post("/purge-payments").status_code == 401
        wrong_token = {"X-Rinha-Token": "wrong"}
        assert client.post("/purge-payments", headers=wrong_token).status_code == 401
    time.sleep(0.5)
    assert backend_totals(instance) == {"default": (0, "0.00"), "fallback": (0, "0.00")}
    assert processor_totals(default) == (0, "0.00")
    # The same instance still takes a good payment after all that.
    assert post_payments(instance.url, 1) == [202]
    wait_recorded(instance, 1)


def test_purge_empties_the_summary(processors, start_instance):
    instance = start_instance(RINHA_ADMIN_TOKEN="s3cret")
    assert post_payments(instance.url, 10).count(202) == 10
    wait_recorded(instance, 10)
    response = httpx.post(instance.url + "/purge-payments", headers={"X-Rinha-Token": "s3cret"})
    assert response.status_code == 200
    assert backend_totals(instance) == {"default": (0, "0.00"), "fallback": (0, "0.00")}


def test_queue_full_answers_503_never_a_silent_drop(processors, start_instance):
    default, _ = processors
    instance = start_instance(QUEUE_MAX_MESSAGES="10", HOLD_CAPACITY="16")
    default.set_failure(True)
    statuses = post_payments(instance.url, 200, concurrency=20)
    accepted = statuses.count(202)
    assert statuses.count(503) == 200 - accepted > 0
    default.set_failure(False)
    wait_recorded(instance, accepted)
    assert processor_totals(default)[0] == accepted


@pytest.mark.parametrize("during_outage", [False, True], ids=["healthy", "outage"])
def test_sigkilled_worker_and_dispatcher_come_back_and_nothing_is_lost(
    processors, start_instance, during_outage
):
    default, fallback = processors
    default.set_delay(50)
    instance = start_instance(DRAIN_RATE_PER_S="400")
    if during_outage:
        default.set_failure(True)
    accepted = post_payments(instance.url, 600).count(202)
    # Kill while payments are held (outage) or in flight (50 ms delay, paced drain).
    [dispatcher] = instance.child_pids("dispatch")
    worker = instance.child_pids("worker")[0]
    os.kill(dispatcher, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    # More load while they restart: some requests may fail at the client, none is lost.
    accepted += post_payments(instance.url, 600).count(202)
    # A SIGKILLed dispatcher exits only once it is scheduled, and under SCHED_IDLE on a busy
    # machine that can take a moment: wait for its successor, not just for a dispatcher.
    wait_until(lambda: len(instance.child_pids("worker")) == 2
               and instance.child_pids("dispatch") not in ([], [dispatcher]))
    [dispatcher] = instance.child_pids("dispatch")
    os.kill(dispatcher, signal.SIGKILL)
    accepted += post_payments(instance.url, 300).count(202)
    if during_outage:
        default.set_failure(False)
    wait_recorded(instance, accepted, timeout=60)
    time.sleep(0.5)
    assert processor_totals(default) == (accepted, f"{accepted * 19.90:.2f}")
    assert processor_totals(fallback) == (0, "0.00")
    assert_summaries_equal(instance, default, fallback)


def test_a_worker_killed_with_requests_in_flight_loses_no_accepted_payment(
    processors, start_instance
):
    """SIGKILL a worker in the middle of a load. Every 202 the clients got is counted, once;
    the only payments the clients do not know of are requests the dead worker had queued
    but not yet answered (at most one per client connection)."""
    import threading

    default, fallback = processors
    instance = start_instance(WORKERS="2")
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:  # batches until told to stop: requests are always in flight
        while not stop.is_set():
            statuses.extend(post_payments(instance.url, 200, concurrency=32))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: processor_totals(default)[0] > 300, 20)
        victim = instance.child_pids("worker")[0]
        # Stopped first, so that requests pile up on its connections, then killed with them.
        os.kill(victim, signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)  # the load goes on against the other worker and the replacement
    finally:
        stop.set()
        loader.join()
    accepted = statuses.count(202)
    assert accepted > 300 and statuses.count(0) > 0  # some requests died with the worker
    wait_until(lambda: instance.child_pids("worker") and victim not in instance.child_pids(
        "worker"))
    settled: list[int] = []

    def quiet() -> bool:
        settled.append(processor_totals(default)[0])
        return len(settled) > 2 and settled[-1] == settled[-3]

    wait_until(quiet, 30, interval=0.3)
    processed = processor_totals(default)[0]
    assert accepted <= processed <= accepted + 32
    assert_summaries_equal(instance, default, fallback)
