"""wire: the edges mutation testing found untested (tests/mutation): what a queue record is, a
control record's magic, negative cents, offsets up to 23:59, one-character instance names, the
first values out of a cell's range."""

from __future__ import annotations

from uuid import uuid4

import pytest

from rinha import wire

ID = uuid4().bytes


@pytest.mark.parametrize(
    ("record", "is_payment"),
    [
        (wire.encode_payment(ID, 1), True),
        (wire.encode_payment(ID, wire.MAX_AMOUNT_CENTS), True),
        (wire.encode_payment(ID, 0), False),  # never queued: parse_payment refuses it
        (wire.encode_payment(ID, -1990), False),
        (wire.encode_control(wire.CONTROL_PURGED), False),
        (wire.encode_payment(ID, 1990) + b"\0", False),
        (wire.encode_payment(ID, 1990)[:-1], False),
        (b"", False),
    ],
)
def test_is_payment_record(record: bytes, is_payment: bool) -> None:
    assert wire.is_payment_record(record) is is_payment


@pytest.mark.parametrize("magic", [b"ABCD", b"CTRK", b"CTRM", b"ZZZZ"])
def test_a_control_record_needs_its_exact_magic(magic: bytes) -> None:
    assert wire.decode_control(wire.CONTROL_RECORD.pack(magic, wire.CONTROL_PURGED)) is None
    assert wire.decode_control(wire.encode_control(wire.CONTROL_PURGED)) == wire.CONTROL_PURGED


@pytest.mark.parametrize(("cents", "text"), [(-1, "-0.01"), (-100, "-1.00"), (-199, "-1.99")])
def test_format_cents_of_small_negative_amounts(cents: int, text: str) -> None:
    assert wire.format_cents(cents) == text


@pytest.mark.parametrize(
    ("text", "second"),
    [
        ("2025-07-10T12:34:56+23:00", 1_752_150_896 - 23 * 3600),
        ("2025-07-10T12:34:56-23:59", 1_752_150_896 + 23 * 3600 + 59 * 60),
    ],
)
def test_offsets_up_to_23_59_are_instants(text: str, second: int) -> None:
    assert wire.parse_instant(text) == wire.Instant(second, False)


@pytest.mark.parametrize("origin", ["a", "ab", "abc", "abcdefg", "stack-api1", "x" * wire.NAME_MAX])
@pytest.mark.parametrize("subject", ["b", "cd", "y" * wire.NAME_MAX])
def test_names_of_any_allowed_length_round_trip(origin: str, subject: str) -> None:
    cells = [(1_752_150_896, 1, 3, 300)]
    [datagram] = wire.encode_cells(wire.CELLS, origin, subject, cells, 7)
    kind, nonce, got_origin, payload = wire.decode_datagram(datagram)
    assert (kind, nonce, got_origin) == (wire.CELLS, 7, origin)
    assert wire.decode_cells(payload) == (subject, cells)


@pytest.mark.parametrize(
    "cell",
    [(0, 0, wire.COUNT_LIMIT, 0), (0, 0, 1, wire.CENTS_LIMIT)],
    ids=["count", "cents"],
)
def test_the_first_count_and_cents_out_of_range_are_refused(cell) -> None:
    second, processor, count, cents = cell
    fits = (second, processor, min(count, wire.COUNT_LIMIT - 1), min(cents, wire.CENTS_LIMIT - 1))
    [ok] = wire.encode_cells(wire.CELLS, "a", "a", [fits])
    assert wire.decode_cells(wire.decode_datagram(ok)[3]) == ("a", [fits])
    [datagram] = wire.encode_cells(wire.CELLS, "a", "a", [cell])
    with pytest.raises(wire.MalformedDatagram, match="out of range"):
        wire.decode_cells(wire.decode_datagram(datagram)[3])


@pytest.mark.parametrize("text", ["19.906", "0.016", "1.005", "999999.996"])
def test_parse_cents_refuses_a_third_decimal_whichever_way_it_would_round(text: str) -> None:
    assert wire.parse_cents(text) is None


def test_an_instant_text_may_be_1024_characters_and_no_more() -> None:
    head, tail = "2025-07-10T12:34:56.", "Z"
    longest = head + "0" * (1024 - len(head) - len(tail)) + tail
    assert wire.parse_instant(longest) == wire.Instant(1_752_150_896, False)
    assert wire.parse_instant(longest[:-1] + "0Z") is None  # 1025 characters


@pytest.mark.parametrize("magic", [b"ZQ", b"RZ", b"AQ"])
def test_a_datagram_needs_the_exact_magic(magic: bytes) -> None:
    datagram = wire.encode_datagram(wire.CELLS, "a", 0, b"")
    with pytest.raises(wire.MalformedDatagram, match="unknown datagram"):
        wire.decode_datagram(magic + datagram[2:])


@pytest.mark.parametrize("cell", [(0, 0, 1, wire.CENTS_LIMIT * 2), (0, 0, 1, 2**64 - 1),
                                  (0, 0, wire.COUNT_LIMIT * 2, 1), (0, 0, 2**32 - 1, 1)])
def test_values_far_out_of_range_are_refused_too(cell) -> None:
    [datagram] = wire.encode_cells(wire.CELLS, "a", "a", [cell])
    with pytest.raises(wire.MalformedDatagram, match="out of range"):
        wire.decode_cells(wire.decode_datagram(datagram)[3])


def test_the_cell_limits_are_the_ledger_s_24_bits_of_count_and_40_of_cents() -> None:
    """Literal numbers on purpose: a cell travels as absolute values the receiving ledger
    packs into 24 bits of count and 40 bits of cents (native_ledger)."""
    def decodes(count: int, cents: int) -> bool:
        [datagram] = wire.encode_cells(wire.CELLS, "a", "a", [(0, 0, count, cents)])
        try:
            wire.decode_cells(wire.decode_datagram(datagram)[3])
        except wire.MalformedDatagram:
            return False
        return True

    assert decodes(2**24 - 1, 2**40 - 1)
    assert not decodes(2**24, 1)
    assert not decodes(1, 2**40)


@pytest.mark.parametrize("record", [b"CTRL", b"CTRL\x01\0\0\0\0", bytes(24)])
def test_decode_control_of_a_record_of_another_size_is_none(record: bytes) -> None:
    assert wire.decode_control(record) is None


def test_an_offset_instant_is_a_whole_second_in_an_int() -> None:
    instant = wire.parse_instant("2025-07-10T09:34:56-03:00")
    assert instant == wire.Instant(1_752_150_896, False)
    assert type(instant.second) is int
