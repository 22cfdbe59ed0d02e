"""The retry policy decides per attempt, given what happened: again after how long, or stop and why."""

from __future__ import annotations

import pytest

from shared.defender.retry import RetryPolicy, Stop, Verdict

POLICY = RetryPolicy(max_attempts=3, backoff_base=0.25, backoff_max=4.0)


@pytest.mark.parametrize("status", [200, 400, 403, 404, 500, 502, 504])
def test_an_answer_defender_may_have_acted_on_is_kept(status: int) -> None:
    assert POLICY.increment(1, status, None, time_left=30.0) == Verdict(stop=Stop.ANSWERED)


def test_a_429_is_not_asked_again() -> None:
    assert POLICY.increment(1, 429, 5, time_left=30.0) == Verdict(stop=Stop.THROTTLED)


def test_a_503_is_retried_after_its_retry_after() -> None:
    assert POLICY.increment(1, 503, 2, time_left=30.0) == Verdict(wait=2.0)


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_connection_never_made_is_retried_within_the_jittered_back_off(attempt: int) -> None:
    verdict = POLICY.increment(attempt, None, None, time_left=30.0)

    assert verdict.stop is None and 0.0 <= verdict.wait <= 0.25 * 2 ** (attempt - 1)


def test_the_last_attempt_stops() -> None:
    assert POLICY.increment(3, 503, None, time_left=30.0) == Verdict(stop=Stop.ATTEMPTS)


def test_a_back_off_that_would_outlast_the_budget_stops() -> None:
    assert POLICY.increment(1, 503, 10, time_left=9.5) == Verdict(stop=Stop.DEADLINE)
