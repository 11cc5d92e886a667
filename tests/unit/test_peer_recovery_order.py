"""recover_from_peers with a peer whose answer arrives reordered or duplicated, as UDP may
deliver it (docs/architecture.md, invariant 6); found by mutation testing (tests/mutation)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from uuid import uuid4

import pytest

from rinha import wire
from rinha.ledger import DEFAULT, OWN, Ledger
from rinha.peer_recovery import recover_from_peers
from tests.unit.test_peers import (
    LOCALHOST,
    ME,
    PEER_NAME,
    REGIONS,
    SECONDS,
    T0,
    cells_of,
    own_cells,
    settings_towards,
)

CELLS = [(T0, DEFAULT, 3, 30), (T0 + 1, DEFAULT, 1, 10)]
THIRDS = [(T0 + 2, DEFAULT, 4, 40)]


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    name = f"/rinha-test-{uuid4().hex[:10]}"
    made = Ledger.create(name, SECONDS, regions=REGIONS)
    yield made
    made.close()
    Ledger.unlink(name)


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    made = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    for sock in made:
        sock.bind((LOCALHOST, 0))
    yield made
    for sock in made:
        sock.close()


@pytest.mark.parametrize(
    "order",
    [["done", "cells", "mirror"], ["cells", "cells", "mirror", "done"],
     ["garbage", "cells", "mirror", "done"]],
    ids=["the count before the cells", "the cells twice", "garbage first"])
def test_recover_from_peers_takes_an_answer_reordered_duplicated_or_after_garbage(
    ledger, sockets, order
):
    """The peer's answer: our cells, its mirror of a third instance, and the count (2)."""
    mine, peer = sockets

    def answer() -> None:
        peer.settimeout(2.0)
        data, address = peer.recvfrom(2048)
        nonce = wire.decode_datagram(data)[1]
        datagrams = {
            "cells": cells_of(ME, CELLS, wire.RECOVERY, nonce, PEER_NAME)[0],
            "mirror": cells_of("third", THIRDS, wire.RECOVERY, nonce, PEER_NAME)[0],
            "done": wire.encode_recovery_done(PEER_NAME, nonce, 2),
            "garbage": b"RQ not a datagram",
        }
        for what in order:
            peer.sendto(datagrams[what], address)

    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="1")
    assert recover_from_peers(settings, ledger, mine) == 1
    answering.join(5)
    assert own_cells(ledger, OWN) == CELLS
    assert own_cells(ledger, ledger.mirrors()["third"]) == THIRDS


def test_a_silent_peer_is_asked_again_over_the_whole_timeout(ledger, sockets):
    """Three requests spaced by a third of SYNC_RECOVER_TIMEOUT_S: a peer that starts late
    in that time is still heard."""
    mine, silent = sockets
    settings = settings_towards(silent, SYNC_RECOVER_TIMEOUT_S="0.6")
    started = time.monotonic()
    assert recover_from_peers(settings, ledger, mine) == 0
    assert time.monotonic() - started >= 0.55
    silent.settimeout(0.1)
    for _ in range(3):
        silent.recvfrom(2048)  # asked three times


def test_a_peer_that_answers_only_the_second_request_is_heard_beside_one_that_answered(
    ledger, sockets
):
    mine, prompt = sockets
    late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    late.bind((LOCALHOST, 0))

    def answer(peer: socket.socket, name: str, cells: list, ignore: int) -> None:
        peer.settimeout(2.0)
        for _ in range(ignore):
            peer.recvfrom(2048)  # not up yet
        data, address = peer.recvfrom(2048)
        nonce = wire.decode_datagram(data)[1]
        peer.sendto(wire.encode_cells(wire.RECOVERY, name, ME, cells, nonce)[0], address)
        peer.sendto(wire.encode_recovery_done(name, nonce, 1), address)

    mine_prompt = [(T0, DEFAULT, 2, 20)]
    mine_late = [(T0 + 1, DEFAULT, 5, 50)]
    threads = [threading.Thread(target=answer, args=(prompt, "prompt", mine_prompt, 0)),
               threading.Thread(target=answer, args=(late, "late", mine_late, 1))]
    for thread in threads:
        thread.start()
    try:
        settings = settings_towards(prompt, late, SYNC_RECOVER_TIMEOUT_S="1.5")
        assert recover_from_peers(settings, ledger, mine) == 2
    finally:
        for thread in threads:
            thread.join(5)
        late.close()
    assert own_cells(ledger, OWN) == mine_prompt + mine_late


def test_a_peer_flooding_stale_answers_does_not_keep_the_recovery_past_its_deadline(
    ledger, sockets
):
    """Datagrams keep arriving, none an answer to the request: each attempt ends at its time
    all the same, and the recovery at its deadline."""
    mine, peer = sockets
    stop = threading.Event()

    def flood() -> None:
        stale = wire.encode_recovery_done(PEER_NAME, 12345, 0)  # another request's nonce
        while not stop.is_set():
            peer.sendto(stale, mine.getsockname())
            time.sleep(0.002)

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    answered: list[int] = []
    recovering = threading.Thread(target=lambda: answered.append(recover_from_peers(
        settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="0.3"), ledger, mine)), daemon=True)
    started = time.monotonic()
    recovering.start()
    recovering.join(5)
    stop.set()
    flooding.join(5)
    assert answered == [0]
    assert time.monotonic() - started < 2
