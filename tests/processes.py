"""Real processes for the integration tests: processor emulators, `rinha serve`, a load client,
redis-server.

Every instance gets a random INSTANCE_NAME (so random queue and segment names) and free ports;
teardown stops it and unlinks whatever it left.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

from rinha.settings import load as load_settings
from rinha.transport import PooledTransport
from rinha_lab.launcher import Launched
from rinha_lab.stack import nginx_argv, peering

ADMIN = {"X-Rinha-Token": "123", "Content-Type": "application/json"}
LOG_DIR = Path(os.environ.get("RINHA_TEST_LOGS", "/tmp/rinha-test-logs"))
REPO = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A child process launched as the lab launches everything (rinha_lab/launcher.py), with
    its output in a log file (read it when a test fails)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.launched = Launched(argv, env=env, log_path=self.log_path)
        self.popen = self.launched.popen

    def log(self) -> str:
        return self.launched.log()

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.launched.stop(grace_s=timeout)


class Emulator(Process):
    def __init__(self, fee: float, health_window_s: float = 5.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            f"processor-{fee}",
            [sys.executable, "-m", "rinha", "processor", "--port", str(self.port),
             "--fee", str(fee), "--health-window-s", str(health_window_s)],
            {},
        )
        wait_until(lambda: port_open(self.port))

    def admin(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        response = httpx.request(method, self.url + path, json=body, headers=ADMIN, timeout=10)
        response.raise_for_status()
        return response

    def set_failure(self, failing: bool) -> None:
        self.admin("PUT", "/admin/configurations/failure", {"failure": failing})

    def set_delay(self, delay_ms: int) -> None:
        self.admin("PUT", "/admin/configurations/delay", {"delay": delay_ms})

    def summary(self, params: dict | None = None) -> dict:
        response = httpx.get(self.url + "/admin/payments-summary", params=params or {},
                             headers=ADMIN, timeout=10)
        response.raise_for_status()
        return response.json()

    def counters(self) -> dict[str, int]:
        """What arrived here (the emulator's own extension): paymentRequests, paymentLookups,
        serviceHealthCalls."""
        return self.admin("GET", "/admin/counters").json()


class Instance(Process):
    """`rinha serve` with its own random name and port."""

    def __init__(self, default: Emulator, fallback: Emulator, **env: str) -> None:
        self.port = int(env.pop("PORT", free_port()))
        self.name = env.pop("INSTANCE_NAME", f"t{uuid.uuid4().hex[:10]}")
        self.env = {
            "INSTANCE_NAME": self.name,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WORKERS": "2",
            "PROCESSOR_DEFAULT_URL": default.url,
            "PROCESSOR_FALLBACK_URL": fallback.url,
            "QUEUE_MAX_MESSAGES": "1000",
            "HOLD_CAPACITY": "16384",
            "LEDGER_SECONDS": "4096",
            "RETRY_BACKOFF_MAX_S": "0.2",
            "LOG_LEVEL": "INFO",
            **env,
        }
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(f"serve-{self.name}", [sys.executable, "-m", "rinha", "serve"], self.env)

    def wait_ready(self) -> Instance:
        wait_until(lambda: self.popen.poll() is not None or self.summary() is not None, 15)
        assert self.popen.poll() is None, self.log()
        wait_until(lambda: self.child_pids("dispatch"))
        return self

    def summary(self, params: dict | None = None) -> dict:
        response = httpx.get(self.url + "/payments-summary", params=params or {}, timeout=5)
        response.raise_for_status()
        return response.json()

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        """The instance's settings as it reads them: its queue and segment names among them."""
        return load_settings(self.env)

    def child_pids(self, role_prefix: str) -> list[int]:
        """Pids of this supervisor's children whose process name starts with rinha-<prefix>."""
        children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children")
        try:
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            return []
        found = []
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(f"rinha-{role_prefix}"):
                found.append(pid)
        return found

    def stop(self, timeout: float = 10.0) -> int | None:
        code = super().stop(timeout)
        from rinha.resources import unlink_all

        unlink_all(load_settings(self.env))
        return code


async def _post_all(url: str, bodies: Iterable[bytes], concurrency: int) -> list[int]:
    transport = PooledTransport(max_connections=concurrency, read_timeout_s=10)
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Content-Type": "application/json"}

    async def post(body: bytes) -> int:
        async with semaphore:
            request = httpx.Request("POST", url + "/payments", content=body, headers=headers)
            try:
                response = await transport.handle_async_request(request)
            except httpx.TransportError:
                return 0  # no answer: the client cannot count this payment as accepted
            return response.status_code

    try:
        return await asyncio.gather(*(post(b) for b in bodies))
    finally:
        await transport.aclose()


def payment_body(amount: str = "19.90") -> bytes:
    return f'{{"correlationId":"{uuid.uuid4()}","amount":{amount}}}'.encode()


def post_payments(url: str, count: int, concurrency: int = 50, amount: str = "19.90") -> list[int]:
    """POST `count` new payments concurrently; returns each response's status (0: no answer)."""
    bodies = [payment_body(amount) for _ in range(count)]
    return asyncio.run(_post_all(url, bodies, concurrency))


def processor_totals(emulator: Emulator, params: dict | None = None) -> tuple[int, str]:
    s = emulator.summary(params)
    return s["totalRequests"], f'{s["totalAmount"]:.2f}'


def backend_totals(instance: Instance, params: dict | None = None) -> dict[str, tuple[int, str]]:
    s = instance.summary(params)
    return {k: (v["totalRequests"], f'{v["totalAmount"]:.2f}') for k, v in s.items()}


class Nginx(Process):
    """nginx from the repository's nginx.conf, rendered for local instances as `rinha stack`
    renders it."""

    def __init__(self, *instances: Instance) -> None:
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run_dir = Path(tempfile.mkdtemp(prefix="rinha-nginx-"))
        argv = nginx_argv(REPO / "nginx.conf", [f"127.0.0.1:{i.port}" for i in instances],
                          f"127.0.0.1:{self.port}", run_dir)
        super().__init__("nginx", argv, {})
        wait_until(lambda: port_open(self.port))


def peered_group(default: Emulator, fallback: Emulator, count: int, **env: str
                 ) -> list[Instance]:
    """`count` instances on one host as `rinha stack --instances N` peers them: each syncs with
    every other over UDP, only the first polls health."""
    sync = [free_port(socket.SOCK_DGRAM) for _ in range(count)]
    common = {"SYNC_RECOVER_TIMEOUT_S": "0.3", **env}
    group = [Instance(default, fallback, **peering("127.0.0.1", sync, i),
                      HEALTH_POLL="1" if i == 0 else "0", **common) for i in range(count)]
    return [instance.wait_ready() for instance in group]


def redis_group(default: Emulator, fallback: Emulator, redis: RedisServer, count: int,
                **env: str) -> list[Instance]:
    """`count` instances syncing through `redis`, as on several hosts; only the first polls."""
    common = {"SYNC_URL": redis.url, "SYNC_RECOVER_TIMEOUT_S": "0.5", **env}
    group = [Instance(default, fallback, HEALTH_POLL="1" if i == 0 else "0", **common)
             for i in range(count)]
    return [instance.wait_ready() for instance in group]


class RedisServer(Process):
    """Debian's redis-server on a free port, its files in a temporary directory, no
    persistence: a restart loses everything, the harshest restart there is."""

    def __init__(self, port: int | None = None) -> None:
        import shutil
        import tempfile

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise OSError("redis-server not found: install Debian's redis-server "
                          "(scripts/setup.sh does)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="rinha-redis-")
        super().__init__("redis", [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--dir", self.dir, "--save", "", "--appendonly", "no",
                                   "--daemonize", "no"], {})
        wait_until(lambda: port_open(self.port))

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def restarted(self) -> RedisServer:
        """Stop this server and start an empty one on the same port."""
        self.stop()
        return RedisServer(self.port)

    def stop(self, timeout: float = 10.0) -> int | None:
        import shutil

        code = super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


def peered_pair(default: Emulator, fallback: Emulator, **env: str) -> tuple[Instance, Instance]:
    """api1 and api2 as compose peers them: UDP sync both ways, only api1 polls health."""
    sync = [free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    common = {"SYNC_RECOVER_TIMEOUT_S": "0.3", **env}
    first = Instance(default, fallback, **peering("127.0.0.1", sync, 0), HEALTH_POLL="1",
                     **common)
    second = Instance(default, fallback, **peering("127.0.0.1", sync, 1), HEALTH_POLL="0",
                      **common)
    return first.wait_ready(), second.wait_ready()


def restart(instance: Instance) -> Instance:
    """A new `rinha serve` with the same environment (name, ports, peer) as `instance`."""
    env = dict(instance.env)
    clone = Instance.__new__(Instance)
    clone.port, clone.name, clone.env, clone.url = instance.port, instance.name, env, instance.url
    Process.__init__(clone, f"serve-{clone.name}", [sys.executable, "-m", "rinha", "serve"], env)
    return clone.wait_ready()


def region_totals(instance: Instance, region: int) -> tuple[int, int]:
    """(count, cents) in one region of the instance's ledger segment (OWN: what it recorded
    itself; PEER: its mirror of its peer)."""
    from rinha.ledger import Ledger

    ledger = Ledger.open(instance.settings.ledger_name)
    try:
        d_count, d_cents, f_count, f_cents = ledger.region_summary(region, None, None)
    finally:
        ledger.close()
    return d_count + f_count, d_cents + f_cents


def own_totals(instance: Instance) -> tuple[int, int]:
    from rinha.ledger import OWN

    return region_totals(instance, OWN)


def leftovers(instance: Instance) -> dict[str, int]:
    """What a dead instance left in shared memory and its queue: the payments it had accepted
    but never sent (`never_sent`: clean QUEUED slots and records still in the kernel queue),
    those that may have reached a processor (`maybe_sent`: SENDING, pinned, RECORDING), and
    what its OWN ledger region counted (`own`)."""
    import posix_ipc

    from rinha.holding import QUEUED, HoldingTable

    table = HoldingTable.open(instance.settings.holding_name)
    try:
        held = list(table.held())
    finally:
        table.close()
    queue = posix_ipc.MessageQueue(instance.settings.queue_name)
    try:
        in_queue = queue.current_messages
    finally:
        queue.close()
    clean = sum(p.state == QUEUED and not p.pinned for p in held)
    return {"never_sent": clean + in_queue, "maybe_sent": len(held) - clean,
            "own": own_totals(instance)[0]}
