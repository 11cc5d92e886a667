"""Repeated correlationIds through real processes: counted exactly as the processors store them.

The processors keep one payment per correlationId (a second one gets 422). Whatever we are sent,
our summary must equal what they hold: never more (docs/contest.md: reporting more disqualifies).
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx

from tests.processes import backend_totals, peered_pair, processor_totals, wait_until


def post(url: str, correlation_id: str, amount: str) -> int:
    body = f'{{"correlationId":"{correlation_id}","amount":{amount}}}'
    response = httpx.post(url + "/payments", content=body,
                          headers={"Content-Type": "application/json"}, timeout=5)
    return response.status_code


def settled(instance) -> bool:
    """Nothing accepted is still waiting in the instance's holding table."""
    from rinha.holding import HoldingTable

    table = HoldingTable.open(instance.settings.holding_name)
    try:
        return table.depth() == 0
    finally:
        table.close()


def assert_matches_processors(instance, default, fallback, expected_default):
    wait_until(lambda: settled(instance), 20)
    assert processor_totals(default) == expected_default
    assert backend_totals(instance) == {"default": expected_default,
                                        "fallback": processor_totals(fallback)}


def test_the_same_id_twice_is_counted_once(processors, start_instance):
    default, fallback = processors
    instance = start_instance()
    same = str(uuid.uuid4())
    assert post(instance.url, same, "19.90") == 202
    assert post(instance.url, same, "19.90") == 202  # 202: validated and queued, not stored
    assert post(instance.url, same, "5.00") == 202
    assert post(instance.url, str(uuid.uuid4()), "1.00") == 202
    assert_matches_processors(instance, default, fallback, (2, "20.90"))


def test_a_422_after_an_unknown_outcome_counts_only_our_own_stored_payment(
    processors, start_instance
):
    """The fault run's case: the processor holds the FIRST payment (10.00); the second (20.00,
    same id) times out, is retried on the same processor and gets 422. That 422 is about the
    first payment: the second must not be counted."""
    default, fallback = processors
    instance = start_instance(REQUEST_TIMEOUT_S="0.3", RETRY_BACKOFF_MIN_S="0.05",
                              RETRY_BACKOFF_MAX_S="0.2")
    same = str(uuid.uuid4())
    assert post(instance.url, same, "10") == 202
    wait_until(lambda: backend_totals(instance)["default"] == (1, "10.00"))
    default.set_delay(1000)  # longer than REQUEST_TIMEOUT_S: every attempt's outcome is unknown
    assert post(instance.url, same, "20") == 202
    wait_until(lambda: "failing (unknown)" in instance.log())
    default.set_delay(0)
    assert_matches_processors(instance, default, fallback, (1, "10.00"))


def test_the_422_check_holds_after_the_dispatcher_is_killed_and_re_drives_the_pinned_slot(
    processors, start_instance
):
    default, fallback = processors
    instance = start_instance(REQUEST_TIMEOUT_S="0.3", RETRY_BACKOFF_MIN_S="0.05",
                              RETRY_BACKOFF_MAX_S="0.2")
    same = str(uuid.uuid4())
    assert post(instance.url, same, "10") == 202
    wait_until(lambda: backend_totals(instance)["default"] == (1, "10.00"))
    default.set_delay(1000)
    assert post(instance.url, same, "20") == 202
    wait_until(lambda: "failing (unknown)" in instance.log())
    [dispatcher] = instance.child_pids("dispatch")
    os.kill(dispatcher, signal.SIGKILL)
    wait_until(lambda: instance.child_pids("dispatch") not in ([], [dispatcher]))
    wait_until(lambda: "re-driving 1 payments" in instance.log())
    default.set_delay(0)
    assert_matches_processors(instance, default, fallback, (1, "10.00"))


def test_a_second_payment_with_the_same_id_waits_while_the_first_outcome_is_unknown(
    processors, start_instance
):
    """Both payments have one id and one amount. The first times out and was NOT stored (the
    processor fails after its delay); were the second sent meanwhile in the same second and
    stored, the first's retry would get 422 and a record that looks exactly like its own.
    One payment per id in flight at a time keeps that from counting twice."""
    default, fallback = processors
    instance = start_instance(REQUEST_TIMEOUT_S="0.3", RETRY_BACKOFF_MIN_S="0.05",
                              RETRY_BACKOFF_MAX_S="0.2")
    default.set_delay(600)
    default.set_failure(True)  # after the delay: 500, nothing stored
    same = str(uuid.uuid4())
    wait_until(lambda: time.time() % 1 < 0.3)  # both sends inside one second
    assert post(instance.url, same, "19.90") == 202
    assert post(instance.url, same, "19.90") == 202
    wait_until(lambda: "failing (unknown)" in instance.log())
    default.set_failure(False)
    default.set_delay(0)
    assert_matches_processors(instance, default, fallback, (1, "19.90"))


def test_the_same_id_on_both_instances_of_a_pair_is_counted_once(processors):
    default, fallback = processors
    first, second = peered_pair(default, fallback)
    try:
        ids = [str(uuid.uuid4()) for _ in range(20)]
        for correlation_id in ids:
            assert post(first.url, correlation_id, "19.90") == 202
            assert post(second.url, correlation_id, "19.90") == 202
        for instance in (first, second):
            wait_until(lambda instance=instance: settled(instance), 20)
        assert processor_totals(default) == (20, "398.00")
        for instance in (first, second):
            wait_until(lambda instance=instance: backend_totals(instance)["default"]
                       == (20, "398.00"))
    finally:
        first.stop()
        second.stop()
