"""health.py: what a service-health answer is taken to say, who polls which processor, and a
poll against a real emulator (tests/unit/test_dispatcher_replies.py drives the poller inside a
dispatcher)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from rinha.health import HealthPoller, HealthReport, parse_report
from rinha.ledger import DEFAULT, FALLBACK
from rinha.settings import load as load_settings


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"failing": false, "minResponseTime": 0}', HealthReport(DEFAULT, False, 0)),
        (b'{"failing": true, "minResponseTime": 1500}', HealthReport(DEFAULT, True, 1500)),
        (b'{"failing": true, "minResponseTime": 2000}', HealthReport(DEFAULT, True, 2000)),
        (b'{"minResponseTime": 7, "failing": false, "extra": 1}', HealthReport(DEFAULT, False, 7)),
        (b'{"failing": false}', None),
        (b'{"minResponseTime": 3}', None),
        (b'{"failing": "false", "minResponseTime": 0}', None),
        (b'{"failing": 0, "minResponseTime": 0}', None),
        (b'{"failing": false, "minResponseTime": 2.5}', None),
        (b'{"failing": false, "minResponseTime": "5"}', None),
        (b'{"failing": false, "minResponseTime": true}', None),
        (b'[false, 0]', None),
        (b'null', None),
        (b'', None),
        (b'{"failing": false, "minResponseTime": 0', None),
        (b'{"failing": "yes", "minResponseTime": 0}', None),
        (b'{"failing": false, "minResponseTime": 1.5}', None),
        (b'[]', None),
        (b'not json', None),
    ],
)
def test_parse_report(body: bytes, expected: HealthReport | None) -> None:
    assert parse_report(DEFAULT, body) == expected


def test_a_report_names_the_processor_it_was_asked_of() -> None:
    body = b'{"failing": true, "minResponseTime": 12}'
    assert parse_report(FALLBACK, body) == HealthReport(FALLBACK, True, 12)


def settings(**env: str):
    base = {"PROCESSOR_DEFAULT_URL": "http://127.0.0.1:1", "PROCESSOR_FALLBACK_URL":
            "http://127.0.0.1:2"}
    return load_settings({**base, **env})


@pytest.mark.parametrize(
    ("env", "watched"),
    [
        ({"HEALTH_POLL": "0"}, None),
        ({"HEALTH_POLL": "0", "FALLBACK_AFTER_S": "2"}, None),
        ({"HEALTH_POLL": "1", "FALLBACK_AFTER_S": "0"}, [DEFAULT]),
        ({"HEALTH_POLL": "1", "FALLBACK_AFTER_S": "0.001"}, [DEFAULT, FALLBACK]),
        ({"HEALTH_POLL": "1", "FALLBACK_AFTER_S": "2"}, [DEFAULT, FALLBACK]),
    ],
)
def test_only_a_polling_instance_has_a_poller_and_it_watches_the_fallback_only_if_used(
    env: dict[str, str], watched: list[int] | None
) -> None:
    poller = HealthPoller.configured(settings(**env), httpx.AsyncHTTPTransport(), print)
    if watched is None:
        assert poller is None
        return
    assert poller is not None
    assert list(poller._processors) == watched
    assert poller._interval_s == 5.0


def test_a_poll_reads_each_processor_s_own_answer(processors) -> None:
    default, fallback = processors
    default.set_failure(True)
    default.set_delay(40)
    configured = settings(HEALTH_POLL="1", FALLBACK_AFTER_S="1",
                          PROCESSOR_DEFAULT_URL=default.url,
                          PROCESSOR_FALLBACK_URL=fallback.url)

    async def polls() -> list[HealthReport | None]:
        poller = HealthPoller.configured(configured, httpx.AsyncHTTPTransport(), print)
        assert poller is not None
        return [await poller.poll_once(DEFAULT), await poller.poll_once(FALLBACK)]

    assert asyncio.run(polls()) == [HealthReport(DEFAULT, True, 40),
                                    HealthReport(FALLBACK, False, 0)]


def test_a_processor_that_does_not_answer_is_no_report() -> None:
    configured = settings(HEALTH_POLL="1", PROCESSOR_DEFAULT_URL="http://127.0.0.1:9")

    async def poll() -> HealthReport | None:
        poller = HealthPoller.configured(configured, httpx.AsyncHTTPTransport(), print)
        assert poller is not None
        return await poller.poll_once(DEFAULT)

    assert asyncio.run(poll()) is None
