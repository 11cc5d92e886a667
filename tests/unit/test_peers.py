"""peers: cell listing and merging on a real ledger, and PeerSync over real UDP sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import uuid4

import pytest

from rinha import wire
from rinha.health import HealthReport
from rinha.ledger import DEFAULT, FALLBACK, OWN, PEER, Ledger
from rinha.peers import (
    RECOVERY_ATTEMPTS,
    PeerAddress,
    PeerSync,
    merge_cells,
    own_cells,
    recover_from_peer,
)
from rinha.settings import Settings, load

SECONDS = 1024
T0 = 1_752_150_896
LOCALHOST = "127.0.0.1"


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


@pytest.fixture
def new_ledger() -> Iterator[Callable[[], Ledger]]:
    made: list[tuple[str, Ledger]] = []

    def make() -> Ledger:
        name = f"/rinha-test-{uuid4().hex[:10]}"
        ledger = Ledger.create(name, SECONDS)
        made.append((name, ledger))
        return ledger

    yield make
    for name, ledger in made:
        ledger.close()
        Ledger.unlink(name)


@pytest.fixture
def ledger(new_ledger: Callable[[], Ledger]) -> Ledger:
    return new_ledger()


@pytest.fixture
def new_socket() -> Iterator[Callable[[], socket.socket]]:
    made: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCALHOST, 0))
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


def port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def settings_towards(peer: socket.socket, **env: str) -> Settings:
    return load({"PEER_ADDR": f"{LOCALHOST}:{port(peer)}", **env})


def receive(sock: socket.socket) -> tuple[int, int, bytes, tuple[str, int]]:
    sock.settimeout(2.0)
    data, address = sock.recvfrom(2048)
    return (*wire.decode_datagram(data), address)


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recvfrom(2048)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def all_cells(ledger: Ledger) -> tuple[list[wire.Cell], list[wire.Cell]]:
    return own_cells(ledger, OWN), own_cells(ledger, PEER)


def many_cells(n: int, base: int = T0) -> list[wire.Cell]:
    return [(base + i // 2, i % 2, i + 1, (i + 1) * 1990) for i in range(n)]


def store_all(ledger: Ledger, region: int, cells: list[wire.Cell]) -> None:
    for cell in cells:
        ledger.store(region, *cell)


# --- own_cells and merge_cells --------------------------------------------------------------


def test_own_cells_of_an_empty_region_is_nothing(ledger: Ledger) -> None:
    assert all_cells(ledger) == ([], [])


def test_own_cells_lists_exactly_the_non_empty_cells_of_the_region(ledger: Ledger) -> None:
    ledger.record(T0, DEFAULT, 1990)
    ledger.record(T0, DEFAULT, 1990)
    ledger.record(T0 + 5, DEFAULT, 100)
    ledger.record(T0 + 5, FALLBACK, 250)
    ledger.store(OWN, T0 + 7, DEFAULT, 0, 0)  # written, but empty
    ledger.record(T0 + 10, FALLBACK, 1)
    ledger.store(PEER, T0 + 3, FALLBACK, 9, 900)
    assert own_cells(ledger, OWN) == [
        (T0, DEFAULT, 2, 3980),
        (T0 + 5, DEFAULT, 1, 100),
        (T0 + 5, FALLBACK, 1, 250),
        (T0 + 10, FALLBACK, 1, 1),
    ]
    assert own_cells(ledger, PEER) == [(T0 + 3, FALLBACK, 9, 900)]


@pytest.mark.parametrize(
    ("first", "seconds"),
    [
        (None, [T0, T0 + 5, T0 + 5, T0 + 10]),
        (T0 - 100, [T0, T0 + 5, T0 + 5, T0 + 10]),
        (T0, [T0, T0 + 5, T0 + 5, T0 + 10]),
        (T0 + 1, [T0 + 5, T0 + 5, T0 + 10]),
        (T0 + 5, [T0 + 5, T0 + 5, T0 + 10]),
        (T0 + 10, [T0 + 10]),
        (T0 + 11, []),
    ],
)
def test_own_cells_from_a_first_second_on(
    ledger: Ledger, first: int | None, seconds: list[int]
) -> None:
    for second, processor in [(T0, 0), (T0 + 5, 0), (T0 + 5, 1), (T0 + 10, 1)]:
        ledger.record(second, processor, 1990)
    assert [cell[0] for cell in own_cells(ledger, OWN, first)] == seconds


def test_own_cells_skips_seconds_the_ring_no_longer_holds(ledger: Ledger) -> None:
    ledger.record(T0, DEFAULT, 1)
    ledger.record(T0 + SECONDS - 1, DEFAULT, 2)
    ledger.record(T0 + SECONDS, DEFAULT, 3)  # T0 fell out of the ring's span
    assert own_cells(ledger, OWN) == [
        (T0 + SECONDS - 1, DEFAULT, 1, 2),
        (T0 + SECONDS, DEFAULT, 1, 3),
    ]


def test_merge_cells_stores_new_cells(ledger: Ledger) -> None:
    merge_cells(ledger, PEER, [(T0, DEFAULT, 2, 3980), (T0 + 1, FALLBACK, 1, 1990)])
    assert all_cells(ledger) == ([], [(T0, DEFAULT, 2, 3980), (T0 + 1, FALLBACK, 1, 1990)])


def test_merge_cells_keeps_the_larger_count(ledger: Ledger) -> None:
    ledger.store(PEER, T0, DEFAULT, 5, 500)
    merge_cells(ledger, PEER, [(T0, DEFAULT, 3, 300)])  # stale: never lowers
    assert ledger.cell(PEER, T0, DEFAULT) == (5, 500)
    merge_cells(ledger, PEER, [(T0, DEFAULT, 5, 999)])  # same count: nothing new
    assert ledger.cell(PEER, T0, DEFAULT) == (5, 500)
    merge_cells(ledger, PEER, [(T0, DEFAULT, 6, 600)])  # newer: raises
    assert ledger.cell(PEER, T0, DEFAULT) == (6, 600)
    merge_cells(ledger, PEER, [(T0, DEFAULT, 4, 400), (T0, DEFAULT, 1, 100)])
    assert ledger.cell(PEER, T0, DEFAULT) == (6, 600)


def test_merge_cells_heals_any_order_of_delivery(ledger: Ledger) -> None:
    history = [(T0, DEFAULT, n, n * 1990) for n in range(1, 6)]
    for cell in [history[3], history[0], history[4], history[4], history[1], history[2]]:
        merge_cells(ledger, PEER, [cell])
    assert ledger.cell(PEER, T0, DEFAULT) == (5, 5 * 1990)


def test_merge_cells_touches_only_its_region(ledger: Ledger) -> None:
    ledger.record(T0, DEFAULT, 100)
    merge_cells(ledger, PEER, [(T0, DEFAULT, 7, 700)])
    assert ledger.cell(OWN, T0, DEFAULT) == (1, 100)
    merge_cells(ledger, OWN, [(T0, FALLBACK, 2, 200)])
    assert ledger.cell(PEER, T0, FALLBACK) == (0, 0)
    assert ledger.cell(OWN, T0, FALLBACK) == (2, 200)


# --- PeerAddress ----------------------------------------------------------------------------


def test_peer_address_knows_its_peer_by_ip_and_port() -> None:
    peer = PeerAddress(LOCALHOST, 9123)
    assert peer.is_peer((LOCALHOST, 9123)) is True
    assert peer.is_peer((LOCALHOST, 9124)) is False
    assert peer.is_peer(("127.0.0.2", 9123)) is False
    assert peer.is_peer(("10.1.2.3", 9123)) is False
    assert peer.target() == (LOCALHOST, 9123)


def test_peer_address_resolves_a_name() -> None:
    peer = PeerAddress("localhost", 9123)
    assert peer.target() == (LOCALHOST, 9123)
    assert peer.is_peer((LOCALHOST, 9123)) is True


# --- PeerSync.handle ------------------------------------------------------------------------


class Sync:
    """A PeerSync on socket `mine`, whose configured peer is socket `peer`."""

    def __init__(self, ledger: Ledger, mine: socket.socket, peer: socket.socket, **env: str):
        self.ledger = ledger
        self.mine = mine
        self.peer = peer
        self.health: list[HealthReport] = []
        self.sync = PeerSync(
            settings_towards(peer, **env), ledger, mine,
            self.health.append,
        )

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.peer.getsockname()

    def handle(self, data: bytes) -> None:
        self.sync.handle(data, self.peer_address)


@pytest.fixture
def pair(ledger: Ledger, new_socket: Callable[[], socket.socket]) -> Sync:
    return Sync(ledger, new_socket(), new_socket())


def test_cells_merge_into_the_peer_region(pair: Sync) -> None:
    sent = many_cells(70)
    for data in wire.encode_cells(wire.CELLS, sent):
        pair.handle(data)
    assert all_cells(pair.ledger) == ([], sent)


def test_stale_cells_never_lower_the_peer_region(pair: Sync) -> None:
    pair.ledger.store(PEER, T0, DEFAULT, 5, 500)
    [data] = wire.encode_cells(wire.CELLS, [(T0, DEFAULT, 4, 400), (T0, FALLBACK, 1, 9)])
    pair.handle(data)
    assert own_cells(pair.ledger, PEER) == [(T0, DEFAULT, 5, 500), (T0, FALLBACK, 1, 9)]


def test_purge_purges_both_regions_and_is_acknowledged(pair: Sync) -> None:
    pair.ledger.record(T0, DEFAULT, 1990)
    pair.ledger.store(PEER, T0, FALLBACK, 3, 300)
    pair.handle(wire.encode_datagram(wire.PURGE, 0xC0FFEE))
    assert all_cells(pair.ledger) == ([], [])
    assert pair.ledger.summary(None, None) == (0, 0, 0, 0)
    kind, nonce, payload, sender = receive(pair.peer)
    assert (kind, nonce, payload) == (wire.PURGE_ACK, 0xC0FFEE, b"")
    assert sender == pair.mine.getsockname()


def test_recover_request_answers_with_the_requesters_cells_then_ours(pair: Sync) -> None:
    theirs = many_cells(70)  # our mirror of the requester: two RECOVERY datagrams
    ours = many_cells(3, T0 + 100)
    store_all(pair.ledger, PEER, theirs)
    store_all(pair.ledger, OWN, ours)
    pair.handle(wire.encode_datagram(wire.RECOVER_REQUEST, 4242))
    by_kind: dict[int, list[wire.Cell]] = {wire.RECOVERY: [], wire.CELLS: []}
    data_datagrams = 0
    while True:
        kind, nonce, payload, _ = receive(pair.peer)
        assert nonce == 4242
        if kind == wire.RECOVERY_DONE:
            break
        by_kind[kind] += wire.decode_cells(payload)
        data_datagrams += 1
    assert wire.decode_recovery_done(payload) == data_datagrams == 3
    assert by_kind[wire.RECOVERY] == theirs
    assert by_kind[wire.CELLS] == ours
    assert nothing_waiting(pair.peer)


def test_recover_request_to_an_empty_ledger_is_answered_with_zero_datagrams(pair: Sync) -> None:
    pair.handle(wire.encode_datagram(wire.RECOVER_REQUEST, 7))
    kind, nonce, payload, _ = receive(pair.peer)
    assert (kind, nonce) == (wire.RECOVERY_DONE, 7)
    assert wire.decode_recovery_done(payload) == 0


@pytest.mark.parametrize(
    ("processor", "failing", "ms"), [(DEFAULT, True, 250), (FALLBACK, False, 0)]
)
def test_health_is_passed_on_decoded(pair: Sync, processor: int, failing: bool, ms: int) -> None:
    pair.handle(wire.encode_health(processor, failing, ms))
    assert pair.health == [HealthReport(processor, failing, ms)]


@pytest.mark.parametrize(
    "data",
    [
        wire.encode_datagram(wire.RECOVERY, 1, wire.CELL.pack(T0, 0, 1, 1)),
        wire.encode_recovery_done(1, 3),
        wire.encode_datagram(wire.PURGE_ACK, 1),
    ],
)
def test_replies_meant_for_a_recovering_supervisor_change_nothing(pair: Sync, data: bytes) -> None:
    pair.ledger.record(T0, DEFAULT, 5)
    pair.handle(data)
    assert all_cells(pair.ledger) == ([(T0, DEFAULT, 1, 5)], [])
    assert pair.health == []
    assert nothing_waiting(pair.peer)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RQ\x01",
        b"XX" + wire.encode_datagram(wire.CELLS)[2:],
        wire.encode_datagram(wire.CELLS)[:2] + b"\x09" + wire.encode_datagram(wire.CELLS)[3:],
        wire.encode_datagram(0),
        wire.encode_datagram(wire.CELLS, 0, b"\x00" * 5),
        wire.encode_datagram(wire.CELLS, 0, wire.CELL.pack(T0, 2, 1, 1)),
        wire.encode_datagram(wire.HEALTH, 0, b"\x00" * 5),
        wire.encode_datagram(wire.HEALTH, 0, b"\x00\x02\x00\x00\x00\x00"),
        wire.encode_datagram(wire.PURGE, 1, b"x"),
    ],
)
def test_malformed_datagrams_raise_and_change_nothing(pair: Sync, data: bytes) -> None:
    pair.ledger.record(T0, DEFAULT, 5)
    with pytest.raises(wire.MalformedDatagram):
        pair.handle(data)
    assert all_cells(pair.ledger) == ([(T0, DEFAULT, 1, 5)], [])
    assert pair.health == []
    assert nothing_waiting(pair.peer)


# --- PeerSync as the dispatcher's listener ----------------------------------------------------


def test_recorded_pushes_the_absolute_values_of_the_changed_cells(pair: Sync) -> None:
    for cents in (100, 200, 300):
        pair.ledger.record(T0, DEFAULT, cents)
    pair.ledger.record(T0 + 1, FALLBACK, 50)
    pair.ledger.record(T0 + 2, DEFAULT, 1)  # recorded, but not named as changed
    pair.sync.recorded({(T0 + 1, FALLBACK), (T0, DEFAULT)})
    kind, _, payload, _ = receive(pair.peer)
    assert kind == wire.CELLS
    assert wire.decode_cells(payload) == [(T0, DEFAULT, 3, 600), (T0 + 1, FALLBACK, 1, 50)]
    assert nothing_waiting(pair.peer)


def test_share_health_sends_it_to_the_peer(pair: Sync) -> None:
    pair.sync.share_health(HealthReport(FALLBACK, True, 1234))
    kind, _, payload, _ = receive(pair.peer)
    assert kind == wire.HEALTH
    assert wire.decode_health(payload) == (FALLBACK, True, 1234)


def test_a_drop_rate_of_one_sends_nothing(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    pair = Sync(ledger, new_socket(), new_socket(), SYNC_DROP_RATE="1")
    pair.ledger.record(T0, DEFAULT, 1)
    pair.sync.recorded({(T0, DEFAULT)})
    pair.sync.share_health(HealthReport(DEFAULT, True, 1))
    pair.handle(wire.encode_datagram(wire.PURGE, 1))
    assert nothing_waiting(pair.peer)


@contextmanager
def serving(sync: PeerSync) -> Iterator[asyncio.AbstractEventLoop]:
    """Run the sync's side of a dispatcher loop in a thread."""
    loop = asyncio.new_event_loop()
    sync.start(loop)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_purge_is_resent_until_acknowledged(pair: Sync) -> None:
    with serving(pair.sync) as loop:
        loop.call_soon_threadsafe(pair.sync.purged)
        first = receive(pair.peer)
        again = receive(pair.peer)  # no ack yet: sent again
        assert first[:3] == again[:3]
        assert (first[0], first[2]) == (wire.PURGE, b"")
        pair.peer.sendto(wire.encode_datagram(wire.PURGE_ACK, first[1]), pair.mine.getsockname())
        pair.peer.settimeout(0.3)  # three resend periods
        for _ in range(20):
            try:
                data, _ = pair.peer.recvfrom(2048)
            except TimeoutError:
                break  # acknowledged: the resends stopped
            assert wire.decode_datagram(data) == (wire.PURGE, first[1], b"")
        else:
            raise AssertionError("PURGE still resent after its PURGE_ACK")


def test_datagrams_from_anyone_but_the_peer_are_dropped(
    pair: Sync, new_socket: Callable[[], socket.socket]
) -> None:
    stranger = new_socket()
    target = pair.mine.getsockname()
    with serving(pair.sync):
        [foreign] = wire.encode_cells(wire.CELLS, [(T0, DEFAULT, 9, 9)])
        stranger.sendto(foreign, target)
        stranger.sendto(wire.encode_datagram(wire.PURGE, 1), target)
        pair.peer.sendto(b"garbage", target)
        [valid] = wire.encode_cells(wire.CELLS, [(T0, FALLBACK, 2, 20)])
        pair.peer.sendto(valid, target)
        wait_until(
            lambda: (pair.sync.dropped_foreign, pair.sync.dropped_malformed) == (2, 1)
            and pair.ledger.cell(PEER, T0, FALLBACK) == (2, 20)
        )
    assert own_cells(pair.ledger, PEER) == [(T0, FALLBACK, 2, 20)]
    stranger.settimeout(0.05)
    with pytest.raises(TimeoutError):
        stranger.recvfrom(2048)  # the stranger's PURGE was neither done nor acknowledged


# --- recover_from_peer ------------------------------------------------------------------------


def test_recover_from_peer_gets_our_cells_back_from_a_running_peer(
    new_ledger: Callable[[], Ledger], new_socket: Callable[[], socket.socket]
) -> None:
    restarted, survivor = new_ledger(), new_ledger()
    restarted_sock, survivor_sock = new_socket(), new_socket()
    ours = many_cells(130)  # what the restarted instance had recorded before it died
    theirs = many_cells(5, T0 + 500)
    store_all(survivor, PEER, ours)
    store_all(survivor, OWN, theirs)
    restarted.store(OWN, T0, DEFAULT, 100, 100)  # already higher: kept
    peer = PeerSync(settings_towards(restarted_sock), survivor, survivor_sock, lambda *_: None)
    with serving(peer):
        assert recover_from_peer(settings_towards(survivor_sock), restarted, restarted_sock)
    assert own_cells(restarted, OWN) == [(T0, DEFAULT, 100, 100), *ours[1:]]
    assert own_cells(restarted, PEER) == theirs
    assert restarted_sock.gettimeout() is None


def test_recover_from_a_peer_with_nothing_is_true_and_empty(
    new_ledger: Callable[[], Ledger], new_socket: Callable[[], socket.socket]
) -> None:
    restarted, survivor = new_ledger(), new_ledger()
    restarted_sock, survivor_sock = new_socket(), new_socket()
    peer = PeerSync(settings_towards(restarted_sock), survivor, survivor_sock, lambda *_: None)
    with serving(peer):
        assert recover_from_peer(settings_towards(survivor_sock), restarted, restarted_sock)
    assert all_cells(restarted) == ([], [])


def test_recover_from_a_silent_peer_gives_up(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    mine, silent = new_socket(), new_socket()
    settings = settings_towards(silent, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peer(settings, ledger, mine) is False
    nonces = set()
    for _ in range(RECOVERY_ATTEMPTS):
        kind, nonce, payload, _ = receive(silent)
        assert (kind, payload) == (wire.RECOVER_REQUEST, b"")
        nonces.add(nonce)
    assert len(nonces) == RECOVERY_ATTEMPTS  # each attempt with a fresh nonce
    assert nothing_waiting(silent)
    assert all_cells(ledger) == ([], [])


def test_recover_from_nobody_listening_gives_up(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    gone = new_socket()
    settings = settings_towards(gone, SYNC_RECOVER_TIMEOUT_S="0.1")
    gone.close()  # nobody there (an unconnected socket hears no ICMP error: attempts time out)
    assert recover_from_peer(settings, ledger, new_socket()) is False
    assert all_cells(ledger) == ([], [])


def test_recover_from_peer_ignores_answers_from_a_stranger(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    mine, peer, stranger = new_socket(), new_socket(), new_socket()

    def answer_from_the_stranger() -> None:
        peer.settimeout(1.0)
        for _ in range(RECOVERY_ATTEMPTS):
            try:
                data, address = peer.recvfrom(2048)
            except TimeoutError:
                return
            _, nonce, _ = wire.decode_datagram(data)
            [cells] = wire.encode_cells(wire.RECOVERY, [(T0, DEFAULT, 1, 1)], nonce)
            stranger.sendto(cells, address)
            stranger.sendto(wire.encode_recovery_done(nonce, 1), address)

    impostor = threading.Thread(target=answer_from_the_stranger, daemon=True)
    impostor.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peer(settings, ledger, mine) is False
    impostor.join(5)
    assert all_cells(ledger) == ([], [])


def test_recover_from_peer_ignores_answers_to_another_request(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    mine, peer = new_socket(), new_socket()

    def answer_with_a_wrong_nonce() -> None:
        peer.settimeout(1.0)
        for _ in range(RECOVERY_ATTEMPTS):
            try:
                data, address = peer.recvfrom(2048)
            except TimeoutError:
                return
            nonce = wire.decode_datagram(data)[1] ^ 1
            [cells] = wire.encode_cells(wire.RECOVERY, [(T0, DEFAULT, 1, 1)], nonce)
            peer.sendto(cells, address)
            peer.sendto(wire.encode_recovery_done(nonce, 1), address)

    answerer = threading.Thread(target=answer_with_a_wrong_nonce, daemon=True)
    answerer.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peer(settings, ledger, mine) is False
    answerer.join(5)
    assert all_cells(ledger) == ([], [])
