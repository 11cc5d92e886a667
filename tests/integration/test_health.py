"""The shared service-health poll: one instance polls (at most one call per 5 s for the pair,
the processors' limit), the other learns from it over the sync channel."""

from __future__ import annotations

import asyncio
import time

import httpx

from rinha.health import HealthPoller, HealthReport
from rinha.ledger import DEFAULT
from tests.processes import Emulator, Instance, peered_pair, post_payments, wait_until


def test_the_poller_reads_what_the_processor_says_and_respects_its_rate_limit(processors):
    default, _ = processors
    default.set_failure(True)
    default.set_delay(120)
    reports: list[HealthReport] = []

    async def poll_twice() -> tuple[HealthReport | None, HealthReport | None]:
        async with httpx.AsyncClient(timeout=10) as client:
            poller = HealthPoller(client, [default.url, default.url], [DEFAULT], 5,
                                  reports.append)
            first = await poller.poll_once(DEFAULT)
            # A second call in the same 5 s window is queued by the processor until the next
            # window opens: the answer then still says what the processor says.
            second = await poller.poll_once(DEFAULT)
            return first, second

    first, second = asyncio.run(poll_twice())
    assert first == HealthReport(DEFAULT, True, 120)
    assert second == HealthReport(DEFAULT, True, 120)
    assert default.counters()["serviceHealthCalls"] == 2


def test_only_the_polling_instance_calls_service_health_at_most_once_per_5_s(processors):
    default, fallback = processors
    started = time.monotonic()
    first, second = peered_pair(default, fallback)
    try:
        wait_until(lambda: default.counters()["serviceHealthCalls"] >= 2, 15)
        time.sleep(2)
        calls = default.counters()["serviceHealthCalls"]
        elapsed = time.monotonic() - started
        assert 2 <= calls <= elapsed / 5 + 1, (calls, elapsed)
        # The fallback is not watched while FALLBACK_AFTER_S is 0: nothing would go there.
        assert fallback.counters()["serviceHealthCalls"] == 0
    finally:
        first.stop()
        second.stop()


def test_an_instance_with_health_poll_0_never_calls_service_health(processors):
    default, fallback = processors
    instance = Instance(default, fallback, HEALTH_POLL="0").wait_ready()
    try:
        time.sleep(6)  # longer than one poll interval
        assert default.counters()["serviceHealthCalls"] == 0
        assert fallback.counters()["serviceHealthCalls"] == 0
    finally:
        instance.stop()


def test_the_shared_health_report_lets_the_other_instance_resume_without_waiting_its_backoff():
    """api2 does not poll. While the default fails, api2's next probe waits its long backoff
    (60 s); api1's poll sees the recovery within one interval and shares it, which invites
    api2 to probe at once."""
    default, fallback = Emulator(0.05), Emulator(0.15)
    first, second = peered_pair(default, fallback, RETRY_BACKOFF_MIN_S="60",
                                RETRY_BACKOFF_MAX_S="120")
    try:
        default.set_failure(True)
        assert post_payments(second.url, 20).count(202) == 20
        wait_until(lambda: "processor default failing" in second.log(), 10)
        default.set_failure(False)
        wait_until(lambda: default.summary()["totalRequests"] == 20, 25)
        assert second.summary()["default"]["totalRequests"] == 20
    finally:
        first.stop()
        second.stop()
        default.stop()
        fallback.stop()
