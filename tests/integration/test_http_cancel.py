"""The HTTP cancel function end to end: real azure-identity, Azurite and the Defender simulator."""

from __future__ import annotations

import json
import logging
import re

import pytest

from localdev import tokens
from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.identity import IdentityEndpoint
from shared.config.settings import DEFAULT_AUDIT_TABLE
from tests.support.rig import GUID, TOKEN_SECRET, body_of, closed_port_url, http_cancel


def test_fifty_cancels_use_one_token_from_the_managed_identity(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint
) -> None:
    ids = [sim.add_action("Pending") for _ in range(50)]

    statuses = [http_cancel(action_id).status_code for action_id in ids]

    assert statuses == [200] * 50
    assert len(identity.requests) == 1
    assert identity.requests[0]["resource"] == "https://api.securitycenter.microsoft.com"
    headers = {call.authorization for call in sim.calls()}
    assert len(headers) == 1
    token = headers.pop().removeprefix("Bearer ")
    claims = tokens.verify(TOKEN_SECRET, token)
    assert claims is not None and claims["aud"] == "https://api.securitycenter.microsoft.com"


@pytest.mark.parametrize(
    ("cloud", "resource"),
    [
        ("Public", "https://api.securitycenter.microsoft.com"),
        ("GCC", "https://api-gcc.securitycenter.microsoft.us"),
        ("GCCHigh", "https://api-gov.securitycenter.microsoft.us"),
        ("DoD", "https://api-gov.securitycenter.microsoft.us"),
    ],
)
def test_each_cloud_asks_for_its_own_audience(
    app_env: dict[str, str],
    sim: DefenderSimulator,
    identity: IdentityEndpoint,
    monkeypatch: pytest.MonkeyPatch,
    cloud: str,
    resource: str,
) -> None:
    monkeypatch.setenv("DEFENDER_CLOUD", cloud)
    sim.audience = resource

    response = http_cancel(sim.add_action("InProgress"))

    assert response.status_code == 200
    assert [r["resource"] for r in identity.requests] == [resource]


def test_user_assigned_identity_sends_its_client_id(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id = "7d3c6b1e-0b5e-4a43-9a44-1c1f0a6f5c11"
    monkeypatch.setenv("AZURE_CLIENT_ID", client_id)

    assert http_cancel(sim.add_action()).status_code == 200
    assert identity.requests[0]["client_id"] == client_id


def _upstream_answer(sim: DefenderSimulator) -> object:
    calls = sim.calls()
    assert len(calls) == 1
    return json.loads(calls[0].response)


def test_success_passes_the_entity_through_unchanged(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    action_id = sim.add_action("Pending")

    response = http_cancel(action_id, {"Comment": "false positive, incident 42"})

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = body_of(response)
    assert body == _upstream_answer(sim)
    assert body["status"] == "Cancelled" and body["cancellationComment"] == "false positive, incident 42"


def test_lower_case_comment_is_sent_upstream_as_Comment(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    response = http_cancel(sim.add_action(), {"comment": "lower case"})

    assert response.status_code == 200
    assert json.loads(sim.calls()[0].body) == {"Comment": "lower case"}


def test_final_action_passes_upstream_400_through(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    response = http_cancel(sim.add_action("Succeeded"))

    assert response.status_code == 400
    assert body_of(response) == _upstream_answer(sim)
    assert body_of(response)["error"]["code"] == "BadRequest"


def test_unknown_action_passes_upstream_404_through(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    response = http_cancel(GUID)

    assert response.status_code == 404
    assert body_of(response) == _upstream_answer(sim)


def test_wrong_audience_passes_upstream_403_through(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.audience = "https://api-gov.securitycenter.microsoft.us"

    response = http_cancel(sim.add_action())

    assert response.status_code == 403
    assert body_of(response) == _upstream_answer(sim)


def test_upstream_429_passes_through_with_retry_after(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.windows = ((1, 60.0),)
    first, second = sim.add_action(), sim.add_action()
    assert http_cancel(first).status_code == 200

    response = http_cancel(second)

    assert response.status_code == 429
    assert body_of(response) == json.loads(sim.calls()[1].response)
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_upstream_500_passes_through_without_retry(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("status", count=1, status=500))

    response = http_cancel(sim.add_action())

    assert response.status_code == 500
    assert body_of(response) == _upstream_answer(sim)


def test_upstream_503_is_retried_then_succeeds(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("status", count=1, status=503))

    response = http_cancel(sim.add_action())

    assert response.status_code == 200
    assert [c.status for c in sim.calls()] == [503, 200]


def test_persistent_503_stops_after_bounded_attempts(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("status", count=0, status=503))

    response = http_cancel(sim.add_action())

    assert response.status_code == 503
    assert len(sim.calls()) == 3


def test_non_json_upstream_body_is_wrapped_in_the_error_shape(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("garbage", count=1, status=500))

    response = http_cancel(sim.add_action())

    assert response.status_code == 500
    assert body_of(response)["error"]["code"] == "InvalidUpstreamResponse"


def test_huge_upstream_body_gives_502(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("huge", count=1))

    response = http_cancel(sim.add_action())

    assert response.status_code == 502
    assert body_of(response)["error"]["code"] == "BadGateway"


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_is_not_followed_past_the_limiter(
    app_env: dict[str, str], sim: DefenderSimulator, status: int
) -> None:
    sim.inject(Fault("redirect", count=1, status=status))

    response = http_cancel(sim.add_action())

    assert response.status_code == status
    assert [c.path for c in sim.calls("")] == [sim.calls("")[0].path]  # one POST, not re-sent elsewhere


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_crafted_deep_nesting_gives_400_not_500(app_env: dict[str, str], sim: DefenderSimulator, opener: str) -> None:
    raw = (opener * 60_000)[: 60 * 1024].encode()

    response = http_cancel(sim.add_action(), raw=raw)

    assert response.status_code == 400 and body_of(response)["error"]["code"] == "InvalidRequestBody"
    assert sim.calls("") == []


INVALID_IDS = [
    "not-a-guid",
    "..%2F..%2Fmachines",
    "../../machines",
    f"{GUID}%2F..%2F..%2Fmachines",
    f"{GUID}/../../machines",
    f"{GUID}\n",
    f" {GUID}",
    "{" + GUID + "}",
    GUID.replace("-", ""),
    f"urn:uuid:{GUID}",
    GUID[:-1] + "g",
    "",
]


@pytest.mark.parametrize("action_id", INVALID_IDS)
def test_malformed_action_id_gives_400_and_no_upstream_call(
    app_env: dict[str, str], sim: DefenderSimulator, action_id: str
) -> None:
    response = http_cancel(action_id)

    assert response.status_code == 400
    assert body_of(response)["error"]["code"] == "BadRequest"
    assert "GUID" in body_of(response)["error"]["message"]
    assert sim.calls("") == []


INVALID_BODIES = [
    (b"", "InvalidRequestBody"),
    (b"not json", "InvalidRequestBody"),
    (b"\xff\xfe", "InvalidRequestBody"),
    (b"[]", "InvalidRequestBody"),
    (b'"a string"', "InvalidRequestBody"),
    (b"null", "InvalidRequestBody"),
    (b"42", "InvalidRequestBody"),
    (b"{}", "MissingRequiredParameter"),
    (b'{"Reason": "x"}', "MissingRequiredParameter"),
    (b'{"Comment": ""}', "InvalidRequestBody"),
    (b'{"Comment": "   "}', "InvalidRequestBody"),
    (b'{"Comment": null}', "InvalidRequestBody"),
    (b'{"Comment": 42}', "InvalidRequestBody"),
    (b'{"Comment": ["a"]}', "InvalidRequestBody"),
    (b'{"comment": {"a": 1}}', "InvalidRequestBody"),
    (json.dumps({"Comment": "x" * (64 * 1024)}).encode(), "InvalidRequestBody"),
]


@pytest.mark.parametrize(("raw", "code"), INVALID_BODIES, ids=[c[0][:20].decode("latin-1") for c in INVALID_BODIES])
def test_invalid_body_gives_400_in_the_error_shape_and_no_upstream_call(
    app_env: dict[str, str], sim: DefenderSimulator, raw: bytes, code: str
) -> None:
    response = http_cancel(GUID, raw=raw)

    assert response.status_code == 400
    error = body_of(response)["error"]
    assert error["code"] == code and error["message"]
    assert sim.calls("") == []


def test_body_of_exactly_64_kib_is_accepted(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    action_id = sim.add_action()
    raw = json.dumps({"Comment": "x"}).encode()
    raw = raw[:-1] + b" " * (64 * 1024 - len(raw)) + b"}"

    assert len(raw) == 64 * 1024
    assert http_cancel(action_id, raw=raw).status_code == 200


def test_upstream_timeout_gives_504(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFENDER_TIMEOUT_SECONDS", "0.5")
    sim.inject(Fault("slow", count=1, seconds=2.0))

    response = http_cancel(sim.add_action())

    assert response.status_code == 504
    assert body_of(response)["error"]["code"] == "GatewayTimeout"
    assert len(sim.calls()) == 1  # a read timeout is never retried: Defender may have acted


def test_refused_connection_gives_502(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFENDER_API_BASE_URL", closed_port_url())

    response = http_cancel(GUID)

    assert response.status_code == 502
    assert body_of(response)["error"]["code"] == "BadGateway"


def test_dropped_connection_gives_502_without_retry(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    sim.inject(Fault("drop", count=1))

    response = http_cancel(sim.add_action())

    assert response.status_code == 502
    assert len(sim.calls()) == 1


def test_identity_endpoint_down_gives_502_saying_no_token(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", closed_port_url() + "/msi/token")

    response = http_cancel(sim.add_action())

    assert response.status_code == 502
    error = body_of(response)["error"]
    assert error["code"] == "TokenUnavailable"
    assert "access token" in error["message"]
    assert sim.calls("") == []


def test_identity_endpoint_failing_gives_502(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint
) -> None:
    identity.fail(500)

    response = http_cancel(sim.add_action())

    assert response.status_code == 502
    assert body_of(response)["error"]["code"] == "TokenUnavailable"
    assert sim.calls("") == []


def test_no_token_or_key_reaches_the_logs(
    app_env: dict[str, str],
    sim: DefenderSimulator,
    identity: IdentityEndpoint,
    azurite: Azurite,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    http_cancel(sim.add_action())
    http_cancel(GUID)
    sim.inject(Fault("status", count=1, status=500))
    http_cancel(sim.add_action())
    monkeypatch.setenv("DEFENDER_API_BASE_URL", closed_port_url())
    http_cancel(GUID)
    token = sim.calls()[0].authorization.removeprefix("Bearer ")
    # The net under the SDKs: a record that does carry secrets (as an SDK's debug line might) is
    # scrubbed on the way out of every root handler, the Functions worker's and this one.
    logging.getLogger("azure.core.pipeline").warning("sent Authorization: Bearer %s", token)
    logging.getLogger("azure.identity").warning(
        "X-IDENTITY-HEADER: %s; %s", identity.header_secret, app_env["AzureWebJobsStorage"]
    )

    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert token and token not in logged
    assert identity.header_secret not in logged
    assert set(re.findall(r"AccountKey=([^;\s\"']*)", logged)) <= {"***"}
    assert azurite.connection_string.split("AccountKey=")[1].split(";")[0] not in logged


def test_correlation_id_is_echoed_or_created(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    given = http_cancel(sim.add_action(), headers={"x-correlation-id": "ticket-1234"})
    created = http_cancel(GUID)
    invalid = http_cancel("bad", headers={"x-correlation-id": "bad id\r\nX-Injected: 1"})

    assert given.headers["x-correlation-id"] == "ticket-1234"
    assert len(created.headers["x-correlation-id"]) == 36
    assert body_of(created)["error"]["code"] == "ResourceNotFound"
    assert invalid.headers["x-correlation-id"] != "bad id\r\nX-Injected: 1"
    assert body_of(invalid)["error"]["target"] == invalid.headers["x-correlation-id"]


def test_each_upstream_call_leaves_an_audit_record(
    app_env: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    from azure.data.tables import TableClient

    action_id = sim.add_action()
    http_cancel(action_id, {"Comment": "audit me"}, headers={"x-correlation-id": "corr-audit-1"})
    http_cancel(action_id, {"Comment": "again"})
    http_cancel("bad-id")

    table = TableClient.from_connection_string(azurite.connection_string, DEFAULT_AUDIT_TABLE)
    rows = list(table.query_entities("PartitionKey eq @pk", parameters={"pk": action_id}))
    assert [(r["UpstreamStatus"], r["Comment"]) for r in rows] == [(400, "again"), (200, "audit me")]
    first = rows[1]
    assert first["Source"] == "http" and first["CorrelationId"] == "corr-audit-1"
    assert first["Outcome"] == "cancelled" and first["Attempts"] == 1 and first["DurationMs"] > 0
