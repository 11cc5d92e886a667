"""native_ledger: the shared-memory payment ledger, from one process and from several forked.

The `ledger` fixture has two regions in use, OWN and PEER (a peer named "peer"), as a pair's
ledger has once it has heard of its peer; the region tests make more."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from native_ledger import (
    CENTS_BITS,
    DEFAULT,
    DEFAULT_REGIONS,
    FALLBACK,
    LABEL_BYTES,
    MAX_CENTS,
    MAX_COUNT,
    OWN,
    PEER,
    Ledger,
    pack,
    unlink,
    unpack,
)

SMALL = 1024
REGIONS = 4
CELL_BYTES = 16


def segment_bytes(seconds: int, regions: int) -> int:
    """Header, one 64-byte directory entry per region, then the cells of every region."""
    return 64 + 64 * regions + regions * seconds * 2 * CELL_BYTES
T0 = 1_752_000_000  # a Unix second in July 2025, when the contest ran
AMOUNT = 1990  # cents, the contest's usual R$ 19.90

CHILD_OK = 0
CHILD_FAILED = 1
CHILD_INCONSISTENT = 2
CHILD_TIMED_OUT = 3


@pytest.fixture
def name() -> Iterator[str]:
    segment = f"/rinha-test-{uuid4().hex[:12]}"
    yield segment
    unlink(segment)


@pytest.fixture
def ledger(name: str) -> Iterator[Ledger]:
    with Ledger(name, create=True, seconds=SMALL, regions=REGIONS) as opened:
        assert opened.assign_region("peer") == PEER
        yield opened


def shm_path(name: str) -> Path:
    """Where Linux keeps a POSIX shared-memory object."""
    return Path("/dev/shm") / name.lstrip("/")


def fork_child(body: Callable[[], int]) -> int:
    """Run body in a child that always ends in os._exit, with body's code or CHILD_FAILED."""
    pid = os.fork()
    if pid == 0:
        code = CHILD_FAILED
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- segment life cycle ---------------------------------------------------------------


def test_create_then_open_by_name_shares_the_cells(name: str) -> None:
    with Ledger(name, create=True, seconds=2048) as writer:
        assert (writer.name, writer.seconds) == (name, 2048)
        writer.add(OWN, T0, DEFAULT, AMOUNT)
        with Ledger(name, create=False, seconds=4096) as reader:
            assert reader.seconds == 2048  # from the header, the argument is ignored
            assert reader.get(OWN, T0, DEFAULT) == (1, AMOUNT)
            reader.add(OWN, T0, DEFAULT, 10)
        assert writer.get(OWN, T0, DEFAULT) == (2, AMOUNT + 10)


def test_default_ring_is_2_to_the_17_seconds_in_16_regions(name: str) -> None:
    with Ledger(name, create=True) as created:
        assert (created.seconds, created.regions, DEFAULT_REGIONS) == (131072, 16, 16)
        assert created.regions_in_use == 1
        assert shm_path(name).stat().st_size == segment_bytes(131072, 16)


def reserved_bytes(name: str) -> int:
    return shm_path(name).stat().st_blocks * 512


def test_only_the_regions_in_use_are_reserved(name: str) -> None:
    """16 regions of 4 MiB are 64 MiB of address space; a pair reserves 8 MiB of it, and
    neither writing nor purging touches the pages of a region not in use."""
    region = 131072 * 2 * CELL_BYTES
    with Ledger(name, create=True) as created:
        if reserved_bytes(name) == 0:
            pytest.skip("this file system does not report allocated blocks")
        assert region <= reserved_bytes(name) < 2 * region
        created.assign_region("api2")
        assert 2 * region <= reserved_bytes(name) < 3 * region
        for second in range(T0, T0 + 600):
            created.add(OWN, second, DEFAULT, 1)
            created.store(PEER, second, FALLBACK, 1, 1)
        created.purge()
        assert 2 * region <= reserved_bytes(name) < 3 * region


def test_create_refuses_an_existing_name(ledger: Ledger) -> None:
    with pytest.raises(FileExistsError):
        Ledger(ledger.name, create=True, seconds=SMALL)


def test_open_of_a_missing_name_raises_file_not_found(name: str) -> None:
    with pytest.raises(FileNotFoundError):
        Ledger(name, create=False)


def test_unlink_reports_whether_the_name_existed(name: str) -> None:
    Ledger(name, create=True, seconds=SMALL).close()
    assert unlink(name) is True
    assert unlink(name) is False


def test_close_is_idempotent_and_final(ledger: Ledger) -> None:
    ledger.close()
    ledger.close()
    assert ledger.closed
    for call in (
        lambda: ledger.add(OWN, T0, DEFAULT, 1),
        lambda: ledger.get(OWN, T0, DEFAULT),
        lambda: ledger.word(OWN, T0, DEFAULT),
        lambda: ledger.store(OWN, T0, DEFAULT, 1, 1),
        lambda: ledger.summary(None, None),
        lambda: ledger.region_summary(OWN, None, None),
        lambda: ledger.seconds_written(OWN),
        lambda: ledger.purge(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()


@pytest.mark.parametrize("seconds", [0, 1000, 512, 1023, 1025, 3000, 2**25, -1024, 2**70])
def test_create_refuses_seconds_not_a_power_of_two_from_1024(name: str, seconds: int) -> None:
    with pytest.raises(ValueError, match="seconds"):
        Ledger(name, create=True, seconds=seconds)
    assert not shm_path(name).exists()


def test_create_is_keyword_only_and_required(name: str) -> None:
    with pytest.raises(TypeError):
        Ledger(name)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Ledger(name, True)  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["", "/", "no-slash", "/a/b", "/nul\0byte"])
def test_names_must_be_one_slash_then_a_word(bad: str) -> None:
    with pytest.raises(ValueError, match="name"):
        Ledger(bad, create=True, seconds=SMALL)
    with pytest.raises(ValueError, match="name"):
        unlink(bad)


def test_open_refuses_a_segment_too_small_for_a_header(name: str) -> None:
    shm_path(name).write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="too small"):
        Ledger(name, create=False)


def test_open_refuses_garbage_of_a_ledger_size(name: str) -> None:
    shm_path(name).write_bytes(b"\xab" * segment_bytes(SMALL, 2))
    with pytest.raises(ValueError, match="not a rinha ledger"):
        Ledger(name, create=False)


def test_open_refuses_a_ledger_of_the_wrong_size(name: str) -> None:
    Ledger(name, create=True, seconds=SMALL, regions=2).close()
    os.truncate(shm_path(name), segment_bytes(SMALL, 2) + 4096)
    with pytest.raises(ValueError, match="bytes"):
        Ledger(name, create=False)


def test_open_refuses_another_layout_version(name: str) -> None:
    Ledger(name, create=True, seconds=SMALL).close()
    with shm_path(name).open("r+b") as segment:
        segment.seek(4)
        segment.write((99).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="version 99"):
        Ledger(name, create=False)


@pytest.mark.parametrize("regions", [0, 1, 257, -2])
def test_create_refuses_regions_outside_2_to_256(name: str, regions: int) -> None:
    with pytest.raises(ValueError, match="regions"):
        Ledger(name, create=True, seconds=SMALL, regions=regions)
    assert not shm_path(name).exists()


# --- regions: one per instance of the deployment --------------------------------------


def test_a_new_ledger_has_only_its_own_region_in_use(name: str) -> None:
    with Ledger(name, create=True, seconds=SMALL, regions=REGIONS) as created:
        assert (created.regions, created.regions_in_use, created.labels()) == (REGIONS, 1, [""])
        with pytest.raises(ValueError, match="region"):
            created.get(PEER, T0, DEFAULT)  # not in use until assigned
        assert created.region_of("api2") is None


def test_regions_are_given_out_in_order_once_per_label(ledger: Ledger) -> None:
    assert ledger.assign_region("api3") == 2
    assert ledger.assign_region("peer") == PEER  # already has one
    assert ledger.assign_region("api4") == 3
    assert ledger.labels() == ["", "peer", "api3", "api4"]
    assert [ledger.region_of(n) for n in ("peer", "api3", "api4", "api5")] == [1, 2, 3, None]
    assert ledger.regions_in_use == REGIONS
    with pytest.raises(LookupError, match="LEDGER_REGIONS"):
        ledger.assign_region("api5")
    assert ledger.labels() == ["", "peer", "api3", "api4"]


def test_another_process_sees_the_regions_and_labels(ledger: Ledger) -> None:
    ledger.assign_region("api3")
    ledger.store(2, T0, FALLBACK, 2, 40)
    with Ledger(ledger.name, create=False) as reopened:
        assert (reopened.regions, reopened.regions_in_use) == (REGIONS, 3)
        assert reopened.labels() == ["", "peer", "api3"]
        assert reopened.get(2, T0, FALLBACK) == (2, 40)


@pytest.mark.parametrize("label", ["", "x" * LABEL_BYTES, "nul\0byte"])
def test_labels_must_be_1_to_47_bytes_without_nul(ledger: Ledger, label: str) -> None:
    with pytest.raises(ValueError, match="label"):
        ledger.assign_region(label)
    with pytest.raises(ValueError, match="label"):
        ledger.region_of(label)
    assert ledger.regions_in_use == 2


def test_summary_adds_every_region_in_use(ledger: Ledger) -> None:
    third, fourth = ledger.assign_region("api3"), ledger.assign_region("api4")
    ledger.add(OWN, T0, DEFAULT, 1)
    ledger.store(PEER, T0, DEFAULT, 2, 20)
    ledger.store(third, T0 + 1, FALLBACK, 3, 300)
    ledger.store(fourth, T0 + 2, DEFAULT, 4, 4000)
    assert ledger.summary(None, None) == (7, 4021, 3, 300)
    assert ledger.summary(T0 + 1, T0 + 1) == (0, 0, 3, 300)
    assert ledger.region_summary(fourth, None, None) == (4, 4000, 0, 0)


def test_purge_keeps_the_labels_and_empties_every_region(ledger: Ledger) -> None:
    third = ledger.assign_region("api3")
    ledger.add(OWN, T0, DEFAULT, 1)
    ledger.store(third, T0, DEFAULT, 5, 5)
    ledger.purge()
    assert ledger.summary(None, None) == (0, 0, 0, 0)
    assert ledger.labels() == ["", "peer", "api3"]
    assert ledger.seconds_written(third) is None
    ledger.store(third, T0, DEFAULT, 1, 1)  # the same region, written again
    assert ledger.summary(None, None) == (1, 1, 0, 0)


def test_purge_empties_a_full_ring_and_a_span_wider_than_it(ledger: Ledger) -> None:
    for second in range(T0, T0 + 2 * SMALL + 3):
        ledger.add(OWN, second, DEFAULT, 1)
    ledger.add(OWN, T0 + 50 * SMALL, DEFAULT, 1)
    ledger.purge(OWN)
    assert ledger.summary(None, None) == (0, 0, 0, 0)
    for second in range(T0 + 50 * SMALL - SMALL + 1, T0 + 50 * SMALL + 1):
        assert ledger.word(OWN, second, DEFAULT) == 0
    # no slot kept its old second's total for a later write of that second
    assert ledger.add(OWN, T0 + 2 * SMALL + 2, DEFAULT, 7) == 0


# --- cells ---------------------------------------------------------------------------


def test_add_returns_the_word_before_and_get_unpacks_it(ledger: Ledger) -> None:
    assert ledger.add(OWN, T0, DEFAULT, AMOUNT) == 0
    assert ledger.add(OWN, T0, DEFAULT, 500) == pack(1, AMOUNT)
    assert ledger.word(OWN, T0, DEFAULT) == pack(2, AMOUNT + 500) == (2 << 40) + AMOUNT + 500
    assert ledger.get(OWN, T0, DEFAULT) == (2, AMOUNT + 500)
    assert unpack(ledger.add(OWN, T0, DEFAULT, 0)) == (2, AMOUNT + 500)
    assert ledger.get(OWN, T0, DEFAULT) == (3, AMOUNT + 500)


def test_cells_are_separate_per_region_second_and_processor(ledger: Ledger) -> None:
    ledger.add(OWN, T0, DEFAULT, 1)
    ledger.add(OWN, T0, FALLBACK, 20)
    ledger.add(PEER, T0, DEFAULT, 300)
    ledger.add(OWN, T0 + 1, DEFAULT, 4000)
    assert ledger.get(OWN, T0, DEFAULT) == (1, 1)
    assert ledger.get(OWN, T0, FALLBACK) == (1, 20)
    assert ledger.get(PEER, T0, DEFAULT) == (1, 300)
    assert ledger.get(PEER, T0, FALLBACK) == (0, 0)
    assert ledger.get(OWN, T0 + 1, DEFAULT) == (1, 4000)
    assert ledger.word(OWN, T0 + 2, DEFAULT) == 0


def test_cents_fill_their_40_bits_without_touching_the_count(ledger: Ledger) -> None:
    ledger.add(OWN, T0, DEFAULT, MAX_CENTS)
    assert ledger.get(OWN, T0, DEFAULT) == (1, MAX_CENTS)
    assert ledger.word(OWN, T0, DEFAULT) == (1 << CENTS_BITS) | MAX_CENTS


def test_store_sets_absolute_values(ledger: Ledger) -> None:
    ledger.add(PEER, T0, FALLBACK, 5)
    ledger.store(PEER, T0, FALLBACK, 7, 7 * AMOUNT)
    assert ledger.get(PEER, T0, FALLBACK) == (7, 7 * AMOUNT)
    ledger.store(PEER, T0, FALLBACK, MAX_COUNT, MAX_CENTS)
    assert ledger.get(PEER, T0, FALLBACK) == (MAX_COUNT, MAX_CENTS)
    ledger.store(PEER, T0 + 5, DEFAULT, 0, 0)
    assert ledger.seconds_written(PEER) == (T0, T0 + 5)


def test_ring_wrap_replaces_a_second_n_seconds_older(ledger: Ledger) -> None:
    ledger.add(OWN, T0, DEFAULT, 100)
    ledger.add(OWN, T0, DEFAULT, 100)
    assert ledger.add(OWN, T0 + SMALL, DEFAULT, 7) == 0  # the slot was reset first
    assert ledger.get(OWN, T0 + SMALL, DEFAULT) == (1, 7)
    assert ledger.get(OWN, T0, DEFAULT) == (0, 0)
    assert ledger.summary(T0, T0) == (0, 0, 0, 0)
    ledger.store(OWN, T0 + 2 * SMALL, DEFAULT, 3, 3)
    assert ledger.get(OWN, T0 + SMALL, DEFAULT) == (0, 0)
    assert ledger.get(OWN, T0 + 2 * SMALL, DEFAULT) == (3, 3)


def test_negative_seconds_are_ordinary_seconds(ledger: Ledger) -> None:
    ledger.add(OWN, -1, DEFAULT, 9)
    ledger.add(OWN, -1 - SMALL + 1, DEFAULT, 9)
    assert ledger.get(OWN, -1, DEFAULT) == (1, 9)
    assert ledger.summary(None, None) == (2, 18, 0, 0)


# --- summaries -----------------------------------------------------------------------


def fill_one_payment_per_second(ledger: Ledger, first: int, last: int) -> None:
    for second in range(first, last + 1):
        ledger.add(OWN, second, DEFAULT, 100)
        ledger.add(PEER, second, FALLBACK, 1)


def test_summary_bounds_are_inclusive_and_none_is_open(ledger: Ledger) -> None:
    fill_one_payment_per_second(ledger, T0, T0 + 9)
    assert ledger.summary(T0, T0 + 9) == (10, 1000, 10, 10)
    assert ledger.summary(T0 + 2, T0 + 4) == (3, 300, 3, 3)
    assert ledger.summary(T0 + 4, T0 + 4) == (1, 100, 1, 1)
    assert ledger.summary(None, T0 + 1) == (2, 200, 2, 2)
    assert ledger.summary(T0 + 8, None) == (2, 200, 2, 2)
    assert ledger.summary(None, None) == (10, 1000, 10, 10)
    assert ledger.summary() == ledger.summary(from_second=None, to_second=None)
    assert ledger.summary(T0 - 100, T0 - 1) == (0, 0, 0, 0)
    assert ledger.summary(T0 + 10, T0 + 100) == (0, 0, 0, 0)


def test_summary_of_a_reversed_window_is_zero(ledger: Ledger) -> None:
    fill_one_payment_per_second(ledger, T0, T0 + 9)
    assert ledger.summary(T0 + 5, T0 + 4) == (0, 0, 0, 0)


def test_summary_adds_own_and_peer_and_region_summary_splits_them(ledger: Ledger) -> None:
    ledger.add(OWN, T0, DEFAULT, 100)
    ledger.add(OWN, T0, FALLBACK, 10)
    ledger.add(PEER, T0, DEFAULT, 200)
    ledger.add(PEER, T0 + 1, DEFAULT, 300)
    assert ledger.region_summary(OWN, None, None) == (1, 100, 1, 10)
    assert ledger.region_summary(PEER, None, None) == (2, 500, 0, 0)
    assert ledger.region_summary(PEER, T0 + 1, None) == (1, 300, 0, 0)
    assert ledger.summary(None, None) == (3, 600, 1, 10)


def test_summary_sees_only_the_n_most_recent_seconds(ledger: Ledger) -> None:
    ledger.add(OWN, T0, DEFAULT, 1)
    ledger.add(OWN, T0 + SMALL + 5, DEFAULT, 2)
    assert ledger.seconds_written(OWN) == (T0, T0 + SMALL + 5)
    assert ledger.summary(None, None) == (1, 2, 0, 0)


def test_summary_counts_payments_on_a_full_ring(ledger: Ledger) -> None:
    for second in range(T0, T0 + 3 * SMALL):
        ledger.add(OWN, second, DEFAULT, 1)
    assert ledger.summary(None, None) == (SMALL, SMALL, 0, 0)
    assert ledger.summary(T0 + 2 * SMALL - 10, T0 + 2 * SMALL + 9) == (10, 10, 0, 0)


def test_summary_handles_the_int64_extremes(ledger: Ledger) -> None:
    top = 2**63 - 1
    ledger.add(OWN, top, DEFAULT, 5)
    ledger.add(OWN, -(2**63) + 1, FALLBACK, 6)
    assert ledger.summary(None, None) == (1, 5, 0, 0)  # the low one is far outside the ring
    assert ledger.summary(top, top) == (1, 5, 0, 0)


def test_seconds_written_spans_the_writes(ledger: Ledger) -> None:
    assert ledger.seconds_written(OWN) is None
    ledger.add(OWN, T0 + 3, DEFAULT, 1)
    ledger.add(OWN, T0 - 2, FALLBACK, 1)
    ledger.add(OWN, T0, DEFAULT, 1)
    assert ledger.seconds_written(OWN) == (T0 - 2, T0 + 3)
    assert ledger.seconds_written(PEER) is None


def test_purge_of_one_region_keeps_the_other(ledger: Ledger) -> None:
    fill_one_payment_per_second(ledger, T0, T0 + 9)
    ledger.purge(PEER)
    assert ledger.seconds_written(PEER) is None
    assert ledger.summary(None, None) == (10, 1000, 0, 0)
    assert ledger.get(PEER, T0, FALLBACK) == (0, 0)
    ledger.add(PEER, T0, FALLBACK, 4)
    assert ledger.get(PEER, T0, FALLBACK) == (1, 4)


def test_purge_of_both_regions_empties_the_ledger(ledger: Ledger) -> None:
    fill_one_payment_per_second(ledger, T0, T0 + 9)
    ledger.purge()
    assert ledger.seconds_written(OWN) is None
    assert ledger.seconds_written(PEER) is None
    assert ledger.summary(None, None) == (0, 0, 0, 0)
    assert ledger.word(OWN, T0, DEFAULT) == 0


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("region", [-1, 2, REGIONS, 2**70])
def test_region_must_be_one_in_use(ledger: Ledger, region: int) -> None:
    for call in (
        lambda: ledger.add(region, T0, DEFAULT, 1),
        lambda: ledger.get(region, T0, DEFAULT),
        lambda: ledger.word(region, T0, DEFAULT),
        lambda: ledger.store(region, T0, DEFAULT, 1, 1),
        lambda: ledger.region_summary(region, None, None),
        lambda: ledger.seconds_written(region),
        lambda: ledger.purge(region),
    ):
        with pytest.raises(ValueError, match="region"):
            call()


@pytest.mark.parametrize("processor", [-1, 2])
def test_processor_must_be_default_or_fallback(ledger: Ledger, processor: int) -> None:
    for call in (
        lambda: ledger.add(OWN, T0, processor, 1),
        lambda: ledger.get(OWN, T0, processor),
        lambda: ledger.word(OWN, T0, processor),
        lambda: ledger.store(OWN, T0, processor, 1, 1),
    ):
        with pytest.raises(ValueError, match="processor"):
            call()


@pytest.mark.parametrize("cents", [-1, MAX_CENTS + 1, 2**64, 2**100])
def test_cents_must_fit_40_bits(ledger: Ledger, cents: int) -> None:
    with pytest.raises(ValueError, match="cents"):
        ledger.add(OWN, T0, DEFAULT, cents)
    with pytest.raises(ValueError, match="cents"):
        ledger.store(OWN, T0, DEFAULT, 1, cents)
    assert ledger.seconds_written(OWN) is None


@pytest.mark.parametrize("count", [-1, MAX_COUNT + 1])
def test_count_must_fit_24_bits(ledger: Ledger, count: int) -> None:
    with pytest.raises(ValueError, match="count"):
        ledger.store(OWN, T0, DEFAULT, count, 0)


@pytest.mark.parametrize("second", [2**63, -(2**63)])
def test_second_must_be_an_int64_other_than_the_empty_tag(ledger: Ledger, second: int) -> None:
    with pytest.raises(ValueError, match="second"):
        ledger.add(OWN, second, DEFAULT, 1)


def test_non_integers_are_type_errors(ledger: Ledger) -> None:
    with pytest.raises(TypeError):
        ledger.add(OWN, float(T0), DEFAULT, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ledger.summary("yesterday", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ledger.add(OWN, T0, DEFAULT)  # type: ignore[call-arg]


# --- several processes ---------------------------------------------------------------


WRITERS = 4
ADDS_PER_WRITER = 20_000


def test_forked_writers_lose_no_add_and_readers_never_see_half_a_payment(
    ledger: Ledger,
) -> None:
    name = ledger.name
    ledger.add(OWN, T0, DEFAULT, AMOUNT)  # claim the slot now: resets need a single writer
    total = 1 + WRITERS * ADDS_PER_WRITER

    def read_until_done() -> int:
        reader = Ledger(name, create=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            count, cents = reader.get(OWN, T0, DEFAULT)
            summed = reader.summary(T0, T0)
            if cents != count * AMOUNT or summed[1] != summed[0] * AMOUNT:
                print(f"inconsistent read: get={(count, cents)} summary={summed}")
                return CHILD_INCONSISTENT
            if count == total:
                return CHILD_OK
        return CHILD_TIMED_OUT

    def add_many() -> int:
        writer = Ledger(name, create=False)
        for _ in range(ADDS_PER_WRITER):
            before = writer.add(OWN, T0, DEFAULT, AMOUNT)
            count, cents = unpack(before)
            if cents != count * AMOUNT:
                return CHILD_INCONSISTENT
        return CHILD_OK

    reader_pid = fork_child(read_until_done)
    writer_pids = [fork_child(add_many) for _ in range(WRITERS)]

    assert [wait_child(pid) for pid in writer_pids] == [CHILD_OK] * WRITERS
    assert wait_child(reader_pid) == CHILD_OK
    assert ledger.get(OWN, T0, DEFAULT) == (total, total * AMOUNT)
    assert ledger.summary(None, None) == (total, total * AMOUNT, 0, 0)
