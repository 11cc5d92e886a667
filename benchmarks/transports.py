"""CPU cost per request of the httpx transports the dispatcher could use.

Runs in its own processes, outside rinha: a minimal keep-alive HTTP server (pinned to CPU 1)
answers each POST after --delay-ms, so ~rate * delay requests are in flight, as when a payment
processor adds latency. Each client runs in a fresh subprocess pinned to CPU 0 and drives an
OPEN-LOOP load: request i is fired at start + i / rate whatever happened to earlier requests,
and its latency is measured from that scheduled time.

    python benchmarks/transports.py [--rate 550] [--seconds 10] [--delay-ms 90] [--repeat 3]
                                    [--clients a,b] [--json PATH]

CPU per request = the client process's user+sys CPU (getrusage) over the measured window,
divided by the requests completed in that window. The `harness` row is the same driver with
`await asyncio.sleep(delay)` instead of a request: what every row pays before any HTTP.
Every client gets the same pool size (64 connections, all kept alive; httpx's default would
keep only 20 alive and churn connections at 50 in flight). sniffio is installed here; for
`httpx-default` the client hides it with a meta-path finder that fails `import sniffio` after
the same sys.path search a missing package costs, as in an image without sniffio.
On a shared machine, watch the other% column and use --repeat: the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import importlib.machinery
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rinha_lab.launcher import Launched  # noqa: E402

CLIENTS = {
    "harness": "no HTTP: asyncio.sleep(delay) instead of a request (driver baseline)",
    "httpx-default": "httpx.AsyncClient, default transport, sniffio hidden (as not installed)",
    "httpx-default+sniffio": "httpx.AsyncClient, default transport, sniffio importable",
    "httpx-aiohttp": "httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...))",
    "httpx-pooled": "httpx.AsyncClient(transport=PooledTransport())",
    "pooled-direct": "PooledTransport.handle_async_request(httpx.Request(...)) per payment, "
                     "prebuilt URL and Headers",
    "pooled-direct-prebuilt": "PooledTransport.handle_async_request(one prebuilt httpx.Request)",
}
MAX_CONNECTIONS = 64
SERVER_CPU = 1
CLIENT_CPU = 0


# ---------------------------------------------------------------- server process

class _ServerProtocol(asyncio.Protocol):
    stats = {"connections": 0, "requests": 0}

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self._transport = transport
        self.stats["connections"] += 1

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        loop = asyncio.get_running_loop()
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                stop = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17:stop if stop >= 0 else None])
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            if head.startswith(b"get /stats"):
                self._reply(json.dumps(self.stats).encode())
            else:
                self.stats["requests"] += 1
                loop.call_later(self._delay_s, self._reply, b'{"message":"payment processed"}')
        self._buf = buf

    def _reply(self, body: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


def serve(delay_ms: float) -> None:
    _pin(SERVER_CPU)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _ServerProtocol(delay_ms / 1000), "127.0.0.1",
                                          0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def server_stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += sock.recv(4096)
    return json.loads(data[data.index(b"\r\n\r\n") + 4:])


# ---------------------------------------------------------------- client process

class _HideSniffio(importlib.abc.MetaPathFinder):
    """Make `import sniffio` fail as if it were not installed, at the same lookup cost.

    httpcore runs `import sniffio` inside current_async_library() on every lock, event and
    cancellation shield it sets up, so "not installed" means a failed path search each time.
    """

    attempts = 0

    def find_spec(self, name, path, target=None):
        if name != "sniffio":
            return None
        type(self).attempts += 1
        importlib.machinery.PathFinder.find_spec(name, path, target)  # the search a miss costs
        raise ModuleNotFoundError("No module named 'sniffio' (hidden by the benchmark)",
                                  name=name)


def _make_sender(name: str, url: str, bodies: list[bytes], delay_s: float):
    """Return (send(i) -> awaitable status, aclose) for one client kind."""
    headers = {"Content-Type": "application/json"}
    if name == "harness":
        async def send(i):
            await asyncio.sleep(delay_s)
            return 200

        async def aclose():
            return None

        return send, aclose

    import httpx

    limits = httpx.Limits(max_connections=MAX_CONNECTIONS,
                          max_keepalive_connections=MAX_CONNECTIONS)
    if name.startswith("httpx-"):
        if name.startswith("httpx-default"):
            client = httpx.AsyncClient(limits=limits)
        elif name == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport
            client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits))
        else:
            from rinha.transport import PooledTransport
            client = httpx.AsyncClient(
                transport=PooledTransport(max_connections=MAX_CONNECTIONS))

        async def send(i):
            response = await client.post(url, content=bodies[i], headers=headers)
            return response.status_code

        return send, client.aclose

    from rinha.transport import PooledTransport
    transport = PooledTransport(max_connections=MAX_CONNECTIONS)
    prebuilt_url = httpx.URL(url)
    prebuilt_headers = httpx.Headers(headers)
    if name == "pooled-direct":
        async def send(i):
            request = httpx.Request("POST", prebuilt_url, headers=prebuilt_headers,
                                    content=bodies[i])
            response = await transport.handle_async_request(request)
            return response.status_code
    else:
        request = httpx.Request("POST", prebuilt_url, headers=prebuilt_headers,
                                content=bodies[0])

        async def send(i):
            response = await transport.handle_async_request(request)
            return response.status_code

    return send, transport.aclose


async def _drive(send, rate: float, warmup_s: float, seconds: float, delay_s: float) -> dict:
    loop = asyncio.get_running_loop()
    interval = 1 / rate
    total = int(rate * (warmup_s + seconds))
    start = loop.time() + 0.05
    window_start = start + warmup_s
    window_end = window_start + seconds
    latencies: list[float] = []
    errors: dict[str, int] = {}
    completed = [0]
    usage: dict[str, resource.struct_rusage] = {}
    pending: set[asyncio.Task] = set()

    def snapshot(label: str) -> None:
        usage[label] = resource.getrusage(resource.RUSAGE_SELF)

    loop.call_at(window_start, snapshot, "start")
    loop.call_at(window_end, snapshot, "end")

    given_up = [False]

    async def one(scheduled: float, i: int) -> None:
        try:
            status = await send(i)
            if not 200 <= status < 300:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
        except Exception as exc:  # every failure is a data point, not a crash
            if given_up[0]:
                return  # torn down by aclose() after the drain deadline: counted as unfinished
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        done = loop.time()
        if window_start <= done < window_end:
            completed[0] += 1
        if window_start <= scheduled < window_end:
            latencies.append(done - scheduled - delay_s)

    i = 0
    while i < total:
        wait = start + i * interval - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        now = loop.time()
        while i < total and start + i * interval <= now:
            task = loop.create_task(one(start + i * interval, i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
    while loop.time() < window_end + 0.01:
        await asyncio.sleep(window_end + 0.01 - loop.time())
    if pending:
        await asyncio.wait(pending, timeout=delay_s + 5)
    unfinished = len(pending)
    given_up[0] = True

    cpu_s = ((usage["end"].ru_utime + usage["end"].ru_stime)
             - (usage["start"].ru_utime + usage["start"].ru_stime))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies \
            else float("nan")

    n = completed[0] or float("nan")
    return {
        "cpu_us_per_request": cpu_s / n * 1e6,
        "user_us_per_request": (usage["end"].ru_utime - usage["start"].ru_utime) / n * 1e6,
        "sys_us_per_request": (usage["end"].ru_stime - usage["start"].ru_stime) / n * 1e6,
        "voluntary_switches_per_request": (usage["end"].ru_nvcsw - usage["start"].ru_nvcsw) / n,
        "cpu_percent": cpu_s / seconds * 100,
        "achieved_rate": completed[0] / seconds,
        "completed": completed[0],
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "unfinished": unfinished,
        "p50_ms_over_delay": pct(0.50),
        "p99_ms_over_delay": pct(0.99),
        "max_ms_over_delay": latencies[-1] * 1000 if latencies else float("nan"),
    }


def run_client(name: str, port: int, rate: float, seconds: float, warmup_s: float,
               delay_ms: float) -> None:
    _pin(CLIENT_CPU)
    if name == "httpx-default":
        sys.meta_path.insert(0, _HideSniffio())
    url = f"http://127.0.0.1:{port}/payments"
    total = int(rate * (warmup_s + seconds)) + 1
    bodies = [b'{"correlationId":"%08d-7d26-4d9d-aa19-4dc1c7cf60b3","amount":19.9,'
              b'"requestedAt":"2025-07-15T12:34:56.000Z"}' % i for i in range(total)]

    async def main() -> dict:
        send, aclose = _make_sender(name, url, bodies, delay_ms / 1000)
        try:
            return await _drive(send, rate, warmup_s, seconds, delay_ms / 1000)
        finally:
            await aclose()

    result = asyncio.run(main())
    result["sniffio_importable"] = _sniffio_importable()
    if name == "httpx-default":
        result["sniffio_import_attempts_per_request"] = (
            _HideSniffio.attempts / max(1, int(rate * (warmup_s + seconds))))
    print(json.dumps(result), flush=True)


def _sniffio_importable() -> bool:
    try:
        import sniffio  # noqa: F401
    except ImportError:
        return False
    return True


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------- parent

def _cpu_busy_s(cpu: int) -> float:
    """Busy seconds of one CPU since boot, from /proc/stat (NaN where unavailable)."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith(f"cpu{cpu} "):
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (
                        int(field) for field in line.split()[1:9])
                    return (user + nice + system + irq + softirq + steal) / os.sysconf(
                        "SC_CLK_TCK")
    except OSError:
        pass
    return float("nan")


NUMERIC = ("cpu_us_per_request", "user_us_per_request", "sys_us_per_request",
           "voluntary_switches_per_request", "cpu_percent", "achieved_rate", "p50_ms_over_delay",
           "p99_ms_over_delay", "max_ms_over_delay", "connections_opened",
           "foreign_cpu_percent")


def run_client_process(name: str, port: int, args: argparse.Namespace, pinned: bool) -> dict:
    """Run one client in a fresh subprocess; return its result plus what the parent saw."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = server_stats(port)
    busy_before, wall_before = _cpu_busy_s(CLIENT_CPU), time.monotonic()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--client", name, "--port", str(port),
         "--rate", str(args.rate), "--seconds", str(args.seconds),
         "--warmup-s", str(args.warmup_s), "--delay-ms", str(args.delay_ms)],
        capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client {name} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    wall_s = time.monotonic() - wall_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu_s = ((children_after.ru_utime + children_after.ru_stime)
                    - (children_before.ru_utime + children_before.ru_stime))
    result["foreign_cpu_percent"] = (
        (_cpu_busy_s(CLIENT_CPU) - busy_before - client_cpu_s) / wall_s * 100
        if pinned else float("nan"))
    # The stats query itself opens one connection.
    result["connections_opened"] = server_stats(port)["connections"] - before["connections"] - 1
    return result


def summarize(name: str, runs: list[dict], harness_cpu_us: float | None) -> dict:
    """Median of each metric over the repeats; errors and unfinished summed."""
    row = {"client": name, "description": CLIENTS[name], "runs": runs}
    for key in NUMERIC:
        row[key] = statistics.median(run[key] for run in runs)
    row["cpu_us_min"] = min(run["cpu_us_per_request"] for run in runs)
    row["cpu_us_max"] = max(run["cpu_us_per_request"] for run in runs)
    row["errors"] = sum(run["errors"] for run in runs)
    row["unfinished"] = sum(run["unfinished"] for run in runs)
    row["error_kinds"] = {}
    for run in runs:
        for kind, count in run["error_kinds"].items():
            row["error_kinds"][kind] = row["error_kinds"].get(kind, 0) + count
    row["net_cpu_us_per_request"] = (row["cpu_us_per_request"] - harness_cpu_us
                                     if harness_cpu_us is not None else float("nan"))
    for key in ("sniffio_importable", "sniffio_import_attempts_per_request"):
        if key in runs[0]:
            row[key] = runs[0][key]
    return row


def _table(rows: list[dict]) -> str:
    header = (f"{'client':<24}{'CPU us/req':>11}{'(min-max)':>14}{'net us':>8}{'CPU %':>7}"
              f"{'rate/s':>8}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'conns':>7}"
              f"{'other%':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        spread = f"({row['cpu_us_min']:.0f}-{row['cpu_us_max']:.0f})"
        lines.append(
            f"{row['client']:<24}{row['cpu_us_per_request']:>11.0f}{spread:>14}"
            f"{row['net_cpu_us_per_request']:>8.0f}{row['cpu_percent']:>7.1f}"
            f"{row['achieved_rate']:>8.1f}{row['errors']:>7}{row['p50_ms_over_delay']:>8.2f}"
            f"{row['p99_ms_over_delay']:>8.2f}{row['max_ms_over_delay']:>8.2f}"
            f"{row['connections_opened']:>7.0f}{row['foreign_cpu_percent']:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=550.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per client")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--delay-ms", type=float, default=90.0, help="server delay per POST")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per client, interleaved; the table shows medians")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help="comma-separated subset of: " + ", ".join(CLIENTS))
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.delay_ms)
        return
    if args.client:
        run_client(args.client, args.port, args.rate, args.seconds, args.warmup_s,
                   args.delay_ms)
        return

    names = [name.strip() for name in args.clients.split(",") if name.strip()]
    unknown = [name for name in names if name not in CLIENTS]
    if unknown:
        parser.error(f"unknown client(s): {', '.join(unknown)}")
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    pinned = CLIENT_CPU in cpus and SERVER_CPU in cpus
    # Through the lab's launcher: its own session, and it dies with this script.
    server = Launched(
        [sys.executable, os.path.abspath(__file__), "--serve", "--delay-ms", str(args.delay_ms)])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        port = int(server.popen.stdout.readline())
        placement = (f"server pinned to CPU {SERVER_CPU}, clients to CPU {CLIENT_CPU}"
                     if pinned else "NOT pinned (needs CPUs 0 and 1)")
        print(f"server: 127.0.0.1:{port}, delay {args.delay_ms:g} ms, {placement}; "
              f"open loop {args.rate:g} req/s, warm-up {args.warmup_s:g} s, "
              f"window {args.seconds:g} s, {args.repeat} run(s) per client, "
              f"max {MAX_CONNECTIONS} connections per client\n")
        for repeat in range(args.repeat):
            for name in names:
                result = run_client_process(name, port, args, pinned)
                runs[name].append(result)
                print(f"run {repeat + 1}: {name:<24} {result['cpu_us_per_request']:>8.0f} us/req"
                      f"  other {result['foreign_cpu_percent']:.0f}%", flush=True)
                time.sleep(0.5)
    finally:
        server.stop()

    harness = statistics.median(r["cpu_us_per_request"] for r in runs["harness"]) \
        if runs.get("harness") else None
    rows = [summarize(name, runs[name], harness) for name in names if runs[name]]
    print()
    print(_table(rows))
    print(f"""
CPU us/req: client process user+sys CPU over the window / requests completed in it (median of
  runs, min-max in brackets); net us: minus the harness row, i.e. what the HTTP client adds to
  the driver's own task and wake-up cost (approximate: wake-ups partly merge).
p50/p99/max: client-side latency from each request's scheduled send time, minus the server
  delay. conns: TCP connections the client opened (incl. warm-up). other%: CPU {CLIENT_CPU} time
  used by other processes while the client ran (should be ~0; if not, the machine was busy:
  rerun or use --repeat).""")
    for row in rows:
        print(f"  {row['client']:<24} {row['description']}")
        if row["error_kinds"]:
            print(f"  {'':<24} errors: {row['error_kinds']}")
        if row["unfinished"]:
            print(f"  {'':<24} OVERLOADED: {row['unfinished']} requests still unanswered "
                  f"{args.delay_ms / 1000 + 5:g} s after the last was due; latencies cover "
                  "only the completed ones")
    by_name = {row["client"]: row for row in rows}
    if "httpx-default" in by_name and "httpx-default+sniffio" in by_name:
        plain, sniff = by_name["httpx-default"], by_name["httpx-default+sniffio"]
        print(f"""
sniffio: httpcore runs `import sniffio` inside current_async_library() each time it sets up an
  anyio lock, event or cancellation shield; with sniffio missing that is a failed import (a
  sys.path search), {plain.get('sniffio_import_attempts_per_request', 0):.1f} per request here.
  sniffio hidden: {plain['cpu_us_per_request']:.0f} us/req; importable: \
{sniff['cpu_us_per_request']:.0f} us/req.""")
        if plain["unfinished"] or sniff["unfinished"]:
            print("  OVERLOADED at this rate, so the comparison means little: rerun these two "
                  "with a lower --rate.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rate": args.rate, "seconds": args.seconds, "warmup_s": args.warmup_s,
                       "delay_ms": args.delay_ms, "repeat": args.repeat, "pinned": pinned,
                       "results": rows}, fh, indent=2)
        print(f"\nsaved {args.json}")


if __name__ == "__main__":
    main()
