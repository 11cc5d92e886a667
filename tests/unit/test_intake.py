"""intake: the pure parts of the HTTP workers (body validation, summary body and window)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from rinha import wire
from rinha.intake import BadRequest, parse_payment, summary_json, summary_window

UUID_TEXT = "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"
UUID_BYTES = bytes.fromhex("4a7901b87d264d9daa194dc1c7cf60b3")
CID = f'"correlationId":"{UUID_TEXT}"'
T0 = 1_752_150_896  # 2025-07-10T12:34:56Z


@pytest.mark.parametrize(
    ("body", "cents"),
    [
        (f'{{{CID},"amount":19.90}}', 1990),
        (f'{{"amount":19.90,{CID}}}', 1990),
        (f'{{{CID},"amount":0.01}}', 1),
        (f'{{{CID},"amount":20}}', 2000),  # an integer amount
        (f'{{{CID},"amount":1.5e1}}', 1500),
        (f'{{{CID},"amount":1E2}}', 10000),
        (f'{{{CID},"amount":1000000.00}}', wire.MAX_AMOUNT_CENTS),
        (f'{{{CID},"amount":19.90,"requestedAt":"x","extra":[1,{{"a":null}}]}}', 1990),
        (f' \n{{ {CID} , "amount" : 19.9 }}\t', 1990),
        (f'{{{CID},"amount":"19.90","amount":19.90}}', 1990),  # duplicate keys: the last wins
        (f'{{"correlationId":"nope",{CID},"amount":5}}', 500),
    ],
)
def test_parse_payment_accepts(body: str, cents: int) -> None:
    assert parse_payment(body.encode()) == (UUID_BYTES, cents)


def test_parse_payment_accepts_an_uppercase_uuid() -> None:
    body = f'{{"correlationId":"{UUID_TEXT.upper()}","amount":19.90}}'.encode()
    assert parse_payment(body) == (UUID_BYTES, 1990)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"not json",
        b'{"correlationId":',
        b"\xff\xfe",
        f'{{{CID},"amount":19.90}} trailing'.encode(),
        f'{{{CID},"amount":19.90,}}'.encode(),  # trailing comma
        f"{{{CID},'amount':19.90}}".encode(),  # single quotes
        # NaN and Infinity are no JSON at all: the body cannot be read.
        f'{{{CID},"amount":NaN}}'.encode(),
        f'{{{CID},"amount":Infinity}}'.encode(),
        f'{{{CID},"amount":-Infinity}}'.encode(),
        b"[" * 100_000,  # nesting deep enough for a RecursionError
    ],
)
def test_parse_payment_refuses_an_unreadable_body_with_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="not valid JSON") as caught:
        parse_payment(body)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "body", [b"[]", f'[{{{CID},"amount":19.90}}]'.encode(), b'"x"', b"19.90", b"null", b"true"]
)
def test_parse_payment_refuses_a_body_that_is_not_an_object_with_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="must be a JSON object") as caught:
        parse_payment(body)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"amount":19.90}', "correlationId"),
        ("{}", "correlationId"),
        ('{"correlationId":null,"amount":19.90}', "correlationId"),
        ('{"correlationId":123,"amount":19.90}', "correlationId"),
        ('{"correlationId":["x"],"amount":19.90}', "correlationId"),
        ('{"correlationId":"","amount":19.90}', "correlationId"),
        ('{"correlationId":"not-a-uuid","amount":19.90}', "correlationId"),
        (f'{{"correlationId":"{{{UUID_TEXT}}}","amount":19.90}}', "correlationId"),
        (f'{{"correlationId":"urn:uuid:{UUID_TEXT}","amount":19.90}}', "correlationId"),
        (f'{{"correlationId":"{UUID_TEXT.replace("-", "")}","amount":19.90}}', "correlationId"),
        (f'{{{CID},"amount":19.90,"correlationId":"x"}}', "correlationId"),  # last one wins
        (f"{{{CID}}}", "amount"),
        (f'{{{CID},"amount":null}}', "amount"),
        (f'{{{CID},"amount":"19.90"}}', "amount"),  # a string amount
        (f'{{{CID},"amount":true}}', "amount"),  # a bool is no number here
        (f'{{{CID},"amount":false}}', "amount"),
        (f'{{{CID},"amount":[19.90]}}', "amount"),
        (f'{{{CID},"amount":{{"value":19.90}}}}', "amount"),
        (f'{{{CID},"amount":19.901}}', "amount"),  # three decimals
        (f'{{{CID},"amount":0.001}}', "amount"),
        (f'{{{CID},"amount":0}}', "amount"),
        (f'{{{CID},"amount":0.00}}', "amount"),
        (f'{{{CID},"amount":-0}}', "amount"),
        (f'{{{CID},"amount":-19.90}}', "amount"),
        (f'{{{CID},"amount":1000000.01}}', "amount"),  # too big
        (f'{{{CID},"amount":1e7}}', "amount"),
        (f'{{{CID},"amount":1e400}}', "amount"),
        (f'{{{CID},"amount":1e-999999999}}', "amount"),
        (f'{{{CID},"amount":19.90,"amount":0}}', "amount"),  # duplicate keys: the last wins
    ],
)
def test_parse_payment_refuses_a_bad_field_with_422(body: str, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_payment(body.encode())
    assert caught.value.status == 422
    assert str(caught.value).startswith(field)


def test_parse_payment_refuses_a_huge_exponent_with_422() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_payment(f'{{{CID},"amount":1e999999}}'.encode())
    assert caught.value.status == 422


# --- GET /payments-summary ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("totals", "body"),
    [
        (
            (0, 0, 0, 0),
            b'{"default":{"totalRequests":0,"totalAmount":0.00},'
            b'"fallback":{"totalRequests":0,"totalAmount":0.00}}',
        ),
        (
            (1, 1990, 0, 0),
            b'{"default":{"totalRequests":1,"totalAmount":19.90},'
            b'"fallback":{"totalRequests":0,"totalAmount":0.00}}',
        ),
        (
            (3, 5, 2, 123_456_789),
            b'{"default":{"totalRequests":3,"totalAmount":0.05},'
            b'"fallback":{"totalRequests":2,"totalAmount":1234567.89}}',
        ),
    ],
)
def test_summary_json_is_the_contest_shape_with_two_decimals(
    totals: tuple[int, int, int, int], body: bytes
) -> None:
    assert summary_json(totals) == body


def test_summary_json_is_valid_json_with_exact_amounts() -> None:
    document = json.loads(summary_json((16_000, 31_840_000, 7, 70)), parse_float=Decimal)
    assert document == {
        "default": {"totalRequests": 16_000, "totalAmount": Decimal("318400.00")},
        "fallback": {"totalRequests": 7, "totalAmount": Decimal("0.70")},
    }


@pytest.mark.parametrize(
    ("from_text", "to_text", "window"),
    [
        (None, None, (None, None)),
        ("", "", (None, None)),
        ("", None, (None, None)),
        ("2025-07-10T12:34:56.000Z", None, (T0, None)),
        (None, "2025-07-10T12:34:56.000Z", (None, T0)),
        ("2025-07-10T12:34:56.000Z", "2025-07-10T12:34:56.000Z", (T0, T0)),
        ("2025-07-10T12:34:55.500Z", "2025-07-10T12:34:59.999Z", (T0, T0 + 3)),
        ("2025-07-10T15:34:56.000+03:00", "2025-07-10T12:35:00", (T0, T0 + 4)),
        ("2025-07-10T15:34:56.000 03:00", None, (T0, None)),  # "+" unencoded in a query
        ("2025-07-10T12:34:55.000999Z", "2025-07-10T12:34:56.999999Z", (T0, T0)),
        ("2025-07-10T12:34:56.000000001Z", None, (T0 + 1, None)),
    ],
)
def test_summary_window(
    from_text: str | None, to_text: str | None, window: tuple[int | None, int | None]
) -> None:
    assert summary_window(from_text, to_text) == window


@pytest.mark.parametrize(
    ("from_text", "to_text", "named"),
    [
        ("yesterday", None, "from"),
        ("2025-07-10T12:34:56.000Zjunk", "2025-07-10T12:34:56.000Z", "from"),
        (None, "tomorrow", "to"),
        ("2025-07-10T12:34:56.000Z", "2025-13-01T00:00:00Z", "to"),
        ("2025-07-10T12:34:56.000Z", "x" * 41, "to"),
        ("2025-07-10T12:34:56.000Z", "2025-07-10T12:34:56.000+25:00", "to"),
    ],
)
def test_summary_window_refuses_a_bad_instant_with_400(
    from_text: str | None, to_text: str | None, named: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        summary_window(from_text, to_text)
    assert caught.value.status == 400
    assert str(caught.value).startswith(f"{named} must be an ISO-8601 instant")
