"""The one vocabulary of what became of a request: result messages, audit rows, log records and
bulk summaries all say it with these words.

Result messages use `cancelled`, `upstream_rejected`, `failed`, `rejected` and, for a bulk job,
`completed`; a bulk summary's entries `cancelled`, `already_final`, `failed`, `not_attempted` and
`listed`; audit rows and log records `cancelled`, `upstream_rejected`, `throttled`,
`upstream_error`, `failed` (no answer: `ErrorCode` says why), `refused`, `replayed` and `verified`.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    CANCELLED = "cancelled"  # Defender answered 2xx
    UPSTREAM_REJECTED = "upstream_rejected"  # Defender answered 4xx (not 429)
    THROTTLED = "throttled"  # Defender answered 429
    UPSTREAM_ERROR = "upstream_error"  # Defender answered 5xx
    FAILED = "failed"  # no answer to keep, or one that may hide an action taken
    REJECTED = "rejected"  # a message we could not take: never retried
    REFUSED = "refused"  # refused before anything was sent (quota, caller, state store...)
    REPLAYED = "replayed"  # an idempotency key's stored answer, given again
    VERIFIED = "verified"  # a read back after the cancel (the status it found is a field of its own)
    COMPLETED = "completed"  # a bulk job's summary
    ALREADY_FINAL = "already_final"  # a bulk entry: Defender's 400 for an action that ended meanwhile
    NOT_ATTEMPTED = "not_attempted"  # a bulk entry the quota could not serve in time
    LISTED = "listed"  # a bulk dry run's entry


def of_result(status: int) -> Outcome:
    """What a result message says of Defender's answer: a 500/502/504 may hide an action taken,
    and is not asked again (`failed`)."""
    if 200 <= status < 300:
        return Outcome.CANCELLED
    return Outcome.FAILED if status >= 500 else Outcome.UPSTREAM_REJECTED


def of_answer(status: int) -> Outcome:
    """What Defender's answer to a send was, for the records."""
    if 200 <= status < 300:
        return Outcome.CANCELLED
    if status == 429:
        return Outcome.THROTTLED
    if status >= 500:
        return Outcome.UPSTREAM_ERROR
    return Outcome.UPSTREAM_REJECTED
