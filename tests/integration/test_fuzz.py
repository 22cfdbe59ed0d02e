"""Generated hostile input: 10,000 HTTP requests and 2,000 queue messages through the real app.

Judged against a plain reference of what is valid: no 5xx but the contract's 502/503/504, no
unhandled exception, an invalid input answered 400 (or a `rejected` result) with no upstream call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdev.defender import DefenderSimulator
from shared.faces import queue_api
from shared.formats import MAX_COMMENT_CHARS
from tests.support.rig import http_cancel

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
KEY = re.compile(r"[\x21-\x7e]{1,255}")
CORRELATION = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CONTRACT_5XX = {502, 503, 504}
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

guids = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
tricks = st.sampled_from(["..%2F..%2Fmachines", "../machines", "%00", "\n", " ", "{}", "null", "ï¿½", "/", "?x=1"])
action_ids = (
    guids | st.text(max_size=60) | st.builds(lambda g, t: g + t, guids, tricks | st.text(min_size=1, max_size=5))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
comments = st.text(max_size=80) | json_values
bodies = (
    st.builds(lambda k, v, extra: {**extra, k: v}, st.sampled_from(["Comment", "comment", "COMMENT", "Comment "]),
              comments, st.dictionaries(st.text(max_size=8), json_values, max_size=3)).map(json.dumps).map(str.encode)
    | json_values.map(json.dumps).map(str.encode)
    | st.binary(max_size=200)
    | st.integers(64 * 1024 - 20, 64 * 1024 + 20).map(lambda n: json.dumps({"Comment": "x" * n}).encode())
)  # fmt: skip
keys = st.none() | st.none() | st.none() | st.text(max_size=300)


def valid_http(action_id: str, raw: bytes, key: str | None) -> bool:
    if not GUID.fullmatch(action_id) or len(raw) > 64 * 1024 or (key is not None and not KEY.fullmatch(key)):
        return False
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(payload, dict):
        return False
    return valid_comment(payload) and isinstance(payload.get("verify", False), bool)


def valid_comment(payload: dict[str, Any]) -> bool:
    """Present (either spelling), a string, not only white space, at most 4096 characters."""
    comment = payload["Comment"] if "Comment" in payload else payload.get("comment")
    return isinstance(comment, str) and bool(comment.strip()) and len(comment) <= MAX_COMMENT_CHARS


def header_safe(text: str) -> bool:
    return all(32 <= ord(c) < 127 for c in text)


@pytest.mark.slow
@settings(FUZZ, max_examples=10_000)
@given(action_id=action_ids, raw=bodies, key=keys, correlation=st.none() | st.text(max_size=40))
def test_generated_http_requests(
    app_env: dict[str, str],
    sim: DefenderSimulator,
    monkeypatch: pytest.MonkeyPatch,
    action_id: str,
    raw: bytes,
    key: str | None,
    correlation: str | None,
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "8000/60")
    headers = {}
    if key is not None and KEY.fullmatch(key):
        key = f"{key[:200]}-{uuid.uuid4()}"  # fresh per example: a key reused for another action is a 400 case
    if key is not None and header_safe(key):
        headers["Idempotency-Key"] = key
    elif key is not None:
        key = None  # not representable in an HTTP header at all
    if correlation is not None and header_safe(correlation):
        headers["x-correlation-id"] = correlation
    before = len(sim.state.calls)

    response = http_cancel(action_id, raw=raw, headers=headers)

    status = response.status_code
    body: Any = json.loads(response.get_body())
    assert status < 500 or status in CONTRACT_5XX, (status, body)
    if not valid_http(action_id, raw, key):
        assert status == 400 and set(body["error"]) >= {"code", "message"}, (status, body)
        assert len(sim.state.calls) == before
    else:
        assert len(sim.state.calls) == before + 1
        assert status in (200, 404), (status, body)  # the simulator's own answers


messages = (
    st.fixed_dictionaries(
        {},
        optional={
            "machineActionId": guids | st.text(max_size=40) | json_values,
            "comment": comments,
            "Comment": comments,
            "correlationId": st.from_regex(CORRELATION, fullmatch=True) | st.text(max_size=140) | json_values,
            "attempts": json_values,
        },
    ).map(json.dumps).map(str.encode)
    | json_values.map(json.dumps).map(str.encode)
    | st.binary(max_size=200)
)  # fmt: skip


def valid_message(payload: Any) -> bool:
    if not isinstance(payload, dict) or not isinstance(payload.get("machineActionId"), str):
        return False
    if not GUID.fullmatch(payload["machineActionId"]):
        return False
    correlation = payload.get("correlationId")
    if correlation is not None and not (isinstance(correlation, str) and CORRELATION.fullmatch(correlation)):
        return False
    return valid_comment(payload) and isinstance(payload.get("verify", False), bool)


@pytest.mark.slow
@settings(FUZZ, max_examples=2_000)
@given(raw=messages, dequeue_count=st.integers(1, 5))
def test_generated_queue_messages(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch, raw: bytes, dequeue_count: int
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "8000/60")
    try:
        payload: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        payload = None
    correlation = payload.get("correlationId") if isinstance(payload, dict) else None
    if isinstance(correlation, str) and CORRELATION.fullmatch(correlation):
        # fresh per example: a repeated correlation id is a replay, tested elsewhere
        payload["correlationId"] = f"{correlation[:80]}-{uuid.uuid4()}"
        raw = json.dumps(payload).encode()
    before = len(sim.state.calls)

    message = queue_api.handle(raw, dequeue_count)

    assert message is not None
    result = message.to_dict()  # with quota to spare and fresh keys, nothing is deferred
    assert set(result) >= {"correlationId", "machineActionId", "status", "body", "outcome", "attempts", "completedAt"}
    if valid_message(payload):
        assert len(sim.state.calls) == before + 1
        assert result["outcome"] in ("cancelled", "upstream_rejected") and result["status"] in (200, 404)
    else:
        assert result["outcome"] == "rejected" and result["status"] is None
        assert len(sim.state.calls) == before
