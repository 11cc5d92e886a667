"""Outcomes: what a processor's answer means for a payment. Pure, no I/O, table-tested.

Used by the dispatcher. The rules (docs/architecture.md, invariant 3):
  - 2XX: the processor stored our payment: count it, once.
  - 500, 429, any other status, a refused connection: nothing was stored; the payment may be
    sent anywhere later.
  - no answer after the request left (a timeout, a reset): maybe stored. The payment is pinned:
    it goes again only to the same processor with the same requestedAt.
  - 422 on a clean first attempt: the processor already holds ANOTHER payment with this
    correlationId: ours is not stored, and never will be there; it is not counted.
  - 422 on a pinned payment: the processor holds A payment with this correlationId, which may
    be ours (the attempt whose outcome we did not see) or another one with the same id. Only
    the stored record can tell: GET /payments/{id}, then `judge_stored`.
"""

from __future__ import annotations

import json
from decimal import Decimal

from rinha import wire

RECORD = "record"  # it holds our payment: count it once
DUPLICATE = "duplicate"  # it holds another payment with our correlationId: not counted
DEFINITE_FAILURE = "failure"  # nothing was stored: the payment may go anywhere later
UNKNOWN = "unknown"  # maybe stored: retry on the same processor with the same requestedAt
CONFIRM = "confirm"  # 422 after an unknown outcome: ask the processor what it holds
RESEND = "resend"  # the processor holds nothing under our id: send it again (still pinned)


def classify(status: int | None, pinned: bool) -> str:
    """The meaning of a POST /payments reply (`status`), or of no reply after sending (None)."""
    if status is None:
        return UNKNOWN
    if 200 <= status < 300:
        return RECORD
    if status == 422:
        return CONFIRM if pinned else DUPLICATE
    # 500 after the delay, 429 from the limiter, any other 4xx: nothing stored. A pinned
    # payment stays pinned all the same: the earlier attempt may still have been stored.
    return DEFINITE_FAILURE


def judge_stored(
    status: int | None, body: bytes, correlation_id: bytes, cents: int, requested_at: int
) -> str:
    """The meaning of GET /payments/{id} (`status` None: no answer) after a 422 on a pinned
    payment: RECORD if the stored payment is ours (same id, same amount, requestedAt exactly our
    whole second), DUPLICATE if the processor holds another one, RESEND if it holds none (404),
    UNKNOWN if it did not say (an error, a timeout, a body we cannot read)."""
    if status == 404:
        return RESEND
    if status != 200:
        return UNKNOWN
    stored = _stored_payment(body)
    if stored is None:
        return UNKNOWN
    stored_id, stored_cents, stored_at = stored
    if stored_id != correlation_id:
        return UNKNOWN  # not an answer about our id at all
    if stored_cents == cents and stored_at == wire.Instant(requested_at, False):
        return RECORD
    return DUPLICATE


def _stored_payment(body: bytes) -> tuple[bytes, int | None, wire.Instant | None] | None:
    """(id, cents, requestedAt) of a stored payment's JSON; a field that is there but cannot be
    ours (an amount with more than two decimals, a requestedAt that is not an instant) is None."""
    try:
        document = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    raw_id = document.get("correlationId")
    amount = document.get("amount")
    requested_at = document.get("requestedAt")
    if not isinstance(raw_id, str) or not isinstance(requested_at, str):
        return None
    parsed_id = wire.parse_uuid(raw_id)
    if parsed_id is None or not isinstance(amount, Decimal):
        return None
    return parsed_id, wire.parse_cents(str(amount)), wire.parse_instant(requested_at)
