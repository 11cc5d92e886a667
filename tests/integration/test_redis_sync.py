"""Three instances syncing through Redis (SYNC_URL), as on three hosts: real processes, a real
redis-server of their own, restarted or not; no UDP between the instances."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from rinha.ledger import OWN
from rinha.redis_store import EPOCH_KEY, cells_key, parse_hash
from rinha.resources import unlink_all
from rinha.settings import load as load_settings
from tests.processes import (
    Nginx,
    RedisServer,
    backend_totals,
    own_totals,
    post_payments,
    processor_totals,
    redis_group,
    region_totals,
    restart,
    wait_until,
)

N = 3


@pytest.fixture
def redis_server():
    server = RedisServer()
    holder = {"server": server}
    yield holder
    holder["server"].stop()


@pytest.fixture
def trio(processors, redis_server):
    group = redis_group(*processors, redis_server["server"], N)
    yield group
    for instance in group:
        instance.stop()


def processors_total(processors) -> dict[str, tuple[int, str]]:
    default, fallback = processors
    return {"default": processor_totals(default), "fallback": processor_totals(fallback)}


def all_agree(processors, group) -> bool:
    expected = processors_total(processors)
    return all(backend_totals(i) == expected for i in group)


def settled(processors, group):
    """A predicate: the processors' count stopped moving and every instance reports it."""
    seen: list[int] = []

    def check() -> bool:
        seen.append(processor_totals(processors[0])[0])
        return len(seen) > 1 and seen[-1] == seen[-2] and all_agree(processors, group)

    return check


def in_redis(server: RedisServer, instance) -> tuple[int, int]:
    """(count, cents) of the instance's cells as Redis holds them."""
    client = server.client()
    try:
        epoch = int(client.get(EPOCH_KEY))
        cells = parse_hash(client.hgetall(cells_key(epoch, instance.name)))
    finally:
        client.close()
    return sum(c[2] for c in cells), sum(c[3] for c in cells)


class Load:
    """POSTs through `url` in a thread until stopped; counts the 202s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.accepted += post_payments(self.url, 60, concurrency=12).count(202)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.accepted


def test_a_burst_shows_on_every_instance_as_the_processors_hold_it(processors, trio):
    balancer = Nginx(*trio)
    try:
        assert post_payments(balancer.url, 1500, concurrency=48).count(202) == 1500
    finally:
        balancer.stop()
    wait_until(lambda: processor_totals(processors[0])[0] == 1500, 30)
    wait_until(lambda: all_agree(processors, trio), 5, interval=0.01)
    counts = [own_totals(i)[0] for i in trio]
    assert sum(counts) == 1500 and min(counts) > 0, counts
    for instance in trio:
        sync = httpx.get(instance.url + "/status", timeout=5).json()["sync"]
        assert sync["carrier"] == "redis"
        assert {p["instance"] for p in sync["peers"]} == {i.name for i in trio} - {instance.name}


def test_redis_restarted_empty_mid_run_loses_nothing_and_counts_nothing_twice(
    processors, redis_server, trio
):
    balancer = Nginx(*trio)
    try:
        load = Load(balancer.url)
        time.sleep(1.5)
        redis_server["server"] = redis_server["server"].restarted()  # everything in it is gone
        time.sleep(1.5)
        accepted = load.stop()
    finally:
        balancer.stop()
    wait_until(lambda: processor_totals(processors[0])[0] == accepted, 30)
    wait_until(lambda: all_agree(processors, trio), 10)
    # Redis holds every instance's whole region again, each written back after the loss.
    server = redis_server["server"]
    wait_until(lambda: all(in_redis(server, i) == own_totals(i) for i in trio), 10)
    # So an instance restarted with fresh memory gets its own cells back from Redis.
    victim = trio[0]
    before = own_totals(victim)
    os.killpg(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait()
    unlink_all(load_settings(victim.env))
    trio[0] = restart(victim)
    assert own_totals(trio[0]) == before
    assert all_agree(processors, trio)


def test_an_instance_killed_mid_burst_and_restarted_counts_each_payment_once(
    processors, trio
):
    """SIGKILL of a whole instance while payments flow; it restarts on the same host (its
    queue, table and ledger kept) and re-drives what it held."""
    balancer = Nginx(*trio)
    victim = trio[1]
    try:
        load = Load(balancer.url)
        time.sleep(1.0)
        os.killpg(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait()
        time.sleep(0.5)
        trio[1] = restart(victim)
        time.sleep(1.0)
        accepted = load.stop()
    finally:
        balancer.stop()
    wait_until(settled(processors, trio), 30, interval=0.5)
    # Every 202 reached a processor once (a request cut by the kill counts as accepted only if
    # its 202 arrived), and every instance reports exactly what the processors hold.
    assert processor_totals(processors[0])[0] == accepted
    assert processors_total(processors)["fallback"] == (0, "0.00")


def test_purge_on_one_clears_all_three_and_redis(processors, redis_server, trio):
    for instance in trio:
        post_payments(instance.url, 20)
    wait_until(lambda: all(backend_totals(i)["default"][0] == 60 for i in trio), 10)
    assert httpx.post(trio[2].url + "/purge-payments").status_code == 200
    empty = {"default": (0, "0.00"), "fallback": (0, "0.00")}
    wait_until(lambda: all(backend_totals(i) == empty for i in trio), 5)
    time.sleep(1.5)  # past a periodic read: nothing comes back
    assert all(backend_totals(i) == empty for i in trio)
    assert all(in_redis(redis_server["server"], i) == (0, 0) for i in trio)
    post_payments(trio[0].url, 5)
    wait_until(lambda: all(backend_totals(i)["default"][0] == 5 for i in trio), 5)


def test_an_instance_that_starts_while_redis_is_down_catches_up_when_it_comes(processors):
    """Redis is not there when the instances start: they take payments anyway (the summary is
    local), and once Redis answers every instance shows everything."""
    port_holder = RedisServer()
    url, port = port_holder.url, port_holder.port
    port_holder.stop()  # a free port nobody listens on (yet)
    group = redis_group(*processors, port_holder, 2, SYNC_RECOVER_TIMEOUT_S="0.2")
    server = None
    try:
        for instance in group:
            assert instance.env["SYNC_URL"] == url
            assert post_payments(instance.url, 40).count(202) == 40
        wait_until(lambda: processor_totals(processors[0])[0] == 80, 30)
        # The processor stores a payment before it answers, and each dispatcher counts it once
        # the answer arrives: on a loaded runner that comes a little later.
        wait_until(lambda: [own_totals(i)[0] for i in group] == [40, 40], 15)
        server = RedisServer(port)
        wait_until(lambda: all_agree(processors, group), 15)
        assert all(region_totals(i, OWN)[0] == 40 for i in group)
    finally:
        for instance in group:
            instance.stop()
        if server is not None:
            server.stop()
