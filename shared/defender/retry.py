"""When the Defender client tries again, decided per attempt: like urllib3's `Retry.increment`,
given what happened the policy says "again after N seconds" or "stop, because ...", and the client
only does the I/O.

We retry only what Defender cannot have acted on: a connection never made, and Defender's own 503
(it refused before doing anything). A timeout, a connection lost after sending, a 500 or a
gateway's 502/504 may come after Defender cancelled the action; retrying would hear 400 "already
cancelled" and hide what happened, so the caller gets that attempt's answer (a POST is not
idempotent; urllib3 does not retry it either). Defender's 429 is not retried either: the client
holds that API's quota for every instance instead (RateLimiter.throttled).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from enum import StrEnum

# The longest Retry-After we honour: Defender's longest window is an hour; a larger value is a
# broken header, and held as an hour it still stops every instance.
MAX_RETRY_AFTER_SECONDS = 3600
DEFAULT_RETRY_AFTER_SECONDS = 60  # a 429 without Retry-After holds the quota this long
# Defender's answers given without acting: its throttle (held off, not retried) and 503 (retried).
# Every other answer may come after the cancel took effect.
REFUSED_BEFORE_ACTING = frozenset({429, 503})


class Stop(StrEnum):
    ANSWERED = "answered"  # an answer to keep: Defender may have acted on it
    THROTTLED = "throttled"  # Defender's 429: the client holds the quota instead of asking again
    ATTEMPTS = "attempts"  # the policy's attempts are used up
    DEADLINE = "deadline"  # the back-off would outlast the time budget


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """Try again after `wait` seconds, or stop (`stop` says why)."""

    stop: Stop | None = None
    wait: float = 0.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Which answers are retried (only those Defender gave without acting), how often, and the
    back-off between attempts (full jitter, or Defender's Retry-After)."""

    max_attempts: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    refused_statuses: frozenset[int] = REFUSED_BEFORE_ACTING - {429}

    def increment(self, attempt: int, status: int | None, retry_after: int | None, time_left: float) -> Verdict:
        """After attempt number `attempt` answered `status` (None: no connection was made, nothing
        was sent), with `time_left` seconds of the budget left: again after how long, or stop."""
        if status == 429:
            return Verdict(stop=Stop.THROTTLED)
        if status is not None and status not in self.refused_statuses:
            return Verdict(stop=Stop.ANSWERED)
        if attempt >= self.max_attempts:
            return Verdict(stop=Stop.ATTEMPTS)
        wait = self.backoff(attempt, retry_after)
        if wait >= time_left:
            return Verdict(stop=Stop.DEADLINE)
        return Verdict(wait=wait)

    def backoff(self, attempt: int, retry_after: int | None = None) -> float:
        if retry_after is not None:
            return float(retry_after)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))


def parse_retry_after(value: str | None) -> int | None:
    """Whole seconds (>= 1, at most MAX_RETRY_AFTER_SECONDS) from `Retry-After` given as seconds or
    as an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(seconds)))
