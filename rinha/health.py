"""The shared poller of the processors' service-health endpoint.

Runs as a task in the dispatcher of the one instance configured with HEALTH_POLL=1. The
endpoint allows ONE call per 5 s per processor for all callers together (docs/contest.md), so
only one instance polls and its reports reach the other through peer sync
(docs/architecture.md, invariant 5).
Reports are hints for routing; live payment outcomes stay the primary signal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import orjson

from rinha.ledger import DEFAULT, FALLBACK
from rinha.settings import Settings

log = logging.getLogger("rinha.health")


@dataclass(frozen=True, slots=True)
class HealthReport:
    processor: int
    failing: bool
    min_response_ms: int


def parse_report(processor: int, body: bytes) -> HealthReport | None:
    try:
        document = orjson.loads(body)
        failing = document["failing"]
        min_response = document["minResponseTime"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    # bool is an int to isinstance: `"minResponseTime": true` is not a number of milliseconds.
    if not isinstance(failing, bool) or type(min_response) is not int:
        return None
    return HealthReport(processor, failing, min_response)


class HealthPoller:
    """Polls each processor in `processors` every `interval_s` (at least 5 s)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: Sequence[str],
        processors: Sequence[int],
        interval_s: float,
        on_report: Callable[[HealthReport], None],
    ) -> None:
        self._client = client
        self._urls = urls
        self._processors = processors
        self._interval_s = interval_s
        self._on_report = on_report

    @classmethod
    def configured(cls, settings: Settings, transport: httpx.AsyncBaseTransport,
                   on_report: Callable[[HealthReport], None]) -> HealthPoller | None:
        """The poller of an instance with HEALTH_POLL=1 (else None): the default processor,
        and the fallback too when payments may go there (FALLBACK_AFTER_S > 0)."""
        if not settings.health_poll:
            return None
        watched = [DEFAULT] if settings.fallback_after_s <= 0 else [DEFAULT, FALLBACK]
        client = httpx.AsyncClient(transport=transport, timeout=5.0)
        return cls(client, settings.processor_urls, watched, settings.health_interval_s,
                   on_report)

    async def run(self) -> None:
        while True:
            for processor in self._processors:
                report = await self.poll_once(processor)
                if report is not None:
                    self._on_report(report)
            await asyncio.sleep(self._interval_s)

    async def poll_once(self, processor: int) -> HealthReport | None:
        url = f"{self._urls[processor]}/payments/service-health"
        try:
            response = await self._client.get(url)
        except httpx.HTTPError as exc:
            log.debug("health of processor %d: %r", processor, exc)
            return None
        if response.status_code != 200:
            # 429: someone else used this 5 s window; the next poll will do.
            return None
        return parse_report(processor, response.content)
