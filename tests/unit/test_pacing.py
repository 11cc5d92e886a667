"""pacing: a paced loop takes events together, never delays a timer, idles in epoll; the
dispatcher's priority drop, and when `auto` applies it (under a CPU quota)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rinha.cpu_quota import under_cpu_quota
from rinha.pacing import paced_event_loop
from rinha_lab import cgroups


def count_wakeups(min_interval_s: float, events: int,
                  spacing_s: float) -> tuple[int, int, float]:
    """Another thread writes `events` bytes `spacing_s` apart into a socket the loop reads;
    return how many read callbacks ran, how many bytes they got and how long it all took. The
    loop has no timer of its own meanwhile: only the bytes wake it."""
    loop = paced_event_loop(min_interval_s)
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    all_in = loop.create_future()
    callbacks = 0
    received = 0

    def on_readable() -> None:
        nonlocal callbacks, received
        callbacks += 1
        received += len(reader.recv(4096))
        if received >= events and not all_in.done():
            all_in.set_result(None)

    def write_spaced() -> None:
        for _ in range(events):
            writer.send(b"x")
            time.sleep(spacing_s)

    loop.add_reader(reader.fileno(), on_readable)
    sender = threading.Thread(target=write_spaced)
    started = time.monotonic()
    sender.start()
    try:
        loop.run_until_complete(asyncio.wait_for(all_in, 10))
    finally:
        sender.join()
        loop.close()
        reader.close()
        writer.close()
    return callbacks, received, time.monotonic() - started


def test_events_arriving_within_the_interval_are_taken_together():
    # 20 events over ~0.4 s; a loop that wakes at most every 0.2 s reads them in a few calls.
    callbacks, received, elapsed = count_wakeups(0.2, events=20, spacing_s=0.02)
    assert received == 20
    # One call per interval, plus the first event and the last partial interval (a slow
    # machine stretches the writing, hence the elapsed time rather than 0.4 s).
    assert callbacks <= min(19, elapsed / 0.2 + 2)


def test_zero_interval_wakes_for_each_event():
    callbacks, received, _ = count_wakeups(0, events=10, spacing_s=0.02)
    assert received == 10
    assert callbacks >= 8  # each byte arrives alone (a busy machine may merge a couple)


def test_a_timer_due_before_the_pause_ends_is_not_delayed():
    loop = paced_event_loop(1.0)

    async def main() -> float:
        await asyncio.sleep(0)  # one wake-up: the next wait would pause until 1 s after it
        started = time.monotonic()
        await asyncio.sleep(0.05)
        return time.monotonic() - started

    try:
        slept = loop.run_until_complete(main())
    finally:
        loop.close()
    assert slept < 0.5  # fired at its due time, not at the end of the 1 s interval


def test_an_idle_paced_loop_sleeps_instead_of_spinning():
    loop = paced_event_loop(0.01)
    reader, writer = socket.socketpair()
    loop.add_reader(reader.fileno(), lambda: None)
    cpu_before = time.process_time()
    try:
        loop.run_until_complete(asyncio.sleep(0.5))
    finally:
        loop.close()
        reader.close()
        writer.close()
    assert time.process_time() - cpu_before < 0.1  # a spinning loop would burn ~0.5 s


def test_the_dispatcher_priority_drop_is_sched_idle():
    # In a child process: the test runner itself must keep its priority.
    code = ("import os; from rinha.pacing import yield_cpu_to_workers; yield_cpu_to_workers(); "
            "print(os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30)
    assert int(out.stdout) == os.SCHED_IDLE


# cpu_quota.under_cpu_quota decides DISPATCHER_IDLE_PRIORITY=auto: a fake cgroup tree each.

def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


V1_SELF = "4:memory:/box\n1:cpu:/box/api1\n0::/\n"


def test_v1_quota_on_the_own_group(tmp_path: Path) -> None:
    write(tmp_path / "cpu/box/api1/cpu.cfs_quota_us", "65000\n")
    assert under_cpu_quota(tmp_path, V1_SELF)


def test_v1_quota_on_a_parent_group(tmp_path: Path) -> None:
    write(tmp_path / "cpu/box/api1/cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu/box/cpu.cfs_quota_us", "150000\n")
    assert under_cpu_quota(tmp_path, V1_SELF)


def test_v1_without_a_quota_anywhere(tmp_path: Path) -> None:
    for group in ("cpu", "cpu/box", "cpu/box/api1"):
        write(tmp_path / group / "cpu.cfs_quota_us", "-1\n")
    assert not under_cpu_quota(tmp_path, V1_SELF)


def test_v1_combined_cpu_cpuacct_mount(tmp_path: Path) -> None:
    write(tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "65000\n")
    assert under_cpu_quota(tmp_path, "3:cpu,cpuacct:/docker/abc\n")


def test_v2_container_with_and_without_cpus(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "65000 100000\n")  # cgroup namespace: the container is "/"
    assert under_cpu_quota(tmp_path, "0::/\n")
    write(tmp_path / "cpu.max", "max 100000\n")
    assert not under_cpu_quota(tmp_path, "0::/\n")


def test_no_cpu_controller_files_means_no_quota(tmp_path: Path) -> None:
    assert not under_cpu_quota(tmp_path, V1_SELF)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup/cpu").is_dir(),
                    reason="needs root and the cgroup v1 cpu controller")
def test_a_process_in_a_real_quota_group_sees_it() -> None:
    parent = f"rinha-test-{os.getpid()}"
    group = cgroups.make(parent, "limited", 0.5, None)
    code = "from rinha.cpu_quota import under_cpu_quota; print(under_cpu_quota())"
    try:
        inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=30, preexec_fn=cgroups.joiner(group))
        outside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, timeout=30)
    finally:
        cgroups.remove(parent, [group])
    assert (inside.stdout.strip(), outside.stdout.strip()) == ("True", "False")
