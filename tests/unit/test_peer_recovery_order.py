"""recover_from_peers with a peer whose answer arrives reordered or duplicated, as UDP may
deliver it (docs/architecture.md, invariant 6); found by mutation testing (tests/mutation)."""

from __future__ import annotations

import socket
import threading
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


@pytest.mark.parametrize("order", [["done", "cells"], ["cells", "cells", "done"]],
                         ids=["the count before the cells", "the cells twice"])
def test_recover_from_peers_takes_an_answer_reordered_or_duplicated(ledger, sockets, order):
    mine, peer = sockets

    def answer() -> None:
        peer.settimeout(2.0)
        data, address = peer.recvfrom(2048)
        nonce = wire.decode_datagram(data)[1]
        [cells] = cells_of(ME, CELLS, wire.RECOVERY, nonce, PEER_NAME)
        done = wire.encode_recovery_done(PEER_NAME, nonce, 1)
        for what in order:
            peer.sendto(done if what == "done" else cells, address)

    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="1")
    assert recover_from_peers(settings, ledger, mine) == 1
    answering.join(5)
    assert own_cells(ledger, OWN) == CELLS
