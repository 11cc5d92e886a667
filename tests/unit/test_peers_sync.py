"""PeerSync: what _on_readable counts in the dispatcher's metrics block (datagrams taken, from
strangers, malformed), and a purge resent to each peer until that one acknowledges it (found by
mutation testing, tests/mutation)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest

from rinha import metrics, wire
from rinha.ledger import DEFAULT, Ledger
from rinha.metrics import DispatcherCounters, Metrics
from rinha.peers import PeerAddress, PeerSync
from tests.unit.test_peers import (
    LOCALHOST,
    PEER_NAME,
    REGIONS,
    SECONDS,
    T0,
    cells_of,
    serving,
    settings_towards,
    wait_until,
)


@pytest.fixture
def counters(metrics_segment: Metrics) -> DispatcherCounters:
    return DispatcherCounters(metrics_segment)


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    name = f"/rinha-test-{uuid4().hex[:10]}"
    made = Ledger.create(name, SECONDS, REGIONS)
    yield made
    made.close()
    Ledger.unlink(name)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for sock in made:
        sock.bind((LOCALHOST, 0))
    yield made
    for sock in made:
        sock.close()


def test_received_foreign_and_malformed_datagrams_are_counted(counters, ledger, sockets):
    mine, peer, stranger = sockets
    sync = PeerSync(settings_towards(peer), ledger, mine, lambda *_: None, counters=counters)
    target = mine.getsockname()
    [cells] = cells_of(PEER_NAME, [(T0, DEFAULT, 2, 20)])
    with serving(sync):
        peer.sendto(cells, target)
        peer.sendto(b"not a datagram", target)
        peer.sendto(cells, target)
        stranger.sendto(cells, target)
        wait_until(lambda: sync.dropped_foreign == 1 and sync.dropped_malformed == 1
                   and counters.words[metrics.SYNC_RECEIVED] == 2)
    words = counters.words
    assert (words[metrics.SYNC_RECEIVED], words[metrics.SYNC_FOREIGN],
            words[metrics.SYNC_MALFORMED]) == (2, 1, 1)
    assert words[metrics.SYNC_HEARD_AT] > 0


def purges_within(sock: socket.socket, seconds: float) -> list[int]:
    """The nonces of the PURGE datagrams `sock` receives in the next `seconds`."""
    nonces = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            kind, nonce, _, _ = wire.decode_datagram(sock.recvfrom(2048)[0])
        except TimeoutError:
            break
        assert kind == wire.PURGE
        nonces.append(nonce)
    return nonces


def test_a_purge_is_resent_to_each_peer_until_that_one_acknowledges(ledger, sockets):
    mine, first, second = sockets
    sync = PeerSync(settings_towards(first, second), ledger, mine, lambda *_: None)
    target = mine.getsockname()
    escaped: list[dict] = []  # what would stop a dispatcher (its loop's handler is _crash)
    with serving(sync) as loop:
        loop.set_exception_handler(lambda _, context: escaped.append(context))
        loop.call_soon_threadsafe(sync.purged)
        [nonce] = set(purges_within(first, 0.05)) | set(purges_within(second, 0.05))
        first.sendto(wire.encode_datagram(wire.PURGE_ACK, "first", nonce), target)
        time.sleep(0.15)  # the acknowledgement is in, and any resend on its way has landed
        for sock in (first, second):
            purges_within(sock, 0.01)  # what came before
        assert purges_within(first, 0.35) == []
        resent = purges_within(second, 0.01)  # meanwhile, to the one still unacknowledged
        assert len(resent) >= 2 and set(resent) == {nonce}
        second.sendto(wire.encode_datagram(wire.PURGE_ACK, "second", nonce), target)
        time.sleep(0.15)
        purges_within(second, 0.01)
        assert purges_within(second, 0.35) == []
    assert escaped == []


def test_a_stranger_is_refused_even_when_its_datagram_triggers_the_resolution() -> None:
    """The first datagram a PeerAddress judges makes it resolve its name: the sender must
    still match what the name resolves to."""
    peer = PeerAddress("localhost", 9123)
    assert peer.is_peer(("10.1.2.3", 9123)) is False
    assert peer.is_peer((LOCALHOST, 9123)) is True
