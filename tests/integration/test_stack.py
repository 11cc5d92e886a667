"""`rinha stack`: the whole topology as local processes, brought up and torn down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rinha_lab import compose_limits
from tests.processes import free_port, post_payments, wait_until

REPO = Path(__file__).resolve().parents[2]


def start_stack(run_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    ports = [free_port() for _ in range(5)]
    sync = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    stack = subprocess.Popen(
        [sys.executable, "-m", "rinha", "stack", "--run-dir", str(run_dir),
         "--port", str(ports[0]), "--api-ports", f"{ports[1]},{ports[2]}",
         "--processor-ports", f"{ports[3]},{ports[4]}", "--sync-ports", f"{sync[0]},{sync[1]}",
         "--instance-prefix", f"test{os.getpid()}-{ports[0]}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    return stack, ports[0]


def wait_ready(stack: subprocess.Popen[str]) -> list[str]:
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = stack.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "ready":
            return lines
    stack.kill()
    raise AssertionError("stack did not become ready:\n" + "".join(lines))


def stop(stack: subprocess.Popen[str]) -> int:
    stack.send_signal(signal.SIGTERM)
    try:
        return stack.wait(20)
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in state


def test_stack_serves_port_9999_role_and_stops_everything(tmp_path):
    stack, port = start_stack(tmp_path)
    try:
        output = "".join(wait_ready(stack))
        assert "api1" in output and "nginx" in output
        described = json.loads((tmp_path / "stack.json").read_text())
        url = f"http://127.0.0.1:{port}"
        assert described["nginx"]["url"] == url
        assert httpx.get(url + "/payments-summary").status_code == 200
        assert post_payments(url, 100).count(202) == 100
        wait_until(lambda: httpx.get(url + "/payments-summary").json()["default"]
                   ["totalRequests"] == 100)
        pids = [described["nginx"]["pid"], *(i["pid"] for i in described["instances"].values()),
                *(p["pid"] for p in described["processors"].values())]
    finally:
        code = stop(stack)
    assert code == 0
    assert not any(alive(pid) for pid in pids)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists(),
                    reason="--limits contest needs root and cgroup v1's cpu controller")
def test_contest_limits_come_from_docker_compose(tmp_path):
    limits = compose_limits.load_limits(REPO / "docker-compose.yml")
    stack, port = start_stack(tmp_path, "--limits", "contest")
    try:
        wait_ready(stack)
        described = json.loads((tmp_path / "stack.json").read_text())
        assert set(described["cgroups"]) == set(limits)
        for name, paths in described["cgroups"].items():
            quota = int(Path(paths["cpu"], "cpu.cfs_quota_us").read_text())
            period = int(Path(paths["cpu"], "cpu.cfs_period_us").read_text())
            assert quota / period == pytest.approx(limits[name].cpus)
            memory = int(Path(paths["memory"], "memory.limit_in_bytes").read_text())
            assert memory == limits[name].memory_bytes
            members = Path(paths["cpu"], "cgroup.procs").read_text().split()
            assert members, f"no process in {name}'s cgroup"
        api1 = described["instances"]["api1"]["pid"]
        assert str(api1) in Path(described["cgroups"]["api1"]["cpu"], "cgroup.procs").read_text()
    finally:
        assert stop(stack) == 0
    for paths in described["cgroups"].values():
        assert not any(Path(p).exists() for p in paths.values())


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc/PID/task/*/children."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def test_a_dead_instance_is_restarted_a_second_stack_is_refused_and_sighup_stops_all(tmp_path):
    stack, port = start_stack(tmp_path)
    try:
        wait_ready(stack)
        described = json.loads((tmp_path / "stack.json").read_text())
        url = f"http://127.0.0.1:{port}"
        # A second stack on the same ports refuses before starting anything.
        second_dir = tmp_path / "second"
        second = subprocess.run(
            [sys.executable, "-m", "rinha", "stack", "--run-dir", str(second_dir),
             *stack.args[6:]], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "Another rinha stack" in second.stderr
        assert "ready" not in second.stdout
        assert not list(second_dir.glob("*.log"))  # nothing was started
        # Kill one instance's supervisor outright: the stack starts it again.
        api1 = described["instances"]["api1"]["pid"]
        others = [described["nginx"]["pid"], described["instances"]["api2"]["pid"],
                  *(p["pid"] for p in described["processors"].values())]
        os.kill(api1, signal.SIGKILL)
        wait_until(lambda: json.loads((tmp_path / "stack.json").read_text())
                   ["instances"]["api1"]["pid"] != api1, 15)
        api1_url = described["instances"]["api1"]["url"]
        wait_until(lambda: post_payments(api1_url, 1) == [202], 15)  # it serves again
        # Through nginx, a request may meet a connection to the killed instance and fail (a
        # POST that may have reached an instance is never replayed): every 202 must be
        # counted, once.
        accepted = 1 + post_payments(url, 100).count(202)
        assert accepted > 1
        admin = {"X-Rinha-Token": "123"}
        processor = described["processors"]["default"]["url"] + "/admin/payments-summary"
        wait_until(lambda: httpx.get(processor, headers=admin).json()["totalRequests"]
                   == accepted, 15)
        wait_until(lambda: httpx.get(url + "/payments-summary").json()["default"]
                   ["totalRequests"] == accepted, 15)
        assert all(alive(pid) for pid in others)  # nothing else was touched
        assert stack.poll() is None
        everything = descendants(stack.pid)
        stack.send_signal(signal.SIGHUP)
        assert stack.wait(20) == 0
        assert not any(alive(pid) for pid in everything)
    finally:
        if stack.poll() is None:
            stop(stack)


def test_a_stack_killed_with_sigkill_leaves_no_process_behind(tmp_path):
    stack, port = start_stack(tmp_path)
    try:
        wait_ready(stack)
        everything = descendants(stack.pid)
        assert len(everything) >= 8  # 2 emulators, nginx + worker, 2 x (supervisor + 2 children)
        stack.send_signal(signal.SIGKILL)
        stack.wait()
        wait_until(lambda: not any(alive(pid) for pid in everything), 15)
    finally:
        if stack.poll() is None:
            stop(stack)
