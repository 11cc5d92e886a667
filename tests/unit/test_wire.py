"""wire: every encoding with its decoder, as round trips and tables of accepted and refused text."""

from __future__ import annotations

import struct

import pytest

from rinha import wire

UUID_TEXT = "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"
UUID_BYTES = bytes.fromhex("4a7901b87d264d9daa194dc1c7cf60b3")
T0 = 1_752_150_896  # 2025-07-10T12:34:56Z


# --- the queue record ---------------------------------------------------------------------


@pytest.mark.parametrize("cents", [1, 1990, wire.MAX_AMOUNT_CENTS, -1])
def test_payment_record_round_trips(cents: int) -> None:
    record = wire.encode_payment(UUID_BYTES, cents)
    assert len(record) == wire.PAYMENT_RECORD_SIZE == 24
    assert wire.decode_payment(record) == (UUID_BYTES, cents)


def test_payment_record_layout_is_uuid_then_little_endian_cents() -> None:
    assert wire.encode_payment(UUID_BYTES, 1990) == UUID_BYTES + (1990).to_bytes(8, "little")


# --- UUIDs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [UUID_TEXT, UUID_TEXT.upper(), "4A7901b8-7D26-4d9D-aA19-4dc1C7cf60B3"],
)
def test_parse_uuid_accepts_canonical_text_in_any_case(text: str) -> None:
    assert wire.parse_uuid(text) == UUID_BYTES


@pytest.mark.parametrize(
    "text",
    [
        "",
        UUID_TEXT[:-1],  # 35 characters
        UUID_TEXT + "0",  # 37 characters
        UUID_TEXT.replace("-", ""),  # 32 hex digits, no hyphens
        UUID_TEXT.replace("-", "") + "0000",  # 36 characters, but no hyphens
        "{" + UUID_TEXT[1:-1] + "}",  # braces in place of the first and last digit
        "{" + UUID_TEXT + "}",
        "urn:uuid:" + UUID_TEXT,
        "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60bg",  # non-hex digit
        "4a7901b87-d26-4d9d-aa19-4dc1c7cf60b3",  # hyphen one place off
        " 4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b",  # leading space
        "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b\n",
        "٤a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3",  # an Arabic-Indic digit four
    ],
)
def test_parse_uuid_refuses_anything_but_the_canonical_form(text: str) -> None:
    assert wire.parse_uuid(text) is None


@pytest.mark.parametrize("raw", [UUID_BYTES, bytes(16), b"\xff" * 16, bytes(range(16))])
def test_format_uuid_is_the_inverse_of_parse_uuid(raw: bytes) -> None:
    text = wire.format_uuid(raw)
    assert len(text) == 36 and text == text.lower()
    assert wire.parse_uuid(text) == raw


def test_format_uuid_prints_the_canonical_lowercase_form() -> None:
    assert wire.format_uuid(UUID_BYTES) == UUID_TEXT


# --- money --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("19.90", 1990),
        ("19.9", 1990),
        ("0.1", 10),
        ("0.10", 10),
        ("0.01", 1),
        ("1", 100),
        ("1e2", 10000),
        ("1E2", 10000),
        ("1e+2", 10000),
        ("1.5e1", 1500),
        ("100E-2", 100),
        ("1e-2", 1),
        ("19.900", 1990),  # three decimals, but the third is a zero: exactly 19.90
        ("1000000.00", wire.MAX_AMOUNT_CENTS),
        ("1000000", wire.MAX_AMOUNT_CENTS),
    ],
)
def test_parse_cents_is_exact(text: str, cents: int) -> None:
    assert wire.parse_cents(text) == cents


@pytest.mark.parametrize(
    "text",
    [
        "19.901",  # a fraction of a cent is refused, not rounded
        "1e-3",
        "0",
        "0.00",
        "-0",
        "-1",
        "-19.90",
        "1000000.01",
        "1e7",
        "01",  # not a JSON number
        "1.",
        ".5",
        "+1",
        " 1",
        "1 ",
        "0x10",
        "1_000",
        "1e400",
        "NaN",
        "Infinity",
        "-Infinity",
        "",
        "19,90",
    ],
)
def test_parse_cents_refuses_what_is_not_a_positive_amount_in_cents(text: str) -> None:
    assert wire.parse_cents(text) is None


@pytest.mark.parametrize("text", ["1e999999", "1E+999999999"])
def test_parse_cents_refuses_a_huge_exponent_instead_of_raising(text: str) -> None:
    assert wire.parse_cents(text) is None


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (0, "0.00"),
        (5, "0.05"),
        (10, "0.10"),
        (99, "0.99"),
        (100, "1.00"),
        (1990, "19.90"),
        (wire.MAX_AMOUNT_CENTS, "1000000.00"),
        (-5, "-0.05"),
        (-1990, "-19.90"),
        (123_456_789_012, "1234567890.12"),
    ],
)
def test_format_cents_prints_two_decimals(cents: int, text: str) -> None:
    assert wire.format_cents(cents) == text


@pytest.mark.parametrize("cents", [1, 10, 1990, 12345, wire.MAX_AMOUNT_CENTS])
def test_format_cents_round_trips_through_parse_cents(cents: int) -> None:
    assert wire.parse_cents(wire.format_cents(cents)) == cents


# --- instants -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "text"),
    [
        (T0, "2025-07-10T12:34:56.000Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (1_735_689_599, "2024-12-31T23:59:59.000Z"),
    ],
)
def test_format_requested_at_is_the_whole_second_in_utc(second: int, text: str) -> None:
    assert wire.format_requested_at(second) == text
    assert wire.parse_instant(text) == wire.Instant(second, False)


@pytest.mark.parametrize(
    ("text", "second", "has_fraction"),
    [
        ("2025-07-10T12:34:56.000Z", T0, False),
        ("2025-07-10T12:34:56Z", T0, False),
        ("2025-07-10T12:34:56z", T0, False),
        ("2025-07-10t12:34:56Z", T0, False),
        ("2025-07-10 12:34:56Z", T0, False),
        ("2025-07-10T12:34:56+00:00", T0, False),
        ("2025-07-10T12:34:56.000+00:00", T0, False),
        ("2025-07-10T15:34:56.000+03:00", T0, False),  # the offset converts to UTC
        ("2025-07-10T15:34:56.000+0300", T0, False),
        ("2025-07-10T15:34:56.000+03", T0, False),
        ("2025-07-10T09:34:56.000-03:00", T0, False),
        ("2025-07-10T14:04:56.000+01:30", T0, False),
        # "+03:00" unencoded in a query string arrives as " 03:00": the only reading is "+".
        ("2025-07-10T15:34:56.000 03:00", T0, False),
        ("2025-07-10T12:34:56.000", T0, False),  # no offset: UTC
        ("2025-07-10T12:34:56", T0, False),
        ("2025-07-10T12:34", T0 - 56, False),
        ("2025-07-10", T0 - (12 * 3600 + 34 * 60 + 56), False),
        ("2025-07-10T12:34:56.5Z", T0, True),
        ("2025-07-10T12:34:56,5Z", T0, True),
        ("2025-07-10T12:34:56.001Z", T0, True),
        ("2025-07-10T12:34:56.000999Z", T0, True),  # microseconds count
        ("2025-07-10T12:34:56.000000001Z", T0, True),  # and nanoseconds
        ("2025-07-10T12:34:56." + "0" * 60 + "1Z", T0, True),  # any number of digits
        ("2025-07-10T12:34:56." + "0" * 60 + "Z", T0, False),
        ("2025-07-10T12:34:56.999999999Z", T0, True),
        ("1970-01-01T00:00:00.000Z", 0, False),
        ("1969-12-31T23:59:59.999Z", -1, True),
        ("1969-12-31T23:59:59Z", -1, False),
    ],
)
def test_parse_instant(text: str, second: int, has_fraction: bool) -> None:
    assert wire.parse_instant(text) == wire.Instant(second, has_fraction)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "yesterday!",
        "2025-13-10T12:34:56Z",
        "2025-02-30T12:34:56Z",
        "2025-07-10T25:00:00Z",
        "2025-07-10T12:60:00Z",
        "2025-07-10T12:34:61Z",
        "2025-07-10T12Z",
        "2025-07-10T12:34:56.Z",
        "2025-07-10T12:34:56.000Zjunk",
        "2025-07-10T12:34:56.000Z ",
        "2025-07-10T12:34:56.000+24:00",
        "2025-07-10T12:34:56.000+03:60",
        "2025-07-10Z",
        "2025-07-10T12:34:56." + "0" * 1100 + "Z",  # past the length bound
        "1752150896000",
        "2025-07-10T12:34:56.000\u0000",
        "２０２５-07-10T12:34:56Z",  # non-ASCII digits
    ],
)
def test_parse_instant_refuses_what_is_not_an_instant(text: str) -> None:
    assert wire.parse_instant(text) is None


def at(second: int, has_fraction: bool = False) -> wire.Instant:
    return wire.Instant(second, has_fraction)


@pytest.mark.parametrize(
    ("start", "end", "window"),
    [
        (at(1, True), at(2, True), (2, 2)),  # 2.000 is the only whole second inside
        (at(2), at(2), (2, 2)),  # both ends inclusive
        (at(2), at(3), (2, 3)),
        (at(2, True), at(2, True), (3, 2)),  # no whole second inside: an empty window
        (at(0), at(0, True), (0, 0)),
        (at(0, True), at(0, True), (1, 0)),
        (at(-2, True), at(-1, True), (-1, -1)),
        (at(-2), at(-1), (-2, -1)),
        (None, at(2, True), (None, 2)),
        (at(1, True), None, (2, None)),
        (None, None, (None, None)),
    ],
)
def test_window_seconds_is_the_whole_seconds_inside_both_ends(
    start: wire.Instant | None, end: wire.Instant | None,
    window: tuple[int | None, int | None],
) -> None:
    assert wire.window_seconds(start, end) == window


def test_window_of_an_instant_pair_contains_exactly_the_requested_at_seconds() -> None:
    first, last = wire.window_seconds(
        wire.parse_instant("2025-07-10T12:34:55.000001Z"),
        wire.parse_instant("2025-07-10T12:34:58.000Z"),
    )
    assert (first, last) == (T0, T0 + 2)


# --- datagrams ----------------------------------------------------------------------------

ME = "api1"
NAMED = 1 + len(ME)  # the name field: a length byte and the bytes


def cells(n: int) -> list[wire.Cell]:
    return [(T0 + i, i % 2, i + 1, (i + 1) * 1990) for i in range(n)]


def cell_payload(subject: str, *packed: bytes) -> bytes:
    return bytes((len(subject),)) + subject.encode() + b"".join(packed)


@pytest.mark.parametrize("kind", [wire.PURGE, wire.PURGE_ACK, wire.RECOVER_REQUEST])
@pytest.mark.parametrize("nonce", [0, 1, 0xDEADBEEF, 2**32 - 1])
def test_bare_datagram_round_trips_with_its_sender(kind: int, nonce: int) -> None:
    data = wire.encode_datagram(kind, ME, nonce)
    assert len(data) == wire.DATAGRAM_HEADER.size + NAMED == 8 + 5
    assert data[:2] == wire.DATAGRAM_MAGIC
    assert wire.decode_datagram(data) == (kind, nonce, ME, b"")


@pytest.mark.parametrize("kind", [wire.CELLS, wire.RECOVERY])
@pytest.mark.parametrize("n", [1, 2, 63, 64])
def test_cells_round_trip_in_one_datagram_with_their_subject(kind: int, n: int) -> None:
    sent = cells(n)
    [data] = wire.encode_cells(kind, ME, "api3", sent, nonce=77)
    assert len(data) == 8 + NAMED + 1 + len("api3") + n * wire.CELL.size
    got_kind, nonce, origin, payload = wire.decode_datagram(data)
    assert (got_kind, nonce, origin) == (kind, 77, ME)
    assert wire.decode_cells(payload) == ("api3", sent)


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(0, []), (1, [1]), (64, [64]), (65, [64, 1]), (128, [64, 64]), (130, [64, 64, 2])],
)
def test_encode_cells_chunks_at_cells_per_datagram(n: int, sizes: list[int]) -> None:
    sent = cells(n)
    longest = "x" * wire.NAME_MAX
    datagrams = wire.encode_cells(wire.CELLS, longest, longest, sent, nonce=5)
    head = 8 + 2 * (1 + wire.NAME_MAX)
    assert [(len(d) - head) // wire.CELL.size for d in datagrams] == sizes
    # unfragmented on an Ethernet MTU: 1500 - 20 (IP) - 8 (UDP)
    assert all(len(d) <= head + wire.CELLS_PER_DATAGRAM * wire.CELL.size == 1448 <= 1472
               for d in datagrams)
    received = []
    for data in datagrams:
        kind, nonce, origin, payload = wire.decode_datagram(data)
        assert (kind, nonce, origin) == (wire.CELLS, 5, longest)
        subject, got = wire.decode_cells(payload)
        assert subject == longest
        received += got
    assert received == sent


def test_cells_carry_the_extremes_of_their_ranges() -> None:
    extremes = [
        (-(2**63), 0, 0, 0),
        (2**63 - 1, 1, wire.COUNT_LIMIT - 1, wire.CENTS_LIMIT - 1),
    ]
    [data] = wire.encode_cells(wire.CELLS, ME, ME, extremes)
    assert wire.decode_cells(wire.decode_datagram(data)[3]) == (ME, extremes)


@pytest.mark.parametrize("name", ["", "x" * (wire.NAME_MAX + 1)])
def test_names_must_be_1_to_47_bytes(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        wire.encode_datagram(wire.PURGE, name)
    with pytest.raises(ValueError, match="name"):
        wire.encode_cells(wire.CELLS, ME, name, cells(1))


@pytest.mark.parametrize("datagrams", [0, 1, 3, 2**32 - 1])
def test_recovery_done_round_trips(datagrams: int) -> None:
    kind, nonce, origin, payload = wire.decode_datagram(
        wire.encode_recovery_done(ME, 0xABCD, datagrams))
    assert (kind, nonce, origin) == (wire.RECOVERY_DONE, 0xABCD, ME)
    assert wire.decode_recovery_done(payload) == datagrams


@pytest.mark.parametrize(
    ("processor", "failing", "ms"),
    [(0, False, 0), (0, True, 100), (1, False, 5), (1, True, 2**32 - 1)],
)
def test_health_round_trips(processor: int, failing: bool, ms: int) -> None:
    kind, nonce, origin, payload = wire.decode_datagram(
        wire.encode_health(ME, processor, failing, ms))
    assert (kind, nonce, origin) == (wire.HEALTH, 0, ME)
    decoded = wire.decode_health(payload)
    assert decoded == (processor, failing, ms)
    assert type(decoded[1]) is bool


@pytest.mark.parametrize(("ms", "sent"), [(-5, 0), (2**32, 2**32 - 1), (10**12, 2**32 - 1)])
def test_health_clamps_the_response_time_into_32_bits(ms: int, sent: int) -> None:
    payload = wire.decode_datagram(wire.encode_health(ME, 1, False, ms))[3]
    assert wire.decode_health(payload) == (1, False, sent)


def header(magic: bytes = b"RQ", version: int = 2, kind: int = wire.CELLS,
           name: bytes = ME.encode()) -> bytes:
    return struct.pack("<2sBBI", magic, version, kind, 0) + bytes((len(name),)) + name


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RQ",
        header()[:7],
        header(magic=b"QR"),
        header(magic=b"\x00\x00"),
        header(version=0),
        header(version=1),  # the pair-only layout, without the sender's name
        header(version=3),
        header(kind=0),
        header(kind=wire.HEALTH + 1),
        header(kind=255),
        header()[:8],  # no name
        header(name=b""),
        header(name=b"x" * (wire.NAME_MAX + 1)),
        header()[:-1],  # a name shorter than its length byte says
        header(name=b"\xff\xfe"),  # not UTF-8
    ],
)
def test_decode_datagram_refuses_what_is_not_ours(data: bytes) -> None:
    with pytest.raises(wire.MalformedDatagram):
        wire.decode_datagram(data)


@pytest.mark.parametrize("kind", range(wire.CELLS, wire.HEALTH + 1))
def test_decode_datagram_accepts_every_kind(kind: int) -> None:
    assert wire.decode_datagram(header(kind=kind) + b"xyz") == (kind, 0, ME, b"xyz")


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no subject
        cell_payload(""),
        cell_payload(ME, b"\x00"),
        cell_payload(ME, b"\x00" * (wire.CELL.size - 1)),
        cell_payload(ME, b"\x00" * (wire.CELL.size + 1)),
        cell_payload(ME, b"\x00" * (wire.CELL.size * (wire.CELLS_PER_DATAGRAM + 1))),
        cell_payload(ME, wire.CELL.pack(T0, 2, 1, 1)),  # no such processor
        cell_payload(ME, wire.CELL.pack(T0, 255, 1, 1)),
        cell_payload(ME, wire.CELL.pack(T0, 0, wire.COUNT_LIMIT, 1)),
        cell_payload(ME, wire.CELL.pack(T0, 0, 1, wire.CENTS_LIMIT)),
        cell_payload(ME, wire.CELL.pack(T0, 0, 1, 1), wire.CELL.pack(T0, 1, 2**32 - 1, 1)),
    ],
)
def test_decode_cells_refuses_wrong_lengths_and_out_of_range_values(payload: bytes) -> None:
    with pytest.raises(wire.MalformedDatagram):
        wire.decode_cells(payload)


def test_decode_cells_of_a_subject_alone_is_no_cells() -> None:
    assert wire.decode_cells(cell_payload(ME)) == (ME, [])


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00" * 5, b"\x00" * 7, struct.pack("<BBI", 2, 0, 1), struct.pack("<BBI", 0, 2, 1)],
)
def test_decode_health_refuses_wrong_lengths_and_values(payload: bytes) -> None:
    with pytest.raises(wire.MalformedDatagram):
        wire.decode_health(payload)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 3, b"\x00" * 5])
def test_decode_recovery_done_refuses_wrong_lengths(payload: bytes) -> None:
    with pytest.raises(wire.MalformedDatagram):
        wire.decode_recovery_done(payload)
