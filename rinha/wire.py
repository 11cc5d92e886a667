"""Every binary and text encoding that crosses a process boundary, each with its decoder beside it.

Used by the intake workers (payment record onto the queue), the dispatcher (the same record off
the queue, the processor request body) and the summary (money and instants as the contest's
JSON prints them). Money is integer cents everywhere: the contest's consistency check compares
our totals with the processors' to the cent, and floats would drift (docs/architecture.md,
invariant 2).
"""

from __future__ import annotations

import functools
import re
import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, DecimalException

# The queue record: 16 raw UUID bytes and the amount in cents. 24 bytes keeps the kernel's
# per-user message-queue budget for as many messages as possible (docs/measurements.md,
# "POSIX message queues").
PAYMENT_RECORD = struct.Struct("<16sq")
PAYMENT_RECORD_SIZE = PAYMENT_RECORD.size

# The largest amount accepted. The ledger packs a second's total into 40 bits of cents, so a
# ceiling per payment keeps thousands of maximal payments per second exact.
MAX_AMOUNT_CENTS = 100_000_000  # 1,000,000.00

_HEX = "[0-9a-fA-F]"
_UUID_TEXT = re.compile(f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def encode_payment(correlation_id: bytes, cents: int) -> bytes:
    return PAYMENT_RECORD.pack(correlation_id, cents)


def decode_payment(record: bytes) -> tuple[bytes, int]:
    return PAYMENT_RECORD.unpack(record)


def is_payment_record(record: bytes) -> bool:
    """A queue record is a payment iff it has the payment's size and a positive amount: the
    workers never queue any other (parse_payment refuses 0 and below), and a control record
    is shorter."""
    return len(record) == PAYMENT_RECORD_SIZE and PAYMENT_RECORD.unpack(record)[1] > 0


# Control records share the queue with payments (one queue, so one reader sees both in order):
# 8 bytes, a magic and a kind, so no control record can be read as a payment or the reverse.
CONTROL_RECORD = struct.Struct("<4sI")
CONTROL_MAGIC = b"CTRL"
CONTROL_PURGED = 1  # a worker purged the ledger (POST /purge-payments): tell the peer


def encode_control(kind: int) -> bytes:
    return CONTROL_RECORD.pack(CONTROL_MAGIC, kind)


def decode_control(record: bytes) -> int | None:
    """The kind of a control record, or None if the bytes are not one."""
    if len(record) != CONTROL_RECORD.size:
        return None
    magic, kind = CONTROL_RECORD.unpack(record)
    return kind if magic == CONTROL_MAGIC else None


def parse_uuid(text: str) -> bytes | None:
    """The 16 bytes of a canonical 8-4-4-4-12 UUID, or None if it is not one."""
    if len(text) != 36 or not _UUID_TEXT.fullmatch(text):
        return None
    return bytes.fromhex(text.replace("-", ""))


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_cents(number_text: str) -> int | None:
    """Exact cents of a JSON number literal, or None unless 0 < amount <= MAX, 2 decimals at most.

    Decimal on the literal text, never a float: "19.90" is 1990 cents, "0.1" is 10,
    "19.901" is refused rather than rounded.
    """
    if not _JSON_NUMBER.fullmatch(number_text):
        return None
    try:
        cents = Decimal(number_text) * 100
    except DecimalException:  # e.g. Overflow for 1e999999
        return None
    if cents != cents.to_integral_value() or not 0 < cents <= MAX_AMOUNT_CENTS:
        return None
    return int(cents)


def format_cents(cents: int) -> str:
    """Cents as a JSON number with exactly two decimals: 1990 -> 19.90."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{whole}.{frac:02d}"


@functools.lru_cache(maxsize=4)
def format_requested_at(second: int) -> str:
    """The processor's requestedAt for a whole second: 2025-07-10T12:34:56.000Z.

    Whole seconds on purpose: the ledger's bucket of a payment is exactly this second, so for
    any [from, to] our summary counts the same payments as the processor's (invariant 2).
    Cached: hundreds of payments a second share one.
    """
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))


# An ISO-8601 instant as the summary's from/to and the processors' requestedAt spell it: a date,
# optionally a time with any number of fraction digits, optionally an offset. The offset's "+"
# may arrive as a space: in a query string "+" means a space unless it is sent as %2B, and a
# space cannot mean anything else right after a time, so it is read as the "+" it was.
_INSTANT = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2})(?::(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(?:([Zz])|([+\- ])(\d{2})(?::?(\d{2}))?)?)?",
    re.ASCII,  # \d is 0-9 only: int() would take other scripts' digits too
)
_MAX_INSTANT_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Instant:
    """A moment as whole seconds since the epoch plus whether a fraction of a second follows:
    all a window over whole-second buckets needs, at whatever precision the text had."""

    second: int  # the whole second at or before the moment (floor, also before 1970)
    has_fraction: bool  # the moment lies strictly after `second`


def parse_instant(text: str) -> Instant | None:
    """The instant an ISO-8601 text names, or None if it is not one.

    A time without an offset is UTC, as the contest sends it ("...T12:34:56.000Z"). Fraction
    digits are kept at their full precision: "56.000000001" lies after second 56, so a window
    starting there does not contain second 56, as the processors (which compare at their own
    precision, finer than milliseconds) would not count a payment at 56.000 either.
    """
    if len(text) > _MAX_INSTANT_CHARS:
        return None
    match = _INSTANT.fullmatch(text)
    if match is None:
        return None
    (year, month, day, hour, minute, second, fraction, _zulu, sign, offset_hours,
     offset_minutes) = match.groups()
    if hour is not None and minute is None:
        return None  # "T12" alone: not an instant anyone sends
    try:
        moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), tzinfo=UTC)
    except ValueError:  # month 13, hour 25, February 30...
        return None
    offset_s = 0
    if sign is not None:
        hours, minutes = int(offset_hours), int(offset_minutes or 0)
        if hours > 23 or minutes > 59:
            return None
        offset_s = (hours * 60 + minutes) * 60 * (-1 if sign == "-" else 1)
    delta = moment - _EPOCH
    whole = delta.days * 86_400 + delta.seconds - offset_s
    return Instant(whole, bool(fraction) and fraction.strip("0") != "")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window_seconds(
    start: Instant | None, end: Instant | None
) -> tuple[int | None, int | None]:
    """The whole seconds s whose instant s.000... lies in [start, end], both ends inclusive.

    A payment sent with requestedAt s.000Z is in the window iff start <= s <= end, so the
    first second is start rounded up and the last is end rounded down.
    """
    first = None if start is None else start.second + start.has_fraction
    last = None if end is None else end.second
    return first, last


# Sync messages (UDP datagrams between peers, and the same bytes as Redis pub/sub messages) ----
# header: magic, version, kind, nonce, then the sender's INSTANCE_NAME (one length byte and its
# bytes): each instance's cells live in a region of its own named after it (rinha/ledger.py).
# Then a payload whose shape depends on the kind; cell payloads first name whose cells they
# are (the subject: the sender itself in CELLS, anyone in a RECOVERY answer).
# Cells carry ABSOLUTE values (second, processor, count, cents), never deltas, so a lost,
# duplicated or reordered datagram heals with the next one (docs/architecture.md, invariant 6).

DATAGRAM_MAGIC = b"RQ"
DATAGRAM_VERSION = 2
DATAGRAM_HEADER = struct.Struct("<2sBBI")
CELL = struct.Struct("<qBIQ")
NAME_MAX = 47  # a ledger region's label (native_ledger.LABEL_BYTES - 1)
# 8 + 2 x (1 + 47) + 64 * 21 = 1448 bytes: one unfragmented datagram on any Ethernet MTU.
CELLS_PER_DATAGRAM = 64
COUNT_LIMIT = 1 << 24
CENTS_LIMIT = 1 << 40

CELLS = 1  # the sender's own cells (subject = sender), for the region the receiver keeps of it
PURGE = 2  # the sender's ledger was purged: purge every region too
PURGE_ACK = 3  # the receiver of PURGE (nonce) did it
RECOVER_REQUEST = 4  # a restarted sender asks for every cell the receiver holds
RECOVERY = 5  # the answer: one subject's cells as the receiver holds them (its own or a mirror)
RECOVERY_DONE = 6  # the reply to RECOVER_REQUEST (nonce) is complete: payload = datagram count
HEALTH = 7  # a processor's service-health, from the one instance that polls it

_KINDS = frozenset(range(CELLS, HEALTH + 1))
_U32 = struct.Struct("<I")
_HEALTH = struct.Struct("<BBI")

Cell = tuple[int, int, int, int]  # second, processor, count, cents


class MalformedDatagram(ValueError):
    """Not one of ours: wrong magic, version, kind or length, or a value out of range."""


def _name(name: str) -> bytes:
    raw = name.encode()
    if not 1 <= len(raw) <= NAME_MAX:
        raise ValueError(f"an instance name is 1..{NAME_MAX} bytes: {name!r}")
    return bytes((len(raw),)) + raw


def _take_name(data: bytes, offset: int) -> tuple[str, int]:
    if offset >= len(data):
        raise MalformedDatagram("no name")
    size = data[offset]
    end = offset + 1 + size
    if not 1 <= size <= NAME_MAX or end > len(data):
        raise MalformedDatagram("a name of a wrong length")
    try:
        return data[offset + 1:end].decode(), end
    except UnicodeDecodeError:
        raise MalformedDatagram("a name that is not UTF-8") from None


def encode_datagram(kind: int, origin: str, nonce: int = 0, payload: bytes = b"") -> bytes:
    return DATAGRAM_HEADER.pack(DATAGRAM_MAGIC, DATAGRAM_VERSION, kind, nonce) + _name(origin) \
        + payload


def encode_cells(kind: int, origin: str, subject: str, cells: list[Cell], nonce: int = 0
                 ) -> list[bytes]:
    """`subject`'s cells in as many datagrams as they need (none for no cells)."""
    head = _name(subject)
    return [
        encode_datagram(kind, origin, nonce, head + b"".join(CELL.pack(*c) for c in chunk))
        for chunk in (
            cells[i:i + CELLS_PER_DATAGRAM] for i in range(0, len(cells), CELLS_PER_DATAGRAM)
        )
    ]


def encode_health(origin: str, processor: int, failing: bool, min_response_ms: int) -> bytes:
    payload = _HEALTH.pack(processor, failing, min(max(min_response_ms, 0), 2**32 - 1))
    return encode_datagram(HEALTH, origin, 0, payload)


def encode_recovery_done(origin: str, nonce: int, datagrams: int) -> bytes:
    return encode_datagram(RECOVERY_DONE, origin, nonce, _U32.pack(datagrams))


def decode_datagram(data: bytes) -> tuple[int, int, str, bytes]:
    """(kind, nonce, origin, payload), or MalformedDatagram."""
    if len(data) < DATAGRAM_HEADER.size:
        raise MalformedDatagram("short datagram")
    magic, version, kind, nonce = DATAGRAM_HEADER.unpack_from(data)
    if magic != DATAGRAM_MAGIC or version != DATAGRAM_VERSION or kind not in _KINDS:
        raise MalformedDatagram(f"unknown datagram {magic!r} v{version} kind {kind}")
    origin, end = _take_name(data, DATAGRAM_HEADER.size)
    return kind, nonce, origin, data[end:]


def decode_cells(payload: bytes) -> tuple[str, list[Cell]]:
    """(subject, cells) of a CELLS or RECOVERY payload."""
    subject, start = _take_name(payload, 0)
    payload = payload[start:]
    if len(payload) % CELL.size or len(payload) > CELL.size * CELLS_PER_DATAGRAM:
        raise MalformedDatagram("cells payload of a wrong length")
    cells = list(CELL.iter_unpack(payload))
    for _, processor, count, cents in cells:
        if processor > 1 or count >= COUNT_LIMIT or cents >= CENTS_LIMIT:
            raise MalformedDatagram("cell value out of range")
    return subject, cells


def decode_health(payload: bytes) -> tuple[int, bool, int]:
    if len(payload) != _HEALTH.size:
        raise MalformedDatagram("health payload of a wrong length")
    processor, failing, min_response_ms = _HEALTH.unpack(payload)
    if processor > 1 or failing > 1:
        raise MalformedDatagram("health value out of range")
    return processor, bool(failing), min_response_ms


def decode_recovery_done(payload: bytes) -> int:
    if len(payload) != _U32.size:
        raise MalformedDatagram("recovery-done payload of a wrong length")
    return _U32.unpack(payload)[0]
