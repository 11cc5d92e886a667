"""An instance's processes live and die together: hung children are replaced, starved ones are
not, children die with their supervisor, and where it is started from does not matter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rinha.heartbeat import Silence, run_delay_ns
from tests.processes import (
    Instance,
    backend_totals,
    free_port,
    post_payments,
    processor_totals,
    restart,
    wait_until,
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def hog_cpus(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def test_a_stopped_dispatcher_is_replaced_and_what_it_held_is_delivered(
    processors, start_instance
):
    default, fallback = processors
    instance = start_instance(HEARTBEAT_TIMEOUT_S="2")
    [dispatcher] = instance.child_pids("dispatch")
    os.kill(dispatcher, signal.SIGSTOP)  # hung: alive, holding its queue, doing nothing
    accepted = post_payments(instance.url, 300).count(202)
    assert accepted > 0
    wait_until(lambda: not alive(dispatcher), 15)
    wait_until(lambda: instance.child_pids("dispatch") not in ([], [dispatcher]), 15)
    wait_until(lambda: processor_totals(default)[0] == accepted, 30)
    wait_until(lambda: backend_totals(instance)["default"] == processor_totals(default), 10)
    assert processor_totals(fallback) == (0, "0.00")
    assert "has not turned its loop" in instance.log()


def test_a_stopped_worker_is_replaced(processors, start_instance):
    instance = start_instance(HEARTBEAT_TIMEOUT_S="2", WORKERS="1")
    [worker] = instance.child_pids("worker")
    os.kill(worker, signal.SIGSTOP)
    wait_until(lambda: not alive(worker), 15)
    wait_until(lambda: instance.child_pids("worker") not in ([], [worker]), 15)
    wait_until(lambda: post_payments(instance.url, 1) == [202], 10)  # once it listens


def test_a_dispatcher_starved_of_cpu_at_idle_priority_is_not_taken_for_hung(
    processors, start_instance
):
    instance = start_instance(HEARTBEAT_TIMEOUT_S="2", DISPATCHER_IDLE_PRIORITY="1")
    [dispatcher] = instance.child_pids("dispatch")
    hogs = hog_cpus(2 * os.cpu_count())
    try:
        time.sleep(6)  # three timeouts of wall time with the CPUs taken
    finally:
        stop_all(hogs)
    assert instance.child_pids("dispatch") == [dispatcher]
    assert "has not turned its loop" not in instance.log()
    assert post_payments(instance.url, 10) == [202] * 10
    wait_until(lambda: backend_totals(instance)["default"][0] == 10)


def silences_behind_hogs() -> tuple[float, float]:
    """(silence of a busy process at idle priority behind CPU hogs, of a stopped one), over 3 s."""
    starved = subprocess.Popen([sys.executable, "-c", (
        "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "while True: pass")])
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    hogs = hog_cpus(2 * os.cpu_count())
    try:
        time.sleep(0.5)
        os.kill(stopped.pid, signal.SIGSTOP)
        start = time.monotonic_ns()
        watches = {p.pid: Silence(start, 0) for p in (starved, stopped)}
        delays = {pid: run_delay_ns(pid) for pid in watches}
        for pid, watch in watches.items():
            watch.observe(start, 1, delays[pid])  # a beat now: the watch starts here
        time.sleep(3)
        now = time.monotonic_ns()
        silent = {pid: watch.observe(now, 1, run_delay_ns(pid))
                  for pid, watch in watches.items()}
    finally:
        stop_all(hogs + [starved, stopped])
    return silent[starved.pid], silent[stopped.pid]


def test_silence_is_counted_in_the_child_s_own_time_not_while_it_waits_for_a_cpu():
    """The measurement itself, on real processes: a busy process at idle priority behind CPU
    hogs waits on the run queue, and that waiting is not silence; a stopped one is silent.
    Up to three tries: under gVisor the starved process's run delay sometimes does not grow
    (it got the CPU, or its wait was not counted); silence taken as wall time fails all three."""
    for _ in range(3):
        starved, stopped = silences_behind_hogs()
        assert stopped > 2.5
        if starved < stopped / 2:
            return
    raise AssertionError(f"a starved process was silent {starved:.2f} s of {stopped:.2f} s")


def test_children_die_with_a_killed_supervisor_and_the_next_one_re_drives(processors):
    default, fallback = processors
    default.set_failure(True)
    instance = Instance(default, fallback).wait_ready()
    try:
        accepted = post_payments(instance.url, 200).count(202)
        children = instance.child_pids("")
        assert len(children) == 3
        instance.popen.send_signal(signal.SIGKILL)
        instance.popen.wait()
        wait_until(lambda: not any(alive(pid) for pid in children), 10)
        default.set_failure(False)
        successor = restart(instance)  # same name: reopens the queue and the table
        try:
            wait_until(lambda: processor_totals(default)[0] == accepted, 30)
            wait_until(lambda: backend_totals(successor)["default"][0] == accepted)
        finally:
            successor.stop()
    finally:
        instance.stop()


def test_sighup_stops_the_instance_like_sigterm(processors, start_instance):
    instance = start_instance()
    children = instance.child_pids("")
    instance.popen.send_signal(signal.SIGHUP)
    assert instance.popen.wait(10) == 0
    assert not any(alive(pid) for pid in children)


@pytest.mark.parametrize("cwd", ["/tmp", "/", "/proc"])
def test_startup_does_not_depend_on_the_working_directory(processors, cwd):
    """socketify's own listen freed the host name before uWS read it; which memory it then
    read depended on, among other things, the length of the working directory."""
    default, fallback = processors
    port = free_port()
    env = {**os.environ, "INSTANCE_NAME": f"cwd{os.urandom(4).hex()}", "HOST": "0.0.0.0",
           "PORT": str(port), "PROCESSOR_DEFAULT_URL": default.url,
           "PROCESSOR_FALLBACK_URL": fallback.url}
    process = subprocess.Popen([sys.executable, "-m", "rinha", "serve"], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None
                   or post_payments(f"http://127.0.0.1:{port}", 1) == [202], 15)
        assert process.poll() is None, process.stdout.read().decode()
    finally:
        process.terminate()
        process.wait(10)
        from rinha.resources import unlink_all
        from rinha.settings import load

        unlink_all(load(env))


def test_a_child_that_keeps_dying_stops_the_instance_instead_of_a_restart_storm(processors):
    """More than 20 deaths of one child within 10 s: something is wrong that a restart will
    not fix; the supervisor stops the instance (exit 1) rather than fork for ever."""
    instance = Instance(*processors).wait_ready()
    try:
        kills = 0
        while instance.popen.poll() is None and kills < 40:
            pids = instance.child_pids("dispatch")
            if not pids:
                time.sleep(0.005)
                continue
            os.kill(pids[0], signal.SIGKILL)
            kills += 1
            wait_until(lambda pid=pids[0]: instance.popen.poll() is not None
                       or instance.child_pids("dispatch") not in ([], [pid]), 10, 0.005)
        assert instance.popen.wait(10) == 1
        assert 20 <= kills <= 22, kills
        assert "dispatch died 21 times" in instance.log()
    finally:
        instance.stop()
