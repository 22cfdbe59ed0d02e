"""Logs a SOC can query and an operator can afford: with logging set up the way the Python worker
does it (a handler on the root logger at INFO that forwards everything), each request leaves one
structured record; the SDKs stay quiet; the saved queries use the fields the records carry."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from bench.logs import measure, worker_logging
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint
from shared import logs
from shared.logs import AuditRecord
from shared.outcomes import Outcome
from tests.support.rig import http_cancel

ROOT = Path(__file__).resolve().parents[2]
QUERIES = json.loads((ROOT / "infra/log-queries.json").read_text())
FIELDS = AuditRecord(
    action_id="a",
    source="http",
    comment="c",
    correlation_id="k",
    upstream_status=200,
    outcome=Outcome.CANCELLED,
    duration_ms=1.0,
    attempts=1,
).fields()
KQL_TYPES: dict[str, type | tuple[type, ...]] = {"tostring": str, "toint": int, "todouble": (int, float)}


def structured(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    parsed = [logs.parse(r.getMessage()) for r in records]
    assert all(p is not None for p in parsed), [r.getMessage()[:200] for r in records]
    return [p for p in parsed if p is not None]


def test_fifty_cancels_leave_one_structured_record_each_and_the_sdks_stay_quiet(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint
) -> None:
    result = measure(sim, 50)

    assert result["warm_records"] <= 2 * 50 and result["records_per_warm_cancel"] == 1.0
    assert result["warm_by_logger"] == {"cancel_machine_action": 50}
    assert result["cold_by_logger"] == {"cancel_machine_action": 1}  # a cold worker's token: no SDK lines
    assert result["warm_bytes"] < 50 * 500, result["warm_bytes"]  # ~330 bytes each; 2.5 KB each before
    with worker_logging() as recorder:
        http_cancel(sim.add_action())
    [fields] = structured(recorder.records)
    assert set(fields) == set(FIELDS) and fields["Event"] == "cancel" and fields["UpstreamStatus"] == 200
    assert fields["Caller"] == "function-key" and fields["Source"] == "http" and fields["Attempts"] == 1
    assert identity.header_secret not in json.dumps(fields)


def test_refusals_and_replays_leave_one_record_each_naming_why(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "1/60")
    action = sim.add_action()
    http_cancel(action, headers={"Idempotency-Key": "k-logs"})
    with worker_logging() as recorder:
        bad = http_cancel("not-a-guid")
        quota = http_cancel(sim.add_action())
        replay = http_cancel(action, headers={"Idempotency-Key": "k-logs"})

    assert [r.status_code for r in (bad, quota, replay)] == [400, 429, 200]
    records = structured(recorder.records)
    assert [(r["Event"], r["ErrorCode"] or r["Outcome"]) for r in records] == [
        ("refusal", "BadRequest"),
        ("refusal", "TooManyRequests"),
        ("replay", "replayed"),
    ]
    assert all(set(r) == set(FIELDS) for r in records)


def test_the_sdks_speak_again_when_asked(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL_SDK", "INFO")
    try:
        with worker_logging() as recorder:
            http_cancel(sim.add_action())
        assert any(r.name.startswith("azure.core.pipeline.policies.http_logging_policy") for r in recorder.records)
    finally:
        logs.quiet_sdks("WARNING")


def kql_fields(query: str) -> list[tuple[str, str]]:
    """(conversion, field) for every record field a query reads: toint(d.UpstreamStatus) ..."""
    return re.findall(r"(tostring|toint|todouble)\(d\.(\w+)\)", query)


@pytest.mark.parametrize("query", [*QUERIES["savedSearches"], QUERIES["alert"]], ids=lambda q: q["name"])
def test_each_saved_query_reads_fields_the_records_have_with_their_types(query: dict[str, Any]) -> None:
    used = kql_fields(query["query"])
    docs = (ROOT / "docs/logs.md").read_text()

    assert used, query["query"]
    assert f"substring(Message, {len(logs.PREFIX)})" in query["query"]
    assert f'startswith "{logs.PREFIX}"' in query["query"]
    for conversion, name in used:
        assert name in FIELDS, name
        assert isinstance(FIELDS[name], KQL_TYPES[conversion]), (name, conversion, FIELDS[name])
    assert query["query"] in docs  # docs/logs.md shows the same query


def test_a_record_never_holds_a_token_or_the_comment(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    action = sim.add_action()
    with worker_logging() as recorder:
        http_cancel(action, {"Comment": "secret-ish incident notes"})
    token = sim.calls()[0].authorization.removeprefix("Bearer ")
    text = " ".join(r.getMessage() for r in recorder.records)
    assert len(token) > 20 and token not in text and "Bearer" not in text and "secret-ish" not in text
    assert action in text  # the records were read: they name the action, just never the token
