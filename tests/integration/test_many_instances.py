"""Three instances on one host, peered over UDP (PEERS), as `rinha stack --instances 3` runs
them: real processes, real datagrams."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest

from rinha import wire
from rinha.resources import unlink_all
from rinha.settings import load as load_settings
from tests.processes import (
    Nginx,
    backend_totals,
    own_totals,
    peered_group,
    post_payments,
    processor_totals,
    restart,
    wait_until,
)

N = 3


@pytest.fixture
def trio(processors):
    group = peered_group(*processors, N)
    yield group
    for instance in group:
        instance.stop()


def processors_total(processors, params=None) -> dict[str, tuple[int, str]]:
    default, fallback = processors
    return {"default": processor_totals(default, params),
            "fallback": processor_totals(fallback, params)}


def all_agree(processors, group, params=None) -> bool:
    expected = processors_total(processors, params)
    return all(backend_totals(i, params) == expected for i in group)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def test_a_burst_through_nginx_shows_on_every_instance_as_the_processors_hold_it(
    processors, trio
):
    balancer = Nginx(*trio)
    try:
        started_ms = time.time_ns() // 1_000_000
        assert post_payments(balancer.url, 1500, concurrency=48).count(202) == 1500
    finally:
        balancer.stop()
    default, _ = processors
    wait_until(lambda: processor_totals(default)[0] == 1500, 30)
    wait_until(lambda: all_agree(processors, trio), 5, interval=0.01)
    counts = [own_totals(i)[0] for i in trio]
    assert sum(counts) == 1500 and min(counts) > 0, counts  # nginx used all three
    now_ms = time.time_ns() // 1_000_000
    for params in ({"from": _iso(started_ms - 1000), "to": _iso(now_ms)},
                   {"from": _iso(now_ms - 2000), "to": _iso(now_ms)}):
        assert all_agree(processors, trio, params)
    # Each instance mirrors the other two, each in a region of its own.
    for instance in trio:
        sync = httpx.get(instance.url + "/status", timeout=5).json()["sync"]
        assert sync["carrier"] == "udp"
        heard = {p["instance"]: p["recorded"]["default"]["totalRequests"] for p in sync["peers"]}
        assert heard == {i.name: own_totals(i)[0] for i in trio if i is not instance}


def test_30_percent_of_datagrams_dropped_among_three_heals_by_the_resend_alone(processors):
    """No push at once (SYNC_PUSH=0), and 30 % of every datagram each instance sends is lost:
    each one learns the other two's counts from the periodic resend only."""
    default, fallback = processors
    group = peered_group(default, fallback, N, SYNC_DROP_RATE="0.3", SYNC_DROP_SEED="11",
                         SYNC_PUSH="0", SYNC_RESEND_S="0.2")
    try:
        total = sum(post_payments(i.url, 150, concurrency=16).count(202) for i in group)
        assert total == 3 * 150
        wait_until(lambda: processor_totals(default)[0] == total, 30)
        wait_until(lambda: all_agree(processors, group), 15)
        now_ms = time.time_ns() // 1_000_000
        params = {"from": _iso(now_ms - 60_000), "to": _iso(now_ms)}
        assert all_agree(processors, group, params)
    finally:
        for instance in group:
            instance.stop()


def test_one_health_poller_shares_with_both_others(processors):
    default, fallback = processors
    group = peered_group(default, fallback, N, HEALTH_INTERVAL_S="5")
    try:
        time.sleep(6)  # past one poll period
        # Only the first instance asked, at most once per 5 s (plus the one at its start)...
        assert default.counters()["serviceHealthCalls"] <= 2
        # ...and every instance knows the answer.
        for instance in group:
            health = httpx.get(instance.url + "/status", timeout=5).json()[
                "processors"]["default"]["health"]
            assert health["polledAt"] is not None and health["failing"] is False, instance.name
    finally:
        for instance in group:
            instance.stop()


def test_a_forged_datagram_naming_a_real_peer_changes_nothing(processors, trio):
    first = trio[0]
    post_payments(first.url, 10)
    wait_until(lambda: all_agree(processors, trio), 10)
    before = backend_totals(first)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        target = ("127.0.0.1", int(first.env["SYNC_PORT"]))
        for peer in trio[1:]:
            attacker.sendto(wire.encode_cells(wire.CELLS, peer.name, peer.name,
                                              [(int(time.time()), 0, 99_999, 9_999_900)])[0],
                            target)
        attacker.sendto(wire.encode_datagram(wire.PURGE, trio[2].name, 1), target)
    wait_until(lambda: "not a peer; 3 so far" in first.log(), 5)
    assert backend_totals(first) == before


def test_purge_on_one_clears_all_three(processors, trio):
    for instance in trio:
        post_payments(instance.url, 20)
    wait_until(lambda: all(backend_totals(i)["default"][0] == 60 for i in trio), 10)
    assert httpx.post(trio[1].url + "/purge-payments").status_code == 200
    empty = {"default": (0, "0.00"), "fallback": (0, "0.00")}
    wait_until(lambda: all(backend_totals(i) == empty for i in trio), 5)
    time.sleep(1.5)  # past a periodic resend: nothing comes back
    assert all(backend_totals(i) == empty for i in trio)


def test_an_instance_restarted_with_fresh_memory_gets_everything_back_from_the_others(
    processors, trio
):
    """Each instance recorded its own share; the third is killed, loses its shared memory
    (a new container) and restarts: before it answers it holds again what it had recorded
    and what the other two hold, and nothing is counted twice."""
    for instance in trio:
        assert post_payments(instance.url, 100).count(202) == 100
    wait_until(lambda: all_agree(processors, trio) and
               processor_totals(processors[0])[0] == 300, 30)
    victim = trio[2]
    before = own_totals(victim)
    assert before[0] == 100
    os.killpg(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait()
    unlink_all(load_settings(victim.env))
    revived = restart(victim)
    trio[2] = revived
    assert own_totals(revived) == before
    assert all_agree(processors, trio)
    assert post_payments(revived.url, 50).count(202) == 50
    wait_until(lambda: processor_totals(processors[0])[0] == 350, 30)
    wait_until(lambda: all_agree(processors, trio), 5)
