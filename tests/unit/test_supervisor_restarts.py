"""supervisor: the restart policy (restart_child) and the hung-child watch (kill_hung_children).

The policy runs in a real Supervisor.run() in a subprocess (it blocks signals and forks, which a
test process must not do to itself), with children that crash, fail to boot or hang; the watch
runs in the test process over real processes, one of them stopped with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from rinha import metrics
from rinha.heartbeat import Heartbeats, Silence
from rinha.metrics import Metrics, SupervisorCounters
from rinha.supervisor import RESTART_WINDOW_S, RESTARTS_PER_WINDOW, ChildSpec, Supervisor

REPO = Path(__file__).resolve().parent.parent.parent

# A supervisor over one child whose target is `child` below; prints its log on stderr.
SUPERVISE = """
import logging, os, signal, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from rinha.supervisor import BootError, ChildSpec, Supervisor
FLAG = Path(sys.argv[1])
{child}
sys.exit(Supervisor([ChildSpec("kid", child)]).run())
"""


def supervise(child: str, flag: Path, timeout: float = 20.0,
              stop_when: str | None = None) -> tuple[int, str]:
    """Run a supervisor over `child` (source of a function named child) until it exits, or
    SIGTERM it once its log shows `stop_when`; (exit code, log). A supervisor still running
    after `timeout` fails the test (it would restart for ever)."""
    source = SUPERVISE.format(child=textwrap.dedent(child))
    log_path = flag.with_suffix(".log")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", source, str(flag)], cwd=REPO,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if stop_when is not None and stop_when in log_path.read_text():
                process.send_signal(signal.SIGTERM)
                stop_when = None
            time.sleep(0.02)
        assert process.poll() is not None, f"still running after {timeout} s:\n" + \
            log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, log_path.read_text()


def test_a_child_that_keeps_crashing_stops_the_instance_after_the_allowed_restarts(tmp_path):
    code, log = supervise("""
        def child():
            raise RuntimeError("boom")
    """, tmp_path / "flag")
    assert code == 1, log
    deaths = RESTARTS_PER_WINDOW + 1
    assert f"kid died {deaths} times in 10 s; stopping the instance" in log
    assert log.count("kid started") == deaths  # the first start and 20 restarts, no more
    assert log.count("died; restarting it") == RESTARTS_PER_WINDOW


def test_a_child_that_cannot_boot_stops_the_instance_at_once(tmp_path):
    code, log = supervise("""
        def child():
            raise BootError("port taken")
    """, tmp_path / "flag")
    assert code == 1, log
    assert "kid could not start; stopping the instance" in log
    assert log.count("kid started") == 1
    assert "restarting" not in log


@pytest.mark.parametrize("exit_code", [0, 1, 2, 4])
def test_a_child_that_dies_once_is_restarted_and_the_instance_serves_on(tmp_path, exit_code):
    """Any exit but the boot error's (3), a clean one included, is a death to restart."""
    code, log = supervise(f"""
        def child():
            if not FLAG.exists():
                FLAG.touch()
                os._exit({exit_code})
            print("second life", flush=True)
            time.sleep(60)
    """, tmp_path / "flag", stop_when="second life")
    assert code == 0, log  # restarted, then stopped by SIGTERM: not halted
    assert f"kid (exit {exit_code}) died; restarting it" in log
    assert log.count("kid started") == 2


# --- kill_hung_children ----------------------------------------------------------------------


@pytest.fixture
def heartbeats() -> Iterator[Heartbeats]:
    name = f"/rinha-test-hb-{uuid4().hex[:10]}"
    beats = Heartbeats.create_or_open(name)
    yield beats
    beats.close()
    Heartbeats.unlink(name)


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def sleeper(started: list[subprocess.Popen]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started.append(process)
    return process


def watched(process: subprocess.Popen, slot: int, heartbeats: Heartbeats) -> ChildSpec:
    child = ChildSpec(f"child{slot}", lambda: None, slot=slot, pid=process.pid)
    child.silence = Silence(time.monotonic_ns(), heartbeats.last(slot))
    return child


def killed(process: subprocess.Popen) -> bool:
    try:
        return process.wait(5) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


def test_a_silent_child_is_killed_once_and_a_beating_one_is_left_alone(heartbeats, sleepers):
    silent, beating = sleeper(sleepers), sleeper(sleepers)
    os.kill(silent.pid, signal.SIGSTOP)
    children = [watched(silent, 1, heartbeats), watched(beating, 2, heartbeats)]
    supervisor = Supervisor(children, heartbeats, heartbeat_timeout_s=0.3)
    supervisor.kill_hung_children()  # nobody silent for 0.3 s yet
    time.sleep(0.5)
    heartbeats.beat(2)
    supervisor.kill_hung_children()
    supervisor.kill_hung_children()  # killed, not reaped yet: watched no more
    assert killed(silent)
    assert children[0].silence is None  # killed once: the restart brings a new watch
    assert beating.poll() is None
    heartbeats.beat(2)
    time.sleep(0.2)
    supervisor.kill_hung_children()  # 0.2 s since its last beat: under the timeout
    assert beating.poll() is None


def test_a_child_already_gone_does_not_stop_the_watch_of_the_others(heartbeats, sleepers):
    gone, silent = sleeper(sleepers), sleeper(sleepers)
    gone.kill()
    gone.wait()  # reaped: no /proc entry, no schedstat
    os.kill(silent.pid, signal.SIGSTOP)
    dead = ChildSpec("dead", lambda: None, slot=3)  # reaped, not restarted yet: no pid
    supervisor = Supervisor([dead, watched(gone, 1, heartbeats), watched(silent, 2, heartbeats)],
                            heartbeats, heartbeat_timeout_s=0.2)
    time.sleep(0.4)
    supervisor.kill_hung_children()
    assert killed(silent)


@pytest.mark.parametrize("case", ["timeout 0", "stopping", "no heartbeats"])
def test_no_child_is_killed_with_the_watch_off_or_while_stopping(heartbeats, sleepers, case):
    silent = sleeper(sleepers)
    os.kill(silent.pid, signal.SIGSTOP)
    supervisor = Supervisor([watched(silent, 1, heartbeats)],
                            None if case == "no heartbeats" else heartbeats,
                            heartbeat_timeout_s=0.0 if case == "timeout 0" else 0.2)
    if case == "stopping":
        supervisor.handle_sigterm()
    time.sleep(0.4)
    supervisor.kill_hung_children()
    os.kill(silent.pid, signal.SIGCONT)
    time.sleep(0.1)
    assert silent.poll() is None


# --- restart_child's window, in this process (each restart forks a child that exits at once) ---

EXITED_1 = 1 << 8  # the wait status of a child that exited with 1


@pytest.fixture
def counters(metrics_segment: Metrics) -> SupervisorCounters:
    return SupervisorCounters(metrics_segment)


def restart_after(deaths_ago_s: list[float], counters: SupervisorCounters) -> ChildSpec:
    """restart_child after earlier deaths that long ago; the child, respawned or not."""
    child = ChildSpec("kid", lambda: None, slot=5)
    now = time.monotonic()
    child.restarts = [now - ago for ago in deaths_ago_s]
    Supervisor([child], counters=counters).restart_child(child, EXITED_1)
    if child.pid is not None:
        os.waitpid(child.pid, 0)
    return child


def test_deaths_older_than_the_window_do_not_count(counters):
    child = restart_after([RESTART_WINDOW_S + 1] * 30, counters)
    assert child.pid is not None  # restarted
    assert len(child.restarts) == 1
    assert counters.words[metrics.CHILD_RESTARTS + 5] == 1


def test_the_allowed_deaths_within_the_window_restart_one_more_halts(counters):
    assert restart_after([1.0] * (RESTARTS_PER_WINDOW - 1), counters).pid is not None
    assert restart_after([1.0] * RESTARTS_PER_WINDOW, counters).pid is None  # halted
