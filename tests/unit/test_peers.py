"""peers: cell listing and merging on a real ledger, PeerSync and the recovery over real UDP
sockets, with one peer (the contest's pair) and with several.

Names: the instance under test is ME; its peer is PEER_NAME, whose cells land in region PEER (1,
the first region given out), others get the next regions."""

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
from rinha.peer_recovery import RECOVERY_ATTEMPTS, recover_from_peers
from rinha.peers import PeerAddress, PeerSync, merge_cells, own_cells
from rinha.settings import Settings, load

ME = "me"
PEER_NAME = "peer"
SECONDS = 1024
REGIONS = 4
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
        ledger = Ledger.create(name, SECONDS, REGIONS)
        ledger.assign_region(PEER_NAME)  # as a pair's ledger once it heard of its peer
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


def settings_towards(*peers: socket.socket, name: str = ME, **env: str) -> Settings:
    addresses = ",".join(f"{LOCALHOST}:{port(peer)}" for peer in peers)
    return load({"PEERS": addresses, "INSTANCE_NAME": name, **env})


def receive(sock: socket.socket) -> tuple[int, int, bytes, tuple[str, int]]:
    """(kind, nonce, payload, sender address) of the next datagram, checking it names ME."""
    sock.settimeout(2.0)
    data, address = sock.recvfrom(2048)
    kind, nonce, origin, payload = wire.decode_datagram(data)
    assert origin == ME
    return kind, nonce, payload, address


def cells_of(name: str, cells: list[wire.Cell], kind: int = wire.CELLS, nonce: int = 0,
             sender: str | None = None) -> list[bytes]:
    return wire.encode_cells(kind, sender or name, name, cells, nonce)


def from_peer(kind: int, nonce: int = 0, payload: bytes = b"") -> bytes:
    return wire.encode_datagram(kind, PEER_NAME, nonce, payload)


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
    """A PeerSync named ME on socket `mine`, whose configured peers are `peers` (the first is
    `peer`, named PEER_NAME)."""

    def __init__(self, ledger: Ledger, mine: socket.socket, *peers: socket.socket, **env: str):
        self.ledger = ledger
        self.mine = mine
        self.peer = peers[0]
        self.peers = peers
        self.health: list[HealthReport] = []
        self.sync = PeerSync(settings_towards(*peers, **env), ledger, mine, self.health.append)

    @property
    def peer_address(self) -> tuple[str, int]:
        return self.peer.getsockname()

    def handle(self, data: bytes) -> int | None:
        return self.sync.handle(data, self.peer_address)


@pytest.fixture
def pair(ledger: Ledger, new_socket: Callable[[], socket.socket]) -> Sync:
    return Sync(ledger, new_socket(), new_socket())


def test_cells_merge_into_the_senders_region(pair: Sync) -> None:
    sent = many_cells(70)
    for data in cells_of(PEER_NAME, sent):
        assert pair.handle(data) == PEER
    assert all_cells(pair.ledger) == ([], sent)


def test_a_sender_heard_of_for_the_first_time_gets_the_next_region(pair: Sync) -> None:
    [data] = cells_of("third", [(T0, DEFAULT, 2, 20)])
    assert pair.handle(data) == 2
    assert pair.ledger.mirrors() == {PEER_NAME: PEER, "third": 2}
    assert own_cells(pair.ledger, 2) == [(T0, DEFAULT, 2, 20)]
    assert pair.ledger.summary(None, None) == (2, 20, 0, 0)


def test_cells_from_a_sender_past_the_last_region_are_dropped(pair: Sync) -> None:
    for name in ("third", "fourth"):
        pair.handle(cells_of(name, [(T0, DEFAULT, 1, 1)])[0])
    assert pair.handle(cells_of("fifth", [(T0, DEFAULT, 9, 9)])[0]) is None
    assert pair.ledger.summary(None, None) == (2, 2, 0, 0)


def test_stale_cells_never_lower_the_peer_region(pair: Sync) -> None:
    pair.ledger.store(PEER, T0, DEFAULT, 5, 500)
    [data] = cells_of(PEER_NAME, [(T0, DEFAULT, 4, 400), (T0, FALLBACK, 1, 9)])
    pair.handle(data)
    assert own_cells(pair.ledger, PEER) == [(T0, DEFAULT, 5, 500), (T0, FALLBACK, 1, 9)]


def test_purge_purges_every_region_and_is_acknowledged(pair: Sync) -> None:
    pair.ledger.record(T0, DEFAULT, 1990)
    pair.ledger.store(PEER, T0, FALLBACK, 3, 300)
    pair.handle(cells_of("third", [(T0, DEFAULT, 2, 2)])[0])
    pair.handle(from_peer(wire.PURGE, 0xC0FFEE))
    assert all_cells(pair.ledger) == ([], [])
    assert pair.ledger.summary(None, None) == (0, 0, 0, 0)
    kind, nonce, payload, sender = receive(pair.peer)
    assert (kind, nonce, payload) == (wire.PURGE_ACK, 0xC0FFEE, b"")
    assert sender == pair.mine.getsockname()


def test_a_purge_heard_again_is_acknowledged_but_not_carried_out_again(pair: Sync) -> None:
    """A resent PURGE whose acknowledgement was lost must not erase what was recorded since."""
    pair.ledger.record(T0, DEFAULT, 1990)
    pair.handle(from_peer(wire.PURGE, 0xC0FFEE))
    assert receive(pair.peer)[:2] == (wire.PURGE_ACK, 0xC0FFEE)
    pair.ledger.record(T0 + 1, DEFAULT, 2990)  # after the purge
    pair.handle(from_peer(wire.PURGE, 0xC0FFEE))
    assert receive(pair.peer)[:2] == (wire.PURGE_ACK, 0xC0FFEE)  # acknowledged again
    assert own_cells(pair.ledger, OWN) == [(T0 + 1, DEFAULT, 1, 2990)]
    pair.handle(from_peer(wire.PURGE, 0xBEEF))  # another purge is one
    assert own_cells(pair.ledger, OWN) == []
    assert nothing_waiting(pair.peer) is False  # its acknowledgement


def test_a_purge_is_remembered_for_as_long_as_a_peer_may_resend_it(pair: Sync) -> None:
    """A peer resends every 0.1 s for up to PURGE_GIVE_UP_S: half a second later is well
    within that (how long it is remembered exactly, 20 s, is not waited for here)."""
    pair.handle(from_peer(wire.PURGE, 0xC0FFEE))
    time.sleep(0.5)
    pair.ledger.record(T0, DEFAULT, 1990)
    pair.handle(from_peer(wire.PURGE, 0xC0FFEE))
    assert own_cells(pair.ledger, OWN) == [(T0, DEFAULT, 1, 1990)]


def test_a_purge_this_instance_sent_and_heard_back_is_not_carried_out_again(pair: Sync) -> None:
    pair.sync.purged()
    kind, nonce, _, _ = receive(pair.peer)
    assert kind == wire.PURGE
    pair.ledger.record(T0, DEFAULT, 1990)
    pair.handle(from_peer(wire.PURGE, nonce))
    assert own_cells(pair.ledger, OWN) == [(T0, DEFAULT, 1, 1990)]


def test_a_peer_s_cells_are_dropped_until_it_acknowledges_this_instance_s_purge(
    pair: Sync,
) -> None:
    """Cells the peer sent before it purged can arrive after this instance purged: its region
    here would keep payments the peer itself no longer counts."""
    pair.sync.purged()
    kind, nonce, _, _ = receive(pair.peer)
    assert kind == wire.PURGE
    [before] = cells_of(PEER_NAME, [(T0, DEFAULT, 4, 400)])
    assert pair.handle(before) == PEER
    assert own_cells(pair.ledger, PEER) == []
    pair.handle(from_peer(wire.PURGE_ACK, nonce))
    [after] = cells_of(PEER_NAME, [(T0 + 1, FALLBACK, 1, 100)])
    pair.handle(after)
    assert own_cells(pair.ledger, PEER) == [(T0 + 1, FALLBACK, 1, 100)]


def test_a_purge_heard_is_passed_on_to_the_other_peers_and_their_old_cells_dropped(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    """Three instances: a purge through nginx reaches one; the one that hears of it tells the
    third too, and drops the third's cells until the third has purged."""
    first, third = new_socket(), new_socket()
    trio = Sync(ledger, new_socket(), first, third)
    ledger.record(T0, DEFAULT, 1990)
    trio.handle(from_peer(wire.PURGE, 0xC0FFEE))
    assert own_cells(ledger, OWN) == []
    assert receive(first)[:2] == (wire.PURGE_ACK, 0xC0FFEE)
    assert receive(third)[:3] == (wire.PURGE, 0xC0FFEE, b"")  # passed on with the same nonce
    assert nothing_waiting(first)  # the one it came from is not told again
    from_third = third.getsockname()
    [old] = cells_of("third", [(T0, DEFAULT, 7, 700)])
    region = trio.sync.handle(old, from_third)
    assert own_cells(ledger, region) == []
    trio.sync.handle(wire.encode_datagram(wire.PURGE_ACK, "third", 0xC0FFEE), from_third)
    [new] = cells_of("third", [(T0 + 1, DEFAULT, 1, 100)])
    assert trio.sync.handle(new, from_third) == region
    assert own_cells(ledger, region) == [(T0 + 1, DEFAULT, 1, 100)]
    # The first's cells were never held back: it sent the purge, so it had purged.
    [firsts] = cells_of(PEER_NAME, [(T0 + 2, DEFAULT, 1, 50)])
    trio.handle(firsts)
    assert own_cells(ledger, PEER) == [(T0 + 2, DEFAULT, 1, 50)]


def recovery_answer(sock: socket.socket, nonce: int) -> tuple[dict[str, list[wire.Cell]], int]:
    """Every RECOVERY datagram up to RECOVERY_DONE: cells by subject, and the datagram count."""
    by_subject: dict[str, list[wire.Cell]] = {}
    datagrams = 0
    while True:
        kind, got, payload, _ = receive(sock)
        assert got == nonce
        if kind == wire.RECOVERY_DONE:
            assert wire.decode_recovery_done(payload) == datagrams
            return by_subject, datagrams
        assert kind == wire.RECOVERY
        subject, cells = wire.decode_cells(payload)
        by_subject.setdefault(subject, []).extend(cells)
        datagrams += 1


def test_recover_request_is_answered_with_every_region_by_instance_name(pair: Sync) -> None:
    theirs = many_cells(70)  # our mirror of the requester: two datagrams
    ours = many_cells(3, T0 + 100)
    third = many_cells(2, T0 + 200)
    store_all(pair.ledger, PEER, theirs)
    store_all(pair.ledger, OWN, ours)
    pair.handle(cells_of("third", third)[0])
    pair.handle(from_peer(wire.RECOVER_REQUEST, 4242))
    by_subject, datagrams = recovery_answer(pair.peer, 4242)
    assert datagrams == 4
    assert by_subject == {ME: ours, PEER_NAME: theirs, "third": third}
    assert nothing_waiting(pair.peer)


def test_recover_request_to_an_empty_ledger_is_answered_with_zero_datagrams(pair: Sync) -> None:
    pair.handle(from_peer(wire.RECOVER_REQUEST, 7))
    assert recovery_answer(pair.peer, 7) == ({}, 0)


@pytest.mark.parametrize(
    ("processor", "failing", "ms"), [(DEFAULT, True, 250), (FALLBACK, False, 0)]
)
def test_health_is_passed_on_decoded(pair: Sync, processor: int, failing: bool, ms: int) -> None:
    pair.handle(wire.encode_health(PEER_NAME, processor, failing, ms))
    assert pair.health == [HealthReport(processor, failing, ms)]


@pytest.mark.parametrize(
    "data",
    [
        cells_of(ME, [(T0, 0, 1, 1)], wire.RECOVERY, nonce=1, sender=PEER_NAME)[0],
        wire.encode_recovery_done(PEER_NAME, 1, 3),
        from_peer(wire.PURGE_ACK, 1),
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
        b"RQ\x02",
        b"XX" + from_peer(wire.CELLS)[2:],
        from_peer(wire.CELLS)[:2] + b"\x09" + from_peer(wire.CELLS)[3:],
        from_peer(0),
        from_peer(wire.CELLS, 0, b"\x04peer" + b"\x00" * 5),
        from_peer(wire.CELLS, 0, b"\x04peer" + wire.CELL.pack(T0, 2, 1, 1)),
        from_peer(wire.HEALTH, 0, b"\x00" * 5),
        from_peer(wire.HEALTH, 0, b"\x00\x02\x00\x00\x00\x00"),
        from_peer(wire.PURGE, 1, b"x"),
        # a peer's cells must be its own (only a recovery answer relays others')
        cells_of("third", [(T0, DEFAULT, 1, 1)], sender=PEER_NAME)[0],
        cells_of(ME, [(T0, DEFAULT, 1, 1)], sender=PEER_NAME)[0],
        # nobody else is ME: two instances sharing a name would overwrite each other's cells
        cells_of(ME, [(T0, DEFAULT, 1, 1)])[0],
        wire.encode_datagram(wire.PURGE, ME, 1),
    ],
)
def test_malformed_datagrams_raise_and_change_nothing(pair: Sync, data: bytes) -> None:
    pair.ledger.record(T0, DEFAULT, 5)
    with pytest.raises(wire.MalformedDatagram):
        pair.handle(data)
    assert all_cells(pair.ledger) == ([(T0, DEFAULT, 1, 5)], [])
    assert pair.ledger.summary(None, None) == (1, 5, 0, 0)
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
    assert wire.decode_cells(payload) == (ME, [(T0, DEFAULT, 3, 600), (T0 + 1, FALLBACK, 1, 50)])
    assert nothing_waiting(pair.peer)


def test_share_health_sends_it_to_the_peer(pair: Sync) -> None:
    pair.sync.share_health(HealthReport(FALLBACK, True, 1234))
    kind, _, payload, _ = receive(pair.peer)
    assert kind == wire.HEALTH
    assert wire.decode_health(payload) == (FALLBACK, True, 1234)


def test_with_several_peers_cells_and_health_go_to_each(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    peers = [new_socket() for _ in range(3)]
    trio = Sync(ledger, new_socket(), *peers)
    trio.ledger.record(T0, FALLBACK, 7)
    trio.sync.recorded({(T0, FALLBACK)})
    trio.sync.share_health(HealthReport(DEFAULT, False, 3))
    for peer in peers:
        kind, _, payload, _ = receive(peer)
        assert (kind, wire.decode_cells(payload)) == (wire.CELLS, (ME, [(T0, FALLBACK, 1, 7)]))
        kind, _, payload, _ = receive(peer)
        assert (kind, wire.decode_health(payload)) == (wire.HEALTH, (DEFAULT, False, 3))
        assert nothing_waiting(peer)


def test_a_drop_rate_of_one_sends_nothing(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    pair = Sync(ledger, new_socket(), new_socket(), SYNC_DROP_RATE="1")
    pair.ledger.record(T0, DEFAULT, 1)
    pair.sync.recorded({(T0, DEFAULT)})
    pair.sync.share_health(HealthReport(DEFAULT, True, 1))
    pair.handle(from_peer(wire.PURGE, 1))
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


def purges_heard(sock: socket.socket, nonce: int, window_s: float = 0.3) -> int:
    """PURGEs of `nonce` arriving within `window_s` of each other (three resend periods)."""
    sock.settimeout(window_s)
    heard = 0
    for _ in range(20):
        try:
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            return heard
        assert wire.decode_datagram(data) == (wire.PURGE, nonce, ME, b"")
        heard += 1
    raise AssertionError("PURGE resent for ever")


def test_purge_is_resent_to_each_peer_until_that_peer_acknowledges(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    quick, slow = new_socket(), new_socket()
    trio = Sync(ledger, new_socket(), quick, slow)
    with serving(trio.sync) as loop:
        loop.call_soon_threadsafe(trio.sync.purged)
        first = receive(quick)
        again = receive(quick)  # no ack yet: sent again
        assert first[:3] == again[:3]
        assert (first[0], first[2]) == (wire.PURGE, b"")
        quick.sendto(wire.encode_datagram(wire.PURGE_ACK, "quick", first[1]),
                     trio.mine.getsockname())
        purges_heard(quick, first[1])  # drain what was in flight before the ack
        assert purges_heard(quick, first[1]) == 0  # acknowledged: no more for this peer
        assert purges_heard(slow, first[1], 0.1) > 0  # still resent to the other one
        slow.sendto(wire.encode_datagram(wire.PURGE_ACK, "slow", first[1]),
                    trio.mine.getsockname())
        purges_heard(slow, first[1])
        assert purges_heard(slow, first[1]) == 0
        # Acknowledged by all: forgotten (not kept until it is given up on with an error).
        assert trio.sync._pending_purges == {}


def test_datagrams_from_anyone_but_a_peer_are_dropped(
    pair: Sync, new_socket: Callable[[], socket.socket]
) -> None:
    stranger = new_socket()
    target = pair.mine.getsockname()
    with serving(pair.sync):
        [foreign] = cells_of(PEER_NAME, [(T0, DEFAULT, 9, 9)])  # even naming the peer
        stranger.sendto(foreign, target)
        stranger.sendto(from_peer(wire.PURGE, 1), target)
        pair.peer.sendto(b"garbage", target)
        [valid] = cells_of(PEER_NAME, [(T0, FALLBACK, 2, 20)])
        pair.peer.sendto(valid, target)
        wait_until(
            lambda: (pair.sync.dropped_foreign, pair.sync.dropped_malformed) == (2, 1)
            and pair.ledger.cell(PEER, T0, FALLBACK) == (2, 20)
        )
    assert own_cells(pair.ledger, PEER) == [(T0, FALLBACK, 2, 20)]
    stranger.settimeout(0.05)
    with pytest.raises(TimeoutError):
        stranger.recvfrom(2048)  # the stranger's PURGE was neither done nor acknowledged


# --- recover_from_peers -----------------------------------------------------------------------


def survivor_of(restarted_sock: socket.socket, name: str, ledger: Ledger,
                sock: socket.socket) -> PeerSync:
    """A running instance `name` whose configured peer is the restarting one."""
    return PeerSync(settings_towards(restarted_sock, name=name), ledger, sock, lambda *_: None)


def test_recover_from_peers_gets_our_cells_back_from_a_running_peer(
    new_ledger: Callable[[], Ledger], new_socket: Callable[[], socket.socket]
) -> None:
    restarted, survivor = new_ledger(), new_ledger()
    restarted_sock, survivor_sock = new_socket(), new_socket()
    ours = many_cells(130)  # what the restarted instance had recorded before it died
    theirs = many_cells(5, T0 + 500)
    survivor.assign_region(ME)
    store_all(survivor, survivor.region_of(ME), ours)
    store_all(survivor, OWN, theirs)
    restarted.store(OWN, T0, DEFAULT, 100, 100)  # already higher: kept
    with serving(survivor_of(restarted_sock, PEER_NAME, survivor, survivor_sock)):
        assert recover_from_peers(settings_towards(survivor_sock), restarted,
                                  restarted_sock) == 1
    assert own_cells(restarted, OWN) == [(T0, DEFAULT, 100, 100), *ours[1:]]
    assert own_cells(restarted, PEER) == theirs
    assert restarted_sock.gettimeout() is None


def test_recover_from_several_peers_one_down_gets_everything_the_others_hold(
    new_ledger: Callable[[], Ledger], new_socket: Callable[[], socket.socket]
) -> None:
    """Three instances, ME restarting with fresh memory while "down" is down too: "up" holds
    ME's cells and a mirror of "down"'s, and gives both back with its own."""
    restarted, up_ledger = new_ledger(), new_ledger()
    restarted_sock, up_sock, down_sock = new_socket(), new_socket(), new_socket()
    ours, theirs, downs = many_cells(4), many_cells(3, T0 + 50), many_cells(2, T0 + 90)
    store_all(up_ledger, up_ledger.assign_region(ME), ours)
    store_all(up_ledger, OWN, theirs)
    store_all(up_ledger, up_ledger.assign_region("down"), downs)
    settings = settings_towards(up_sock, down_sock, SYNC_RECOVER_TIMEOUT_S="0.3")
    with serving(survivor_of(restarted_sock, "up", up_ledger, up_sock)):
        assert recover_from_peers(settings, restarted, restarted_sock) == 1
    assert own_cells(restarted, OWN) == ours
    mirrors = restarted.mirrors()
    assert set(mirrors) == {PEER_NAME, "up", "down"}
    assert own_cells(restarted, mirrors["up"]) == theirs
    assert own_cells(restarted, mirrors["down"]) == downs
    assert restarted.summary(None, None)[0] + restarted.summary(None, None)[2] == \
        sum(c[2] for c in ours + theirs + downs)


def test_recover_from_a_peer_with_nothing_is_true_and_empty(
    new_ledger: Callable[[], Ledger], new_socket: Callable[[], socket.socket]
) -> None:
    restarted, survivor = new_ledger(), new_ledger()
    restarted_sock, survivor_sock = new_socket(), new_socket()
    with serving(survivor_of(restarted_sock, PEER_NAME, survivor, survivor_sock)):
        assert recover_from_peers(settings_towards(survivor_sock), restarted,
                                  restarted_sock) == 1
    assert all_cells(restarted) == ([], [])


def test_recover_from_a_silent_peer_gives_up(
    ledger: Ledger, new_socket: Callable[[], socket.socket]
) -> None:
    mine, silent = new_socket(), new_socket()
    settings = settings_towards(silent, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peers(settings, ledger, mine) == 0
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
    assert recover_from_peers(settings, ledger, new_socket()) == 0
    assert all_cells(ledger) == ([], [])


def test_recover_from_peers_ignores_answers_from_a_stranger(
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
            nonce = wire.decode_datagram(data)[1]
            [cells] = cells_of(ME, [(T0, DEFAULT, 1, 1)], wire.RECOVERY, nonce, PEER_NAME)
            stranger.sendto(cells, address)
            stranger.sendto(wire.encode_recovery_done(PEER_NAME, nonce, 1), address)

    impostor = threading.Thread(target=answer_from_the_stranger, daemon=True)
    impostor.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peers(settings, ledger, mine) == 0
    impostor.join(5)
    assert all_cells(ledger) == ([], [])


def test_recover_from_peers_ignores_answers_to_another_request(
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
            [cells] = cells_of(ME, [(T0, DEFAULT, 1, 1)], wire.RECOVERY, nonce, PEER_NAME)
            peer.sendto(cells, address)
            peer.sendto(wire.encode_recovery_done(PEER_NAME, nonce, 1), address)

    answerer = threading.Thread(target=answer_with_a_wrong_nonce, daemon=True)
    answerer.start()
    settings = settings_towards(peer, SYNC_RECOVER_TIMEOUT_S="0.1")
    assert recover_from_peers(settings, ledger, mine) == 0
    answerer.join(5)
    assert all_cells(ledger) == ([], [])
