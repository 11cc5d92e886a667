"""dispatcher.classify: what a processor's reply means for a payment (DESIGN.md invariant 3)."""

from __future__ import annotations

import pytest

from rinha.dispatcher import DEFINITE_FAILURE, DUPLICATE, RECORD, UNKNOWN, classify


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
        # 422 after an unknown outcome: our earlier attempt stored it.
        (422, True, RECORD),
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


def test_the_outcomes_are_distinct() -> None:
    assert len({RECORD, DUPLICATE, DEFINITE_FAILURE, UNKNOWN}) == 4
