"""outcomes.classify and judge_stored: what a processor's answers mean for a payment."""

from __future__ import annotations

import pytest

from rinha.outcomes import (
    CONFIRM,
    DEFINITE_FAILURE,
    DUPLICATE,
    RECORD,
    RESEND,
    UNKNOWN,
    classify,
    judge_stored,
)


@pytest.mark.parametrize(
    ("status", "pinned", "outcome"),
    [
        # 2XX: stored, count it once.
        (200, False, RECORD),
        (201, False, RECORD),
        (202, False, RECORD),
        (204, False, RECORD),
        (299, False, RECORD),
        (200, True, RECORD),
        (204, True, RECORD),
        # 422 after an unknown outcome: it holds a payment with our id; ask which one.
        (422, True, CONFIRM),
        # 422 on a clean first attempt: another payment had this correlationId.
        (422, False, DUPLICATE),
        # Anything else: nothing stored.
        (500, False, DEFINITE_FAILURE),
        (503, False, DEFINITE_FAILURE),
        (429, False, DEFINITE_FAILURE),
        (400, False, DEFINITE_FAILURE),
        (404, False, DEFINITE_FAILURE),
        (500, True, DEFINITE_FAILURE),
        (429, True, DEFINITE_FAILURE),
        (199, False, DEFINITE_FAILURE),
        (300, False, DEFINITE_FAILURE),
        (301, True, DEFINITE_FAILURE),
        # No reply after the request left: maybe stored.
        (None, False, UNKNOWN),
        (None, True, UNKNOWN),
    ],
)
def test_classify(status: int | None, pinned: bool, outcome: str) -> None:
    assert classify(status, pinned) == outcome


OURS = bytes.fromhex("4a7901b87d264d9daa194dc1c7cf60b3")
OURS_TEXT = "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"
SECOND = 1_752_150_896  # 2025-07-10T12:34:56Z


def stored(amount: str = "19.90", at: str = "2025-07-10T12:34:56.000Z",
           correlation_id: str = OURS_TEXT) -> bytes:
    return (f'{{"correlationId":"{correlation_id}","amount":{amount},'
            f'"requestedAt":"{at}"}}').encode()


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        # Ours: same id, same amount, requestedAt exactly our whole second, however spelled.
        (200, stored(), RECORD),
        (200, stored("19.9"), RECORD),
        (200, stored("1990e-2"), RECORD),
        (200, stored(at="2025-07-10T12:34:56Z"), RECORD),
        (200, stored(at="2025-07-10T12:34:56.0000000Z"), RECORD),
        (200, stored(at="2025-07-10T09:34:56.000-03:00"), RECORD),
        (200, stored(correlation_id=OURS_TEXT.upper()), RECORD),
        # Another payment with our id: a different amount or another instant.
        (200, stored("20.00"), DUPLICATE),
        (200, stored("19.91"), DUPLICATE),
        (200, stored("19.899"), DUPLICATE),
        (200, stored("-19.90"), DUPLICATE),
        (200, stored(at="2025-07-10T12:34:57.000Z"), DUPLICATE),
        (200, stored(at="2025-07-10T12:34:56.001Z"), DUPLICATE),
        (200, stored(at="2025-07-10T12:34:56.000001Z"), DUPLICATE),
        (200, stored(at="not a time"), DUPLICATE),
        # It holds nothing under our id: send again.
        (404, b"", RESEND),
        # It did not say: ask again later.
        (None, b"", UNKNOWN),
        (500, stored(), UNKNOWN),
        (429, b"", UNKNOWN),
        (200, b"", UNKNOWN),
        (200, b"not json", UNKNOWN),
        (200, b"[]", UNKNOWN),
        (200, b'{"amount": 19.90}', UNKNOWN),
        (200, stored('"19.90"'), UNKNOWN),
        (200, stored(correlation_id="5a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"), UNKNOWN),
    ],
)
def test_judge_stored(status: int | None, body: bytes, verdict: str) -> None:
    assert judge_stored(status, body, OURS, 1990, SECOND) == verdict


@pytest.mark.parametrize(
    "body",
    [
        # Another id, whichever side of ours it sorts on: not an answer about our payment.
        stored(correlation_id="3a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3"),
        stored(correlation_id="4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b2"),
        # A field of the wrong type, the other being right: the body cannot be read.
        b'{"correlationId": 12, "amount": 19.90, "requestedAt": "2025-07-10T12:34:56.000Z"}',
        b'{"correlationId": "' + OURS_TEXT.encode() + b'", "amount": 19.90, "requestedAt": 12}',
        b'{"correlationId": "' + OURS_TEXT.encode() + b'", "amount": 19.90}',
    ],
)
def test_judge_stored_of_a_record_not_about_our_id_or_unreadable_is_unknown(body: bytes) -> None:
    assert judge_stored(200, body, OURS, 1990, SECOND) == UNKNOWN
