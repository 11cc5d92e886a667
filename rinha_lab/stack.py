"""`rinha stack`: the contest topology as local processes, for machines without Docker.

Runs in its own process and owns its children: two processor emulators (unless
PROCESSOR_DEFAULT_URL / PROCESSOR_FALLBACK_URL point elsewhere), api1 and api2 (`rinha serve`,
peered with each other) and nginx on 127.0.0.1:9999 rendered from the same nginx.conf that
docker-compose.yml mounts. The instances get the environment compose gives them, with local
addresses. `--instances N` runs api1..apiN instead, each peered with all the others over UDP
(PEERS), only api1 polling service-health, nginx balancing over all N; api3 and later take
api2's environment and limits (docs/scaling.md). With `--limits contest` (root only) each API
instance and nginx run in cgroups (v1) holding the CPU and memory that docker-compose.yml gives
them, read from that file, so the local run and the submission cannot drift apart.

It keeps them running as compose's `restart: unless-stopped` would: a child that exits is
started again (at most RESTARTS_PER_WINDOW times in RESTART_WINDOW_S, then the stack stops).
SIGTERM, SIGINT and SIGHUP stop everything; every child dies with the stack even if the stack
is killed with SIGKILL (PR_SET_PDEATHSIG: the children get SIGTERM and stop their own).
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
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from rinha_lab import cgroups, compose_limits
from rinha_lab.launcher import Launched
from rinha_lab.nginx_conf import render_local

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
RESTART_WINDOW_S = 60.0
RESTARTS_PER_WINDOW = 5


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    cgroup: dict[str, str] = field(default_factory=dict)
    process: Launched | None = None
    extra: dict[str, str] = field(default_factory=dict)
    ports: list[tuple[str, int, int]] = field(default_factory=list)  # host, port, socket type
    restarts: list[float] = field(default_factory=list)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without breaking file names such as docker-compose.yml at the hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rinha stack", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--limits", choices=("off", "contest"), default="off",
                        help="contest: hold each service to its docker-compose.yml limits "
                             "with cgroups (needs root)")
    parser.add_argument("--run-dir", help="where logs, nginx.conf and stack.json go "
                                          "(default: a new temporary directory)")
    parser.add_argument("--compose", default=str(REPO_ROOT / "docker-compose.yml"),
                        help="the compose file whose API environment and limits the stack "
                             "uses (default: the repository's docker-compose.yml)")
    parser.add_argument("--nginx-conf", default=str(REPO_ROOT / "nginx.conf"),
                        help="the nginx.conf to render for local addresses (default: the "
                             "repository's nginx.conf, the one compose mounts)")
    parser.add_argument("--instances", type=int, default=2,
                        help="API instances, each peered with every other one (default 2, the "
                             "contest's; more is docs/scaling.md's one host, N instances)")
    parser.add_argument("--port", type=int, default=9999, help="nginx's port (default 9999)")
    parser.add_argument("--api-ports",
                        help="HTTP ports of api1,api2,... (default 9001,9002,... one each)")
    parser.add_argument("--sync-ports",
                        help="UDP sync ports of api1,api2,... (default 9101,9102,... one each)")
    parser.add_argument("--processor-ports", default="8001,8002",
                        help="ports of the default,fallback emulators (default 8001,8002; "
                             "not used for a processor whose PROCESSOR_*_URL is set)")
    parser.add_argument("--instance-prefix", default="stack",
                        help="INSTANCE_NAME of the APIs is PREFIX-api1, PREFIX-api2, ...")
    return parser


def peering(host: str, sync_ports: list[int], index: int) -> dict[str, str]:
    """The sync settings of instance `index` of N on one host: it listens on its own port and
    syncs with every other one. A pair is spelled as docker-compose.yml spells it (PEER_ADDR);
    more instances list the others in PEERS."""
    others = [f"{host}:{port}" for i, port in enumerate(sync_ports) if i != index]
    key = "PEER_ADDR" if len(others) == 1 else "PEERS"
    return {"SYNC_HOST": host, "SYNC_PORT": str(sync_ports[index]), key: ",".join(others)}


def nginx_argv(conf: Path, api_addrs: list[str], listen: str, run_dir: Path) -> list[str]:
    """Render `conf` (the compose file's nginx.conf) for local addresses into `run_dir` and
    return the command that runs Debian's nginx on it in the foreground."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise OSError("nginx not found: install Debian's nginx (scripts/setup.sh does)")
    rendered = render_local(conf.read_text(), api_addrs=tuple(api_addrs), listen=listen,
                            run_dir=str(run_dir))
    conf_path = run_dir / "nginx.conf"
    conf_path.write_text(rendered)
    return [binary, "-p", f"{run_dir}/", "-e", "stderr", "-c", str(conf_path)]


class PortsTaken(RuntimeError):
    """A port the stack needs is held by someone else."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stack = Stack.plan(args)
    except PortsTaken as exc:
        print(f"rinha stack: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"rinha stack: {exc}", file=sys.stderr)
        return 2
    return stack.run()


class Stack:
    def __init__(self, children: list[Child], run_dir: Path, limits: str,
                 cgroup_parent: str | None) -> None:
        self.children = children
        self.run_dir = run_dir
        self.limits = limits
        self.cgroup_parent = cgroup_parent
        self._stopping = False

    @classmethod
    def plan(cls, args: argparse.Namespace) -> Stack:
        compose = compose_limits.load_compose(args.compose)
        run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="rinha-stack-")).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        count = args.instances
        if not 2 <= count <= 64:
            raise ValueError("--instances takes 2 to 64")
        api_ports = _ports(args.api_ports or ",".join(str(9001 + i) for i in range(count)),
                           count, "--api-ports")
        sync_ports = _ports(args.sync_ports or ",".join(str(9101 + i) for i in range(count)),
                            count, "--sync-ports")
        processor_ports = _ports(args.processor_ports, 2, "--processor-ports")
        if args.limits == "contest" and os.geteuid() != 0:
            raise OSError("--limits contest needs root (it creates cgroups)")

        children: list[Child] = []
        urls = []
        for index, (role, fee) in enumerate((("default", "0.05"), ("fallback", "0.15"))):
            configured = os.environ.get(f"PROCESSOR_{role.upper()}_URL")
            if configured:
                urls.append(configured)
                continue
            port = processor_ports[index]
            url = f"http://127.0.0.1:{port}"
            urls.append(url)
            children.append(Child(
                f"processor-{role}",
                [sys.executable, "-m", "rinha", "processor", "--port", str(port), "--fee", fee],
                {}, url, ports=[("127.0.0.1", port, socket.SOCK_STREAM)],
            ))

        apis = compose_limits.api_services(compose)
        compose_names = sorted(apis)
        if len(compose_names) != 2:
            raise ValueError(f"{args.compose} must define two API services, found "
                             f"{compose_names}")
        names = [*compose_names, *(f"api{i + 1}" for i in range(2, count))]
        for index in range(count):
            name = names[index]
            # api3.. are copies of api2: same environment (HEALTH_POLL=0 among it), same limits.
            env = compose_limits.service_environment(apis[compose_names[min(index, 1)]])
            for key in ("PEER_ADDR", "PEERS"):  # compose's service names: replaced below
                env.pop(key, None)
            env.update({
                "INSTANCE_NAME": f"{args.instance_prefix}-{name}",
                "HOST": "127.0.0.1",
                "PORT": str(api_ports[index]),
                **peering("127.0.0.1", sync_ports, index),
                "PROCESSOR_DEFAULT_URL": urls[0],
                "PROCESSOR_FALLBACK_URL": urls[1],
            })
            children.append(Child(
                name, [sys.executable, "-m", "rinha", "serve"], env,
                f"http://127.0.0.1:{api_ports[index]}",
                extra={"instance_name": env["INSTANCE_NAME"]},
                ports=[("127.0.0.1", api_ports[index], socket.SOCK_STREAM),
                       ("127.0.0.1", sync_ports[index], socket.SOCK_DGRAM)],
            ))

        children.append(Child(
            "nginx", nginx_argv(Path(args.nginx_conf), [f"127.0.0.1:{p}" for p in api_ports],
                                f"127.0.0.1:{args.port}", run_dir),
            {}, f"http://127.0.0.1:{args.port}",
            ports=[("127.0.0.1", args.port, socket.SOCK_STREAM)],
        ))
        # Before anything starts: a port someone holds (most often another stack) would let
        # this one print "ready" and then die, or worse, share a port through SO_REUSEPORT.
        taken = [f"{port} ({'udp' if kind == socket.SOCK_DGRAM else 'tcp'})"
                 for child in children for host, port, kind in child.ports
                 if not port_free(host, port, kind)]
        if taken:
            raise PortsTaken(
                f"ports already in use: {', '.join(taken)}. Another rinha stack (or another "
                "program) holds them: stop it, or move this one with --port, --api-ports, "
                "--sync-ports and --processor-ports")

        cgroup_parent = None
        if args.limits == "contest":
            cgroup_parent = f"rinha-stack-{os.getpid()}"
            limits = compose_limits.service_limits(compose)
            for child in children:
                limit = limits.get(child.name)
                if limit is None and "instance_name" in child.extra:
                    limit = limits[compose_names[1]]  # api3.. as api2
                if limit is not None:
                    child.cgroup = cgroups.make(cgroup_parent, child.name, limit.cpus,
                                                limit.memory_bytes)
        return cls(children, run_dir, args.limits, cgroup_parent)

    def run(self) -> int:
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signo, self._on_signal)
        try:
            for child in self.children:
                self._start(child)
                if child.name.startswith("processor"):
                    _wait_for_port(child.url, READY_TIMEOUT_S)
            self._wait_ready()
            self._write_description()
            self._print_map()
            print("ready", flush=True)
            return_code = 0
            while not self._stopping:
                exited = self._exited_child()
                if exited is not None and not self._restart(exited):
                    return_code = 1
                    break
                time.sleep(0.5)
        except TimeoutError as exc:
            print(f"rinha stack: {exc}", file=sys.stderr)
            return_code = 1
        finally:
            self.stop()
        return return_code

    def _restart(self, child: Child) -> bool:
        """Start an exited child again, as `restart: unless-stopped` would; False once it
        has exited too often to keep trying."""
        assert child.process is not None
        log = self.run_dir / f"{child.name}.log"
        child.process.signal_session(signal.SIGKILL)  # whatever it left behind in its session
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(child.restarts) > RESTARTS_PER_WINDOW:
            print(f"rinha stack: {child.name} exited {len(child.restarts)} times in "
                  f"{RESTART_WINDOW_S:.0f} s (last: {child.process.poll()}); stopping. "
                  f"See {log}", file=sys.stderr)
            return False
        print(f"rinha stack: {child.name} exited with {child.process.poll()}; restarting "
              f"it (see {log})", file=sys.stderr, flush=True)
        self._start(child)
        self._write_description()
        return True

    def _exited_child(self) -> Child | None:
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                return child
        return None

    def _on_signal(self, signo: int, frame: object) -> None:
        self._stopping = True

    def _start(self, child: Child) -> None:
        # SIGTERM if the stack dies first: each child then stops its own children (nginx its
        # workers, an instance its workers and dispatcher).
        child.process = Launched(child.argv, env=child.env,
                                 log_path=self.run_dir / f"{child.name}.log", cgroup=child.cgroup)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for child in self.children:
            path = "/payments-summary" if not child.name.startswith("processor") else None
            while not _answers(child.url, path):
                if child.process is not None and child.process.poll() is not None:
                    raise TimeoutError(f"{child.name} exited; see {self.run_dir}/{child.name}.log")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not answer within {READY_TIMEOUT_S} s")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every child, wait, SIGKILL what is left of each, remove the cgroups."""
        for child in reversed(self.children):
            if child.process is not None:
                child.process.signal_session(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is not None:
                child.process.stop(grace_s=max(0.0, deadline - time.monotonic()))
        if self.cgroup_parent is not None:
            cgroups.remove(self.cgroup_parent, [c.cgroup for c in self.children])

    def _write_description(self) -> None:
        def entry(child: Child) -> dict[str, object]:
            pid = child.process.pid if child.process else None
            return {"url": child.url, "pid": pid, **child.extra}

        by_name = {c.name: c for c in self.children}
        description = {
            "limits": self.limits,
            "run_dir": str(self.run_dir),
            "nginx": entry(by_name["nginx"]),
            "processors": {
                role: entry(by_name[f"processor-{role}"]) if f"processor-{role}" in by_name
                else {"url": os.environ.get(f"PROCESSOR_{role.upper()}_URL"), "pid": None}
                for role in ("default", "fallback")
            },
            "instances": {c.name: entry(c) for c in self.children if "instance_name" in c.extra},
            "cgroups": {c.name: c.cgroup for c in self.children if c.cgroup},
        }
        # Written whole, then renamed: a reader (a test, the benchmark) never sees half a file.
        staged = self.run_dir / "stack.json.tmp"
        staged.write_text(json.dumps(description, indent=2))
        os.replace(staged, self.run_dir / "stack.json")

    def _print_map(self) -> None:
        print(f"rinha stack (limits: {self.limits}), logs and stack.json in {self.run_dir}")
        for child in self.children:
            pid = child.process.pid if child.process else "-"
            where = child.url
            if "instance_name" in child.extra:
                where += f"  sync udp :{child.env['SYNC_PORT']}"
            limits = ""
            if child.cgroup:
                group = Path(child.cgroup["cpu"]).relative_to(cgroups.CGROUP_ROOT / "cpu")
                limits = f"  cgroup {group}"
            print(f"  {child.name:<20} pid {pid:<8} {where}{limits}")
        print("Stop with Ctrl-C.", flush=True)


def _ports(text: str, count: int, option: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes {count} comma-separated ports") from None
    if len(ports) != count or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"{option} takes {count} comma-separated ports")
    return ports


def _answers(url: str, path: str | None) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    if path is None:
        return _port_open(host, int(port))
    import http.client

    connection = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def port_free(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether nobody listens (TCP) or is bound (UDP) there: a plain bind, no SO_REUSEPORT."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_for_port(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _answers(url, None):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not open within {timeout_s} s")
        time.sleep(0.05)
