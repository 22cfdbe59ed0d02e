"""An idempotency key's record and the pure decision of what a request with that key may do.

A record is a holder sending (`in_flight`), a key handed back unread after a takeover whose read of
Defender told nothing (`abandoned`), or Defender's answer kept for TTL (`done`). `decide` is the
whole rule, with no I/O: shared.idempotency.table maps Table entities to records and carries the
decision out with conditional writes; tests/unit/test_idempotency_decide.py checks it against a
reference model by property.

The lease is judged on the store's clock: a record's `age` is the store's reply `Date` less the
record's `Timestamp`, both stamped by the store (None when either is missing: a claim is then never
judged dead on our clock).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from enum import Enum, StrEnum
from typing import Any

from shared.errors import error_body

UNKNOWN_STATUS = 502
UNKNOWN_CODE = "OutcomeUnknown"


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    ABANDONED = "abandoned"
    DONE = "done"


@dataclass(frozen=True, kw_only=True)
class IdempotencyRecord:
    state: State | None  # None: a state this version does not know (a record to replace)
    action_id: str
    age: float | None = None  # seconds since the store last wrote it, on the store's clock
    completed_at: float = 0.0  # a done record's epoch seconds


class Decision(Enum):
    FRESH = "fresh"  # no record that matters: claim the key anew (insert, or replace what is there)
    REPLAY = "replay"  # a kept answer: give it again, send nothing
    IN_PROGRESS = "in_progress"  # a live holder: 409, or a deferral
    TAKE_OVER = "take_over"  # a holder died or handed the key back: claim it, read Defender before sending
    REUSED = "reused"  # the key is held or answered for another action: 422


def decide(record: IdempotencyRecord | None, action_id: str, now: float, lease: float, ttl: float) -> Decision:
    """What a request for `action_id` may do with the key whose record is `record` (None: absent)."""
    if record is None or record.state is None:
        return Decision.FRESH
    answered = record.state is State.DONE and now - record.completed_at < ttl
    if record.state is State.DONE and not answered:
        return Decision.FRESH  # an answer past its TTL frees the key
    if record.action_id != action_id:
        return Decision.REUSED
    if answered:
        return Decision.REPLAY
    if record.state is State.IN_FLIGHT and (record.age is None or record.age < lease):
        return Decision.IN_PROGRESS
    return Decision.TAKE_OVER


@dataclass(frozen=True)
class StoredAnswer:
    """An answer kept for an idempotency key: replay it."""

    status: int
    body: Any


@dataclass(frozen=True)
class Claim:
    """The right to call Defender for `key`, as long as the record is still at `etag`."""

    key: str
    action_id: str
    etag: str
    _: KW_ONLY
    abandoned: bool = False  # taken over from a holder that died: what it did must be read first


def outcome_unknown() -> StoredAnswer:
    """The answer of a key whose holder died after it may have reached Defender, when Defender's
    state cannot tell what it did."""
    return StoredAnswer(
        UNKNOWN_STATUS,
        error_body(
            UNKNOWN_CODE,
            "An earlier request with this key stopped after it may have reached Defender, before its answer "
            "was recorded. Defender may have cancelled the action: read its status before trying again "
            "with a new key.",
        ),
    )
