"""redis_store: the scripts and the recovery, against a real redis-server of the test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from uuid import uuid4

import pytest

from rinha.ledger import DEFAULT, FALLBACK, OWN, Ledger
from rinha.mirror import region_cells
from rinha.redis_store import (
    CHANNEL,
    EPOCH_KEY,
    MEMBERS_KEY,
    PURGE,
    READ_RECENT,
    WRITE,
    cells_key,
    parse_cell,
    parse_hash,
    recent_key,
    recover_from_redis,
    write_args,
)
from rinha.settings import load
from tests.processes import RedisServer

T0 = 1_752_150_896


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, on a free port, its files in a temporary directory."""
    started = RedisServer()
    yield started
    started.stop()


@pytest.fixture
def client(server: RedisServer):  # type: ignore[no-untyped-def]
    connection = server.client()
    yield connection
    connection.close()


@pytest.fixture
def new_ledger() -> Iterator[Callable[[], Ledger]]:
    made: list[tuple[str, Ledger]] = []

    def make() -> Ledger:
        name = f"/rinha-test-{uuid4().hex[:10]}"
        made.append((name, Ledger.create(name, 1024, 4)))
        return made[-1][1]

    yield make
    for name, ledger in made:
        ledger.close()
        Ledger.unlink(name)


def write(client, name: str, epoch: int, cells, messages=()):  # type: ignore[no-untyped-def]
    script = client.register_script(WRITE)
    return script(keys=[EPOCH_KEY, MEMBERS_KEY, cells_key(epoch, name), recent_key(epoch, name)],
                  args=[epoch, name, CHANNEL, len(messages), *messages, *write_args(cells)])


def stored(client, name: str, epoch: int = 1):  # type: ignore[no-untyped-def]
    return sorted(parse_hash(client.hgetall(cells_key(epoch, name))))


def test_write_keeps_the_larger_count_of_each_cell(client) -> None:  # type: ignore[no-untyped-def]
    assert write(client, "a", 1, [(T0, DEFAULT, 5, 500), (T0, FALLBACK, 1, 9)]) == [1, 1]
    assert write(client, "a", 1, [(T0, DEFAULT, 3, 300), (T0 + 1, DEFAULT, 2, 2)]) == [1, 0]
    assert write(client, "a", 1, [(T0, FALLBACK, 4, 36)]) == [1, 0]
    assert stored(client, "a") == [(T0, DEFAULT, 5, 500), (T0, FALLBACK, 4, 36),
                                   (T0 + 1, DEFAULT, 2, 2)]
    assert client.smembers(MEMBERS_KEY) == {b"a"}


def test_write_for_another_epoch_writes_nothing_and_says_which(client) -> None:  # type: ignore[no-untyped-def]
    client.set(EPOCH_KEY, 3)
    assert write(client, "a", 2, [(T0, DEFAULT, 1, 1)]) == [3, 0]
    assert stored(client, "a", 2) == stored(client, "a", 3) == []


def test_write_publishes_its_messages(client, server) -> None:  # type: ignore[no-untyped-def]
    listener = server.client().pubsub()
    listener.subscribe(CHANNEL)
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    write(client, "a", 1, [(T0, DEFAULT, 1, 1)], [b"first", b"second"])
    got = [listener.get_message(timeout=2)["data"] for _ in range(2)]
    assert got == [b"first", b"second"]
    listener.close()


def test_read_recent_gives_the_others_recent_cells_and_says_if_ours_are_there(client) -> None:  # type: ignore[no-untyped-def]
    read = client.register_script(READ_RECENT)
    assert read(keys=[EPOCH_KEY, MEMBERS_KEY], args=["a", 60_000]) == [None, 0]
    write(client, "b", 1, [(T0, DEFAULT, 2, 20)])
    write(client, "c", 1, [(T0 - 500, FALLBACK, 1, 1)])  # an old second, written now: recent
    epoch, mine, *rest = read(keys=[EPOCH_KEY, MEMBERS_KEY], args=["a", 60_000])
    assert (epoch, mine) == (1, 0)
    got = {rest[i].decode(): [parse_cell(f, v) for f, v in zip(rest[i + 1], rest[i + 2],
                                                               strict=True)]
           for i in range(0, len(rest), 3)}
    assert got == {"b": [(T0, DEFAULT, 2, 20)], "c": [(T0 - 500, FALLBACK, 1, 1)]}
    write(client, "a", 1, [(T0, DEFAULT, 1, 1)])
    assert read(keys=[EPOCH_KEY, MEMBERS_KEY], args=["a", 60_000])[:2] == [1, 1]
    # nothing written within the window: nothing to read
    client.zadd(recent_key(1, "b"), {f"{T0}:0": 1})  # scored long ago
    client.delete(recent_key(1, "c"))
    assert read(keys=[EPOCH_KEY, MEMBERS_KEY], args=["a", 60_000]) == [1, 1]


def test_purge_starts_a_new_epoch_and_deletes_the_old_cells(client) -> None:  # type: ignore[no-untyped-def]
    write(client, "a", 1, [(T0, DEFAULT, 1, 1)])
    write(client, "b", 1, [(T0, DEFAULT, 1, 1)])
    assert client.register_script(PURGE)(keys=[EPOCH_KEY, MEMBERS_KEY]) == 2
    assert stored(client, "a") == stored(client, "b") == []
    assert not client.exists(recent_key(1, "a"))
    assert write(client, "b", 1, [(T0, DEFAULT, 9, 9)]) == [2, 0]  # a writer that missed it


@pytest.mark.parametrize(("raw_field", "raw_value"), [
    (b"x:0", b"1:1"), (b"1:2", b"1:1"), (b"1:0", b"-1:1"), (b"1:0", b"1"),
    (b"1:0", str(1 << 24).encode() + b":1"), (b"1:0", b"1:" + str(1 << 40).encode()),
    (b"1:0", b"\xff"),
])
def test_parse_cell_ignores_what_is_not_a_cell(raw_field: bytes, raw_value: bytes) -> None:
    assert parse_cell(raw_field, raw_value) is None


def test_recover_from_redis_brings_back_our_cells_and_everyone_elses(
    client, server, new_ledger  # type: ignore[no-untyped-def]
) -> None:
    ledger = new_ledger()
    ledger.store(OWN, T0, DEFAULT, 9, 90)  # already higher here: kept
    write(client, "me", 1, [(T0, DEFAULT, 4, 40), (T0 + 1, FALLBACK, 2, 2)])
    write(client, "b", 1, [(T0, DEFAULT, 3, 30)])
    write(client, "c", 1, [(T0 + 2, DEFAULT, 1, 1)])
    settings = load({"INSTANCE_NAME": "me", "SYNC_URL": server.url})
    assert recover_from_redis(settings, ledger) == 2
    assert region_cells(ledger, OWN) == [(T0, DEFAULT, 9, 90), (T0 + 1, FALLBACK, 2, 2)]
    assert region_cells(ledger, ledger.region_of("b")) == [(T0, DEFAULT, 3, 30)]
    assert region_cells(ledger, ledger.region_of("c")) == [(T0 + 2, DEFAULT, 1, 1)]
    assert ledger.sync_epoch == 1


def test_a_ledger_of_an_older_epoch_is_purged_before_it_recovers(
    client, server, new_ledger  # type: ignore[no-untyped-def]
) -> None:
    ledger = new_ledger()
    ledger.sync_epoch = 1
    ledger.store(OWN, T0, DEFAULT, 7, 7)  # counted before a purge this instance missed
    client.set(EPOCH_KEY, 2)
    write(client, "b", 2, [(T0 + 5, DEFAULT, 1, 1)])
    settings = load({"INSTANCE_NAME": "me", "SYNC_URL": server.url})
    assert recover_from_redis(settings, ledger) == 1
    assert region_cells(ledger, OWN) == []
    assert ledger.summary(None, None) == (1, 1, 0, 0)
    assert ledger.sync_epoch == 2


def test_recover_from_a_redis_that_is_not_there_is_none(new_ledger) -> None:  # type: ignore[no-untyped-def]
    gone = RedisServer()
    gone.stop()
    settings = load({"INSTANCE_NAME": "me", "SYNC_URL": gone.url,
                     "SYNC_RECOVER_TIMEOUT_S": "0.2"})
    ledger = new_ledger()
    assert recover_from_redis(settings, ledger) is None
    assert ledger.summary(None, None) == (0, 0, 0, 0)


# --- RedisSync.handle: a message from the channel ---------------------------------------------


def carrier(ledger: Ledger):  # type: ignore[no-untyped-def]
    from rinha.redis_sync import RedisSync

    health: list = []
    settings = load({"INSTANCE_NAME": "me", "SYNC_URL": "redis://127.0.0.1:1/0"})
    return RedisSync(settings, ledger, health.append), health


def test_cells_of_the_current_epoch_merge_into_the_senders_region(new_ledger) -> None:  # type: ignore[no-untyped-def]
    from rinha import wire

    ledger = new_ledger()
    ledger.sync_epoch = 3
    sync, _ = carrier(ledger)
    [message] = wire.encode_cells(wire.CELLS, "b", "b", [(T0, DEFAULT, 2, 20)], 3)
    sync.handle(message)
    assert region_cells(ledger, ledger.region_of("b")) == [(T0, DEFAULT, 2, 20)]


def test_cells_of_an_older_epoch_are_dropped_however_late_they_come(new_ledger) -> None:  # type: ignore[no-untyped-def]
    from rinha import wire

    ledger = new_ledger()
    ledger.sync_epoch = 3
    sync, _ = carrier(ledger)
    [message] = wire.encode_cells(wire.CELLS, "b", "b", [(T0, DEFAULT, 2, 20)], 2)
    sync.handle(message)
    assert ledger.summary(None, None) == (0, 0, 0, 0)
    assert ledger.sync_epoch == 3


def test_cells_of_a_newer_epoch_purge_first_then_merge(new_ledger) -> None:  # type: ignore[no-untyped-def]
    from rinha import wire

    ledger = new_ledger()
    ledger.sync_epoch = 3
    ledger.store(OWN, T0, DEFAULT, 5, 5)  # counted before the purge this instance missed
    sync, _ = carrier(ledger)
    [message] = wire.encode_cells(wire.CELLS, "b", "b", [(T0 + 9, FALLBACK, 1, 1)], 4)
    sync.handle(message)
    assert ledger.sync_epoch == 4
    assert ledger.summary(None, None) == (0, 0, 1, 1)


def test_our_own_echo_is_skipped_and_a_purge_message_purges_once(new_ledger) -> None:  # type: ignore[no-untyped-def]
    from rinha import wire

    ledger = new_ledger()
    ledger.sync_epoch = 1
    ledger.store(OWN, T0, DEFAULT, 5, 5)
    sync, health = carrier(ledger)
    [echo] = wire.encode_cells(wire.CELLS, "me", "me", [(T0, DEFAULT, 9, 9)], 1)
    sync.handle(echo)
    assert ledger.summary(None, None) == (5, 5, 0, 0)
    sync.handle(wire.encode_datagram(wire.PURGE, "b", 1))  # not newer: nothing
    assert ledger.summary(None, None) == (5, 5, 0, 0)
    sync.handle(wire.encode_datagram(wire.PURGE, "b", 2))
    assert (ledger.summary(None, None), ledger.sync_epoch) == ((0, 0, 0, 0), 2)
    sync.handle(wire.encode_health("b", DEFAULT, True, 40))
    assert len(health) == 1 and health[0].failing


def test_cells_of_someone_else_or_garbage_are_dropped_and_counted(new_ledger) -> None:  # type: ignore[no-untyped-def]
    from rinha import wire

    ledger = new_ledger()
    ledger.sync_epoch = 1
    sync, _ = carrier(ledger)
    [relayed] = wire.encode_cells(wire.CELLS, "b", "c", [(T0, DEFAULT, 1, 1)], 1)
    sync.handle(relayed)
    sync.handle(b"not ours")
    assert sync.dropped_malformed == 2
    assert ledger.summary(None, None) == (0, 0, 0, 0)
