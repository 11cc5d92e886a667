"""native_ledger._intake.parse, the C route's parser, against intake.parse_payment.

One definition of what is valid: C answers a body itself only when it is certain that Python
would queue the same 24 bytes; every other body goes to Python, whose answer stands. So for every
body, parse(body) is either None (Python answers) or exactly the record Python would queue, and
then both paths answer 202. The differential test below checks that on more than 100,000
generated bodies: valid, near-valid and hostile. Through a real worker: tests/integration/
test_native_route.py.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from socketify.native import ffi, lib, library_path

from native_ledger import _intake
from rinha import wire
from rinha.intake import BadRequest, parse_payment
from tests.unit import test_intake

BODIES = 100_000
SEED = int(os.environ.get("NATIVE_INTAKE_SEED", "20250710"))
UUID_TEXT = test_intake.UUID_TEXT
UUID_BYTES = test_intake.UUID_BYTES


def python_record(body: bytes) -> bytes | None:
    """What the Python path queues for `body`, or None if it refuses it (400/422)."""
    try:
        raw_id, cents = parse_payment(body)
    except BadRequest:
        return None
    return wire.encode_payment(raw_id, cents)


def contest_body(correlation_id: str, amount: float) -> bytes:
    """What k6's JSON.stringify({correlationId, amount}) sends: no spaces, the shortest number
    that reads back as the same double, without a trailing '.0' (JS prints 20, not 20.0)."""
    number = repr(amount)
    if number.endswith(".0"):
        number = number[:-2]
    return f'{{"correlationId":"{correlation_id}","amount":{number}}}'.encode()


def body(amount: str, correlation_id: str = UUID_TEXT) -> bytes:
    return f'{{"correlationId":"{correlation_id}","amount":{amount}}}'.encode()


# --- the generator ------------------------------------------------------------------------

# Amount literals at and around every edge of the parser and of the rules.
EDGE_AMOUNTS = [
    "0.01", "0.1", "0.10", "0.09", "0.99", "1", "1.0", "1.00", "19.9", "19.90", "19.900",
    "19.901", "19.99", "999999.99", "1000000", "1000000.0", "1000000.00", "1000000.000",
    "1000000.01", "1000000.1", "1000001", "9999999", "9999999.99", "10000000", "0", "0.0",
    "0.00", "0.000", "0.001", "0.009", "0.005", "-0", "-0.0", "-1", "-19.90", "-0.01", "01",
    "00", "00.1", "001.5", "0019.90", "1.", ".5", "+1", "1e2", "1E2", "1e+2", "1e-2", "1.5e1",
    "1E0", "19.9e0", "0e0", "1e7", "1e400", "1e-400", "1e999999", "NaN", "Infinity",
    "-Infinity", "nan", "inf", "true", "false", "null", '"19.90"', "[19.90]", "{}", "0x10",
    "1_000", "1,5", "19.9.9", "19..9", "--1", "1-", "١٩", "19.9 ", " 19.9", "19.9\n",
    "1" * 8, "1" * 20, "1" * 400, "9" * 5000, "0." + "0" * 300 + "1", "1." + "0" * 300,
    "12345678", "1234567.8", "1234567.89", "0.01" + "0" * 50, "100000000e-2",
]


def random_uuid(rng: random.Random) -> str:
    text = str(uuid.UUID(int=rng.getrandbits(128)))
    style = rng.random()
    if style < 0.1:
        return text.upper()
    if style < 0.2:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    return text


def random_amount(rng: random.Random) -> str:
    """A plain literal, mostly valid: every form C takes, plus some it leaves to Python."""
    cents = rng.choice([rng.randint(1, 10_000), rng.randint(1, wire.MAX_AMOUNT_CENTS),
                        rng.randint(wire.MAX_AMOUNT_CENTS - 100, wire.MAX_AMOUNT_CENTS + 100)])
    whole, fraction = divmod(cents, 100)
    form = rng.randrange(6)
    if form == 0 and fraction == 0:
        return str(whole)
    if form == 1 and fraction % 10 == 0:
        return f"{whole}.{fraction // 10}"
    if form == 2:
        return f"{whole}.{fraction:02d}" + "0" * rng.randint(1, 3)  # 19.900: Python's only
    if form == 3:
        return f"{cents}e-2"  # an exponent: Python's only
    return f"{whole}.{fraction:02d}"


def valid_bodies(rng: random.Random) -> Iterator[bytes]:
    while True:
        if rng.random() < 0.5:
            yield contest_body(str(uuid.UUID(int=rng.getrandbits(128))),
                               rng.randint(1, wire.MAX_AMOUNT_CENTS) / 100)
        else:
            yield body(random_amount(rng), random_uuid(rng))


def edge_bodies(rng: random.Random) -> Iterator[bytes]:
    while True:
        yield body(rng.choice(EDGE_AMOUNTS), random_uuid(rng))


def shaped_bodies(rng: random.Random) -> Iterator[bytes]:
    """The same fields in other shapes: order, whitespace, extras, duplicates, escapes,
    encodings, other UUID spellings, other types."""
    while True:
        cid = random_uuid(rng)
        amount = rng.choice(["19.9", "19.90", "0.01", "1000000.00", random_amount(rng)])
        ws = rng.choice([" ", "\n", "\t", "\r", "  ", "\u00a0", "\u2028", "\x00", "\x0b"])
        shapes = [
            f'{{"amount":{amount},"correlationId":"{cid}"}}',
            f'{{{ws}"correlationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId"{ws}:"{cid}","amount":{amount}}}',
            f'{{"correlationId":{ws}"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}"{ws},"amount":{amount}}}',
            f'{{"correlationId":"{cid}",{ws}"amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount"{ws}:{amount}}}',
            f'{{"correlationId":"{cid}","amount":{ws}{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount}{ws}}}',
            f'{ws}{{"correlationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount}}}{ws}',
            f'{{"correlationId":"{cid}","amount":{amount},"requestedAt":"x"}}',
            f'{{"correlationId":"{cid}","amount":{amount},}}',
            f'{{"correlationId":"{cid}","amount":{amount}}}}}',
            f'{{"correlationId":"{cid}","amount":{amount}}}{{}}',
            f'{{"correlationId":"{cid}","amount":{amount}}} trailing',
            f'{{"x":1,"correlationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","correlationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount},"amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount},"amount":0}}',
            f'{{"correlationId":"{cid}","amount":0,"amount":{amount}}}',
            f'{{"correlationId":"nope","correlationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount},"correlationId":"x"}}',
            f'{{"\\u0063orrelationId":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","\\u0061mount":{amount}}}',
            f'{{"correlationId":"\\u{ord(cid[0]):04x}{cid[1:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:-1]}\\u{ord(cid[-1]):04X}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:8]}\\/{cid[9:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:8]}\\u002d{cid[9:]}","amount":{amount}}}',
            f'{{"CorrelationId":"{cid}","amount":{amount}}}',
            f'{{"correlationid":"{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","Amount":{amount}}}',
            f'{{"correlationId":"{cid}","AMOUNT":{amount}}}',
            f"{{'correlationId':'{cid}','amount':{amount}}}",
            f'{{"correlationId":"{cid}","amount":"{amount}"}}',
            f'{{"correlationId":"{{{cid}}}","amount":{amount}}}',
            f'{{"correlationId":"urn:uuid:{cid}","amount":{amount}}}',
            f'{{"correlationId":"{cid.replace("-", "")}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:-1]}","amount":{amount}}}',
            f'{{"correlationId":"{cid}0","amount":{amount}}}',
            f'{{"correlationId":"{cid[:8]}_{cid[9:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:4]}g{cid[5:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:4]}é{cid[5:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid[:4]}\uff10{cid[5:]}","amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":{amount},"note":"ação ✓ 😀"}}',
            f'{{"correlationId":["{cid}"],"amount":{amount}}}',
            f'{{"correlationId":null,"amount":{amount}}}',
            f'{{"correlationId":"{cid}","amount":[{amount}]}}',
            f'{{"correlationId":"{cid}","amount":{{"v":{amount}}}}}',
            f'{{"correlationId":"{cid}"}}',
            f'{{"amount":{amount}}}',
            f'[{{"correlationId":"{cid}","amount":{amount}}}]',
            f'{{"correlationId":"{cid}","amount":{amount}',
            f'"correlationId":"{cid}","amount":{amount}}}',
            "{}", "", "null", "[]", f'"{cid}"', amount,
        ]
        text = rng.choice(shapes)
        encoding = rng.random()
        if encoding < 0.7:
            yield text.encode("utf-8", "surrogatepass")
        else:
            yield rng.choice([
                b"\xef\xbb\xbf" + text.encode(),  # a UTF-8 BOM
                text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-16-be"),
                text.encode("utf-32"), text.encode("utf-32-le"), text.encode("utf-32-be"),
                text.encode("latin-1", "replace"),
                b"\xff\xfe" + text.encode(), b"\xfe\xff" + text.encode(),
                text.encode() + b"\x00", b"\x00" + text.encode(),
            ])


def mutated_bodies(rng: random.Random) -> Iterator[bytes]:
    """Valid bodies with random damage: byte flips, bit flips, insertions, deletions,
    truncations, duplicated or swapped pieces, case changes."""
    alphabet = b'{}[]":,.-+0123456789eE \n\t\\/abcdefABCDEFxu' + bytes(range(0x80, 0x84))
    valid = valid_bodies(rng)
    while True:
        data = bytearray(next(valid))
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            kind = rng.randrange(9)
            at = rng.randrange(len(data)) if data else 0
            if not data:
                break
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                data[at] ^= 1 << rng.randrange(8)
            elif kind == 2:
                data.insert(at, rng.choice(alphabet))
            elif kind == 3:
                del data[at]
            elif kind == 4:
                del data[rng.randrange(len(data)):]
            elif kind == 5:
                end = rng.randrange(at, len(data) + 1)
                data[at:at] = data[at:end]
            elif kind == 6:
                data[at] = data[at] ^ 0x20 if chr(data[at]).isalpha() else data[at]
            elif kind == 7:
                other = rng.randrange(len(data))
                data[at], data[other] = data[other], data[at]
            else:
                data[at] = rng.choice(alphabet)
        yield bytes(data)


def truncated_and_padded(rng: random.Random) -> Iterator[bytes]:
    """Every prefix of a valid body, and valid bodies grown past every length limit."""
    valid = valid_bodies(rng)
    while True:
        whole = next(valid)
        yield whole[:rng.randrange(len(whole) + 1)]
        yield whole[:-1] + b" " * rng.randint(1, 5000) + b"}"
        yield whole + bytes([rng.randrange(256)])


def intake_test_bodies() -> list[bytes]:
    """Every body that tests/unit/test_intake.py parametrizes its tests with."""
    found = []
    for name in dir(test_intake):
        for mark in getattr(getattr(test_intake, name), "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names = [n.strip() for n in (mark.args[0].split(",") if isinstance(mark.args[0], str)
                                         else mark.args[0])]
            if "body" not in names:
                continue
            at = names.index("body")
            for case in mark.args[1]:
                value = case[at] if len(names) > 1 else case
                found.append(value if isinstance(value, bytes) else value.encode())
    assert len(found) > 40, "tests/unit/test_intake.py's bodies were not found"
    return found


GENERATORS: dict[str, tuple[Callable[[random.Random], Iterator[bytes]], int]] = {
    "valid": (valid_bodies, 30_000),
    "edge amounts": (edge_bodies, 15_000),
    "other shapes and encodings": (shaped_bodies, 25_000),
    "random mutations": (mutated_bodies, 25_000),
    "truncated and padded": (truncated_and_padded, 12_000),
}


def generated() -> Iterator[tuple[str, bytes]]:
    rng = random.Random(SEED)
    for name, (make, count) in GENERATORS.items():
        source = make(rng)
        for _ in range(count):
            yield name, next(source)
    for value in intake_test_bodies():
        yield "test_intake.py", value
    for amount in EDGE_AMOUNTS:
        yield "edge amounts", body(amount)


# --- the differential test ----------------------------------------------------------------


def test_c_answers_only_bodies_python_queues_with_the_same_record() -> None:
    taken: Counter[str] = Counter()
    python_accepts: Counter[str] = Counter()
    total: Counter[str] = Counter()
    disagreements = []
    for name, data in generated():
        total[name] += 1
        expected = python_record(data)
        got = _intake.parse(data)
        python_accepts[name] += expected is not None
        if got is not None:
            taken[name] += 1
            if got != expected:
                disagreements.append((data, got, expected))
    report = {name: f"{taken[name]} taken in C, {python_accepts[name]} accepted by Python, "
                    f"of {total[name]}" for name in total}
    print(json.dumps(report, indent=1))
    assert not disagreements[:5], report
    assert sum(total.values()) >= BODIES
    # The fast path is really taken: most valid bodies, and never a body Python refuses.
    assert taken["valid"] > 0.6 * total["valid"]
    assert sum(taken.values()) <= sum(python_accepts.values())


def test_the_contest_bodies_take_the_c_path() -> None:
    rng = random.Random(SEED + 1)
    amounts = [19.9, 19.90, 0.01, 0.1, 1, 20, 999999.99, 1000000, 1000000.0, 123.45, 0.07]
    amounts += [rng.randint(1, wire.MAX_AMOUNT_CENTS) / 100 for _ in range(5000)]
    for amount in amounts:
        data = contest_body(str(uuid.uuid4()), amount)
        record = _intake.parse(data)
        assert record is not None, data
        assert record == python_record(data), data
    assert contest_body(UUID_TEXT, 19.90) == body("19.9")


@pytest.mark.parametrize(
    ("amount", "cents"),
    [("19.9", 1990), ("19.90", 1990), ("0.01", 1), ("0.1", 10), ("0.10", 10), ("20", 2000),
     ("1000000", wire.MAX_AMOUNT_CENTS), ("1000000.00", wire.MAX_AMOUNT_CENTS),
     ("999999.99", wire.MAX_AMOUNT_CENTS - 1), ("1234567", None), ("1000000.01", None),
     ("19.900", None), ("1e2", None), ("01", None), ("0", None), ("0.00", None),
     ("-1", None), ("1.", None), (".5", None), ("1" * 400, None), ("0.001", None)],
)
def test_parse_reads_plain_amounts_only(amount: str, cents: int | None) -> None:
    expected = None if cents is None else UUID_BYTES + cents.to_bytes(8, "little")
    assert _intake.parse(body(amount)) == expected


@pytest.mark.parametrize(
    "data",
    [body("19.90").replace(b"{", b"{ "), body("19.90").replace(b"}", b" }"),
     f'{{"amount":19.90,"correlationId":"{UUID_TEXT}"}}'.encode(),
     b"\xef\xbb\xbf" + body("19.90"), body("19.90").decode().encode("utf-16"),
     body("19.90")[:-1] + b',"x":1}'],
)
def test_parse_leaves_other_valid_shapes_to_python(data: bytes) -> None:
    assert _intake.parse(data) is None
    assert python_record(data) == wire.encode_payment(UUID_BYTES, 1990)


def test_parse_reads_any_buffer_and_both_uuid_cases() -> None:
    data = body("19.90", UUID_TEXT.upper())
    expected = UUID_BYTES + (1990).to_bytes(8, "little")
    assert _intake.parse(data) == _intake.parse(bytearray(data)) == expected
    assert _intake.parse(memoryview(b"xx" + data)[2:]) == expected
    assert _intake.RECORD_SIZE == wire.PAYMENT_RECORD_SIZE
    assert _intake.MAX_AMOUNT_CENTS == wire.MAX_AMOUNT_CENTS
    with pytest.raises(TypeError):
        _intake.parse("text")  # type: ignore[arg-type]


def test_resolve_finds_the_functions_socketify_calls() -> None:
    found = _intake.resolve(library_path)
    assert len(found) == 7
    for name, address in found.items():
        assert address == int(ffi.cast("uintptr_t", ffi.addressof(lib, name))), name


def test_resolve_refuses_a_library_that_is_not_loaded(tmp_path) -> None:
    with pytest.raises(OSError, match="not loaded"):
        _intake.resolve(str(tmp_path / "libnothing.so"))


def test_a_route_needs_sane_arguments() -> None:
    args = dict(library=library_path, app=1, ssl=False, pattern="/p", mqd=3,
                on_body=lambda body: (202, b""), max_body=4096, too_large=b"x", queue_full=b"y")
    for wrong in ({"app": 0}, {"max_body": 0}, {"mqd": -1}, {"on_body": None},
                  {"too_large": "x"}, {"library": "/nonexistent/lib.so"}):
        with pytest.raises((ValueError, TypeError, OSError)):
            _intake.PaymentRoute(**{**args, **wrong})
