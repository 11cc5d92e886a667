"""`rinha serve` refuses to start wrongly, loudly, and stops cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import posix_ipc
import pytest

from rinha.cpu_quota import under_cpu_quota
from tests.processes import Instance, free_port, post_payments, wait_until


def serve(env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rinha", "serve"], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout,
    )


def base_env(**extra: str) -> dict[str, str]:
    return {"INSTANCE_NAME": f"s{os.urandom(5).hex()}", "HOST": "127.0.0.1",
            "PORT": str(free_port()), **extra}


@pytest.mark.parametrize("variable, value", [
    ("PORT", "eighty"), ("WORKERS", "0"), ("PROCESSOR_DEFAULT_URL", "ftp://x"),
    ("LEDGER_SECONDS", "1000"), ("PEER_ADDR", "nocolon"), ("HEARTBEAT_TIMEOUT_S", "1"),
    ("HEARTBEAT_TIMEOUT_S", "x"),
])
def test_a_bad_setting_stops_startup_naming_the_variable(variable, value):
    result = serve(base_env(**{variable: value}))
    assert result.returncode == 2
    assert variable in result.stderr


def test_a_port_taken_by_another_listener_is_refused_even_with_reuseport():
    # A stale worker listens with SO_REUSEPORT, as uSockets does: a second instance would
    # silently share its traffic, so startup must refuse.
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stale.bind(("127.0.0.1", 0))
        stale.listen()
        port = stale.getsockname()[1]
        result = serve(base_env(PORT=str(port)))
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr


def test_a_queue_larger_than_the_kernel_allows_fails_with_the_fix():
    msg_max = int(Path("/proc/sys/fs/mqueue/msg_max").read_text())
    result = serve(base_env(QUEUE_MAX_MESSAGES=str(msg_max + 1)))
    assert result.returncode == 1
    assert f"sysctl -w fs.mqueue.msg_max={msg_max + 1}" in result.stderr
    assert "sysctls" in result.stderr


def test_a_second_instance_with_the_same_name_is_refused(processors):
    running = Instance(*processors).wait_ready()
    try:
        result = serve({**running.env, "PORT": str(free_port())})
        assert result.returncode == 1
        assert "already running" in result.stderr
        assert running.summary() is not None  # the first one is untouched
    finally:
        running.stop()


def test_sigterm_stops_every_child_and_removes_the_instance_objects(processors):
    instance = Instance(*processors).wait_ready()
    assert post_payments(instance.url, 20).count(202) == 20
    wait_until(lambda: instance.summary()["default"]["totalRequests"] == 20)
    children = instance.child_pids("")
    assert len(children) == 3
    instance.popen.send_signal(signal.SIGTERM)
    assert instance.popen.wait(10) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(f"/rinha-{instance.name}-queue")
    assert not Path(f"/dev/shm/rinha-{instance.name}-ledger").exists()
    instance.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.parametrize(
    ("setting", "policy"),
    # auto: idle priority only under a CPU quota (the instance inherits this test's cgroup).
    [("1", os.SCHED_IDLE), ("0", os.SCHED_OTHER),
     ("auto", os.SCHED_IDLE if under_cpu_quota() else os.SCHED_OTHER)],
)
def test_the_dispatcher_runs_at_the_configured_priority_and_workers_at_normal(
    start_instance, setting, policy
):
    instance = start_instance(DISPATCHER_IDLE_PRIORITY=setting)
    [dispatcher] = instance.child_pids("dispatch")
    assert os.sched_getscheduler(dispatcher) == policy
    for worker in instance.child_pids("worker"):
        assert os.sched_getscheduler(worker) == os.SCHED_OTHER
    assert post_payments(instance.url, 5) == [202] * 5  # and it dispatches
    # At idle priority outside a quota it yields to every busy process of the machine.
    wait_until(lambda: instance.summary()["default"]["totalRequests"] == 5, 60)
