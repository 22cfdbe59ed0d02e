"""The idempotency rule, pure: `decide` against a reference model written another way, and the
at-most-once promises it carries, over every kind of record hypothesis can draw."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.idempotency.record import Decision, IdempotencyRecord, State, decide

ACTIONS = ("988cc94e-7a8f-4b28-ab65-54970c5d5018", "11111111-2222-3333-4444-555555555555")
TTL = 24 * 3600.0

seconds = st.floats(0, 200_000, allow_nan=False)
records = st.none() | st.builds(
    IdempotencyRecord,
    state=st.none() | st.sampled_from(State),
    action_id=st.sampled_from(ACTIONS),
    age=st.none() | seconds,
    completed_at=seconds,
)


def reference(record: IdempotencyRecord | None, action_id: str, now: float, lease: float, ttl: float) -> Decision:
    """The rule as the docs state it, case by case."""
    if record is None or record.state is None:  # nothing there, or nothing this version can read
        return Decision.FRESH
    if record.state is State.DONE:
        if now - record.completed_at >= ttl:  # an answer past its 24 h frees its key for anyone
            return Decision.FRESH
        return Decision.REPLAY if record.action_id == action_id else Decision.REUSED
    if record.action_id != action_id:  # held for another action
        return Decision.REUSED
    if record.state is State.ABANDONED:  # handed back unread: the next request reads Defender first
        return Decision.TAKE_OVER
    lapsed = record.age is not None and record.age >= lease  # judged on the store's clock only
    return Decision.TAKE_OVER if lapsed else Decision.IN_PROGRESS


@settings(max_examples=2000)
@given(records, st.sampled_from(ACTIONS), seconds, st.floats(1, 3600), st.sampled_from([TTL, 60.0]))
def test_decide_agrees_with_the_reference_model(
    record: IdempotencyRecord | None, action_id: str, now: float, lease: float, ttl: float
) -> None:
    assert decide(record, action_id, now, lease, ttl) is reference(record, action_id, now, lease, ttl)


@settings(max_examples=2000)
@given(records, st.sampled_from(ACTIONS), seconds, st.floats(1, 3600))
def test_a_held_key_is_never_claimed_without_first_reading_what_its_holder_did(
    record: IdempotencyRecord | None, action_id: str, now: float, lease: float
) -> None:
    decision = decide(record, action_id, now, lease, TTL)

    if record is not None and record.state in (State.IN_FLIGHT, State.ABANDONED):
        assert decision is not Decision.FRESH  # a fresh claim would send without the read-back
    if record is not None and record.state is State.IN_FLIGHT and (record.age is None or record.age < lease):
        assert decision in (Decision.IN_PROGRESS, Decision.REUSED)  # a live holder is never overtaken
    if decision is Decision.REPLAY:
        assert record is not None and record.action_id == action_id and now - record.completed_at < TTL


def test_a_claim_without_a_store_time_is_never_judged_dead() -> None:
    held = IdempotencyRecord(state=State.IN_FLIGHT, action_id=ACTIONS[0], age=None)

    assert decide(held, ACTIONS[0], now=10**9, lease=1.0, ttl=TTL) is Decision.IN_PROGRESS
