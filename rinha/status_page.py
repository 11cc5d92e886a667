"""What an operator reads: GET /health, GET /status and GET /metrics of one instance.

Runs in the workers, from shared memory only (the metrics and heartbeat segments, the holding
table, the ledger, the queue's attributes): answering never asks the dispatcher or the
supervisor anything, so a hung dispatcher cannot hang its own status page. Through nginx these
reach one instance at a time: read each instance on its own port (`rinha status` does, for a
running `rinha stack`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from rinha import metrics as m
from rinha.ledger import OWN, PROCESSOR_NAMES
from rinha.resources import Resources
from rinha.settings import Settings
from rinha.wire import format_cents

# /health says 503 when the dispatcher's loop has not turned for this long (wall time: a
# dispatcher starved under its quota that long cannot keep up either).
DISPATCHER_SILENT_S = 5.0
_REFUSALS = {400: "unreadable_body", 413: "too_large", 422: "invalid_field", 503: "queue_full"}


class StatusPage:
    def __init__(self, settings: Settings, resources: Resources) -> None:
        self._settings = settings
        self._resources = resources
        self._metrics = resources.metrics
        self._registry: Any = None  # the Prometheus registry, built at the first /metrics

    # GET /health ----------------------------------------------------------------------------

    def health(self) -> tuple[int, bytes]:
        """200 while this instance can take payments: its dispatcher turns its loop and its
        queue has room; 503 with the reason otherwise."""
        problems = []
        beat = self._resources.heartbeats.last(self._settings.workers)
        silent_s = (time.monotonic_ns() - beat) / 1e9 if beat else None
        if silent_s is None or silent_s > DISPATCHER_SILENT_S:
            problems.append("the dispatcher is not running" if silent_s is None else
                            f"the dispatcher has been silent for {silent_s:.1f} s")
        queue = self._resources.queue
        if queue.current_messages >= queue.max_messages:
            problems.append("the queue is full")
        if problems:
            return 503, orjson.dumps({"status": "unavailable", "reasons": problems})
        return 200, b'{"status":"ok"}'

    # GET /status ----------------------------------------------------------------------------

    def status(self) -> bytes:
        return orjson.dumps(self.document())

    def document(self) -> dict[str, Any]:
        words = self._metrics.words
        dispatcher = m.DISPATCHER_BLOCK * m.BLOCK_WORDS
        supervisor = m.SUPERVISOR_BLOCK * m.BLOCK_WORDS
        payments_row = self._payments_row()
        accepted = payments_row[m.STATUS_INDEX[202]]
        recorded = sum(words[dispatcher + m.RECORDED + p] for p in (0, 1))
        duplicates = sum(words[dispatcher + m.DUPLICATES + p] for p in (0, 1))
        held = self._resources.table.depth()
        in_queue = self._resources.queue.current_messages
        in_flight, waiting, pinned, parked = words[dispatcher + m.GAUGES:dispatcher + m.GAUGES + 4]
        started_ms = words[supervisor + m.STARTED_AT]
        mirrors = self._resources.ledger.mirrors()
        return {
            "instance": self._settings.instance_name,
            "startedAt": _iso(started_ms),
            "uptimeSeconds": round((m.now_ms() - started_ms) / 1000, 1) if started_ms else None,
            "processors": {name: self._processor(p, dispatcher)
                           for p, name in enumerate(PROCESSOR_NAMES)},
            "queue": {"depth": in_queue, "capacity": self._resources.queue.max_messages},
            "payments": {"held": held, "inFlight": in_flight, "waiting": waiting,
                         "pinned": pinned, "parkedBehindSameId": parked,
                         "tableCapacity": self._resources.table.capacity},
            "recorded": {"own": self._totals(OWN),
                         "mirrored": self._totals(*mirrors.values())},
            "sync": self._sync(dispatcher, mirrors),
            "children": [
                {"role": role, "pid": words[supervisor + m.CHILD_PIDS + slot] or None,
                 "restarts": words[supervisor + m.CHILD_RESTARTS + slot]}
                for slot, role in self._children()
            ],
            # Every payment answered 202 here is, at any moment, exactly one of these.
            "conservation": {
                "accepted": accepted,
                "recorded": recorded,
                "refusedAsDuplicates": duplicates,
                "heldInTable": held,
                "inKernelQueue": in_queue,
                "difference": accepted - recorded - duplicates - held - in_queue,
            },
        }

    def _processor(self, processor: int, dispatcher: int) -> dict[str, Any]:
        words = self._metrics.words
        polled_at, failing, min_ms = words[dispatcher + m.HEALTH + processor * 3:
                                           dispatcher + m.HEALTH + processor * 3 + 3]
        state, since_ms, failures = words[dispatcher + m.CIRCUITS + processor * 3:
                                          dispatcher + m.CIRCUITS + processor * 3 + 3]
        return {
            "url": self._settings.processor_urls[processor],
            "health": {"polledAt": _iso(polled_at), "failing": bool(failing) if polled_at
                       else None, "minResponseTime": min_ms if polled_at else None},
            "circuit": {"state": m.CIRCUIT_STATES[state], "since": _iso(since_ms),
                        "consecutiveFailures": failures},
        }

    def _sync(self, dispatcher: int, mirrors: dict[str, int]) -> dict[str, Any] | None:
        """How this instance hears of the others: the carrier, its counters, and one entry per
        instance it mirrors (every one it has heard of since its ledger was made)."""
        settings, words = self._settings, self._metrics.words
        if settings.sync_url is not None:
            carrier, to = "redis", _without_password(settings.sync_url)
        elif settings.sync_peers:
            carrier, to = "udp", [f"{host}:{port}" for host, port in settings.sync_peers]
        else:
            return None
        peers = []
        for name, region in sorted(mirrors.items()):
            heard = received = 0
            if region < m.PEER_SLOTS:
                base = dispatcher + m.SYNC_PEERS + 2 * region
                received, heard = words[base], words[base + 1]
            peers.append({"instance": name, "lastHeard": _iso(heard),
                          "messagesReceived": received, "recorded": self._totals(region)})
        return {
            "carrier": carrier,
            "to": to,
            "lastHeard": _iso(words[dispatcher + m.SYNC_HEARD_AT]),
            "messagesSent": words[dispatcher + m.SYNC_SENT],
            "messagesReceived": words[dispatcher + m.SYNC_RECEIVED],
            "droppedNotFromPeer": words[dispatcher + m.SYNC_FOREIGN],
            "droppedMalformed": words[dispatcher + m.SYNC_MALFORMED],
            "peers": peers,
        }

    def _totals(self, *regions: int) -> dict[str, dict[str, Any]]:
        d_count = d_cents = f_count = f_cents = 0
        for region in regions:
            totals = self._resources.ledger.region_summary(region, None, None)
            d_count, d_cents = d_count + totals[0], d_cents + totals[1]
            f_count, f_cents = f_count + totals[2], f_cents + totals[3]
        return {"default": {"totalRequests": d_count, "totalAmount": float(format_cents(d_cents))},
                "fallback": {"totalRequests": f_count,
                             "totalAmount": float(format_cents(f_cents))}}

    def _children(self) -> Iterator[tuple[int, str]]:
        for worker in range(self._settings.workers):
            yield worker, f"worker{worker}"
        yield self._settings.workers, "dispatch"

    def _payments_row(self) -> list[int]:
        offset = m.REQUESTS + m.ROUTE_INDEX["POST /payments"] * len(m.STATUSES)
        return self._metrics.sum_workers(offset, len(m.STATUSES))

    # GET /metrics ---------------------------------------------------------------------------

    def prometheus(self) -> bytes:
        """The Prometheus text format, built by prometheus_client from a custom collector over
        the shared counters (nothing is registered per request)."""
        from prometheus_client import generate_latest  # imported at the first scrape only

        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
        return generate_latest(self._registry)


class _Collector:
    """prometheus_client's custom-collector protocol: collect() yields metric families."""

    def __init__(self, page: StatusPage) -> None:
        self._page = page

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        page = self._page
        words = page._metrics.words
        dispatcher = m.DISPATCHER_BLOCK * m.BLOCK_WORDS
        supervisor = m.SUPERVISOR_BLOCK * m.BLOCK_WORDS
        requests = page._metrics.sum_workers(m.REQUESTS, len(m.ROUTES) * len(m.STATUSES))

        family = CounterMetricFamily("rinha_http_requests", "HTTP requests answered, by route "
                                     "and status", labels=["route", "status"])
        for r, route in enumerate(m.ROUTES):
            for s, status in enumerate(m.STATUSES):
                value = requests[r * len(m.STATUSES) + s]
                if value:
                    family.add_metric([route, str(status) if status else "other"], value)
        yield family

        row = page._payments_row()
        yield CounterMetricFamily("rinha_payments_accepted", "Payments answered 202 (queued)",
                                  value=row[m.STATUS_INDEX[202]])
        family = CounterMetricFamily("rinha_payments_refused", "POST /payments refused, by "
                                     "reason", labels=["reason"])
        for status, reason in _REFUSALS.items():
            family.add_metric([reason], row[m.STATUS_INDEX[status]])
        yield family

        for name, offset, text in (("rinha_payments_recorded", m.RECORDED,
                                    "Payments a processor stored and this instance counted"),
                                   ("rinha_payments_duplicates", m.DUPLICATES,
                                    "Payments refused: the processor holds another one with "
                                    "their correlationId")):
            family = CounterMetricFamily(name, text, labels=["processor"])
            for p, processor in enumerate(PROCESSOR_NAMES):
                family.add_metric([processor], words[dispatcher + offset + p])
            yield family

        family = CounterMetricFamily("rinha_processor_replies", "Processor answers to POST "
                                     "/payments, by class", labels=["processor", "class"])
        for p, processor in enumerate(PROCESSOR_NAMES):
            for c, reply_class in enumerate(m.REPLY_CLASSES):
                family.add_metric([processor, reply_class],
                                  words[dispatcher + m.REPLIES + p * len(m.REPLY_CLASSES) + c])
        yield family

        family = HistogramMetricFamily("rinha_processor_request_seconds", "Round trip of a "
                                       "request to a processor", labels=["processor"])
        width = len(m.RTT_BUCKETS_S) + 3
        for p, processor in enumerate(PROCESSOR_NAMES):
            base = dispatcher + m.RTT + p * width
            cells = words[base:base + width]
            cumulative, buckets = 0, []
            for bound, count in zip((*m.RTT_BUCKETS_S, float("inf")), cells, strict=False):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([processor], buckets, sum_value=cells[-2] / 1e6)
        yield family

        in_flight, waiting, pinned, parked = words[dispatcher + m.GAUGES:dispatcher + m.GAUGES + 4]
        for name, value, text in (
            ("rinha_payments_held", page._resources.table.depth(),
             "Payments accepted and not yet settled (the holding table)"),
            ("rinha_payments_in_flight", in_flight, "Requests out to the processors"),
            ("rinha_payments_pinned", pinned, "Payments waiting for their own processor"),
            ("rinha_payments_waiting", waiting, "Payments waiting for any processor"),
            ("rinha_queue_depth", page._resources.queue.current_messages,
             "Records in the kernel queue between the workers and the dispatcher"),
        ):
            yield GaugeMetricFamily(name, text, value=value)

        family = GaugeMetricFamily("rinha_processor_failing", "What the last service-health "
                                   "poll said (1: failing)", labels=["processor"])
        state = GaugeMetricFamily("rinha_circuit_state", "1 for the state the dispatcher "
                                  "believes the processor in", labels=["processor", "state"])
        for p, processor in enumerate(PROCESSOR_NAMES):
            family.add_metric([processor], words[dispatcher + m.HEALTH + p * 3 + 1])
            current = words[dispatcher + m.CIRCUITS + p * 3]
            for s, name in enumerate(m.CIRCUIT_STATES):
                state.add_metric([processor, name], int(s == current))
        yield family
        yield state

        family = CounterMetricFamily("rinha_sync_datagrams", "Peer sync datagrams",
                                     labels=["direction"])
        family.add_metric(["sent"], words[dispatcher + m.SYNC_SENT])
        family.add_metric(["received"], words[dispatcher + m.SYNC_RECEIVED])
        yield family
        family = CounterMetricFamily("rinha_sync_datagrams_dropped", "Sync datagrams dropped "
                                     "on arrival", labels=["reason"])
        family.add_metric(["not_from_peer"], words[dispatcher + m.SYNC_FOREIGN])
        family.add_metric(["malformed"], words[dispatcher + m.SYNC_MALFORMED])
        yield family
        received = CounterMetricFamily("rinha_sync_peer_messages_received", "Sync messages "
                                       "received from each other instance", labels=["instance"])
        heard = GaugeMetricFamily("rinha_sync_peer_last_heard_timestamp_seconds", "When each "
                                  "other instance was last heard of (0: never)",
                                  labels=["instance"])
        for name, region in sorted(page._resources.ledger.mirrors().items()):
            if region < m.PEER_SLOTS:
                base = dispatcher + m.SYNC_PEERS + 2 * region
                received.add_metric([name], words[base])
                heard.add_metric([name], words[base + 1] / 1000)
        yield received
        yield heard

        family = CounterMetricFamily("rinha_child_restarts", "Children the supervisor replaced",
                                     labels=["child"])
        for slot, role in page._children():
            family.add_metric([role], words[supervisor + m.CHILD_RESTARTS + slot])
        yield family


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + \
        (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _iso(unix_ms: int) -> str | None:
    if not unix_ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_ms // 1000)) + \
        f".{unix_ms % 1000:03d}Z"
