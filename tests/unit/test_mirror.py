"""mirror: merging received cells, what merge_cells and merge_subject report, and the order of
every_region (found by mutation testing, tests/mutation)."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest

from rinha.ledger import DEFAULT, FALLBACK, OWN, Ledger
from rinha.mirror import every_region, merge_cells, merge_subject, region_cells

T0 = 1_752_150_896


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    name = f"/rinha-test-{uuid4().hex[:10]}"
    made = Ledger.create(name, 1024, regions=3)
    yield made
    made.close()
    Ledger.unlink(name)


def test_merge_cells_returns_how_many_cells_grew(ledger: Ledger) -> None:
    assert merge_cells(ledger, OWN, []) == 0
    assert merge_cells(ledger, OWN, [(T0, DEFAULT, 2, 200), (T0, FALLBACK, 1, 100)]) == 2
    # One stale, one equal, one larger: only the larger grows.
    assert merge_cells(ledger, OWN, [(T0, DEFAULT, 1, 100), (T0, FALLBACK, 1, 100),
                                     (T0 + 1, DEFAULT, 3, 300)]) == 1


def test_merge_subject_into_a_full_ledger_drops_the_cells_and_says_none_grew(ledger) -> None:
    assert merge_subject(ledger, "me", "api2", [(T0, DEFAULT, 1, 100)]) == 1
    assert merge_subject(ledger, "me", "api3", [(T0, DEFAULT, 1, 100)]) == 1
    assert merge_subject(ledger, "me", "api4", [(T0, DEFAULT, 5, 500)]) == 0  # no region left
    assert merge_subject(ledger, "me", "me", [(T0, FALLBACK, 4, 400)]) == 1  # ours: OWN
    assert ledger.own_cell(T0, FALLBACK) == (4, 400)


def test_every_region_lists_ours_first_then_the_mirrors_by_region(ledger: Ledger) -> None:
    for name in ("zeta", "alpha"):  # given out in this order: zeta 1, alpha 2
        merge_subject(ledger, "me", name, [(T0, DEFAULT, 1, 100)])
    assert every_region(ledger, "me") == [("me", OWN), ("zeta", 1), ("alpha", 2)]


def test_region_cells_keeps_the_oldest_second_the_ring_still_holds(ledger: Ledger) -> None:
    seconds = 1024
    ledger.record(T0 + 1, DEFAULT, 100)
    ledger.record(T0 + seconds, DEFAULT, 200)  # T0 + 1 is now the oldest second held
    assert region_cells(ledger, OWN) == [(T0 + 1, DEFAULT, 1, 100), (T0 + seconds, DEFAULT, 1, 200)]


def test_open_carrier_is_udp_with_a_bound_socket_redis_with_a_sync_url_else_none(
    ledger: Ledger,
) -> None:
    import socket

    from rinha.mirror import open_carrier
    from rinha.peers import PeerSync
    from rinha.redis_sync import RedisSync
    from rinha.settings import load

    def carrier(sock: socket.socket | None, **env: str):  # type: ignore[no-untyped-def]
        return open_carrier(load(env), ledger, sock, print, None)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert isinstance(carrier(sock, PEERS="127.0.0.1:9"), PeerSync)
    finally:
        sock.close()
    assert isinstance(carrier(None, SYNC_URL="redis://127.0.0.1:9"), RedisSync)
    assert carrier(None) is None
