"""The shared quota on the HTTP path: 429 before Defender has to say it, waiting, 503 fail-closed."""

from __future__ import annotations

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from tests.support.rig import GUID, body_of, get_quota, http_cancel


def test_quota_used_up_gives_429_with_retry_after_and_no_upstream_call(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "3/60")
    for _ in range(3):
        assert http_cancel(sim.add_action()).status_code == 200

    response = http_cancel(sim.add_action())

    assert response.status_code == 429
    assert body_of(response)["error"]["code"] == "TooManyRequests"
    assert 59 <= int(response.headers["Retry-After"]) <= 62
    assert len(sim.calls()) == 3


def test_http_caller_waits_up_to_its_limit_for_a_slot(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "2/1")
    monkeypatch.setenv("RATE_LIMIT_SAFETY_MS", "50")
    monkeypatch.setenv("HTTP_MAX_WAIT_SECONDS", "3")

    statuses = [http_cancel(sim.add_action()).status_code for _ in range(3)]

    assert statuses == [200, 200, 200]
    arrivals = [c.at for c in sim.calls()]
    assert arrivals[2] - arrivals[0] >= 1.0  # the third waited for the first to leave the window


def test_upstream_429_holds_every_later_call_back(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.windows = ((1, 60.0),)  # Defender's own quota is smaller than ours: it says 429
    assert http_cancel(sim.add_action()).status_code == 200
    upstream = http_cancel(sim.add_action())
    assert upstream.status_code == 429

    ours = http_cancel(sim.add_action())

    assert ours.status_code == 429
    assert body_of(ours)["error"]["code"] == "TooManyRequests"
    assert int(ours.headers["Retry-After"]) >= int(upstream.headers["Retry-After"]) - 1
    assert len(sim.calls()) == 2


def test_quota_endpoint_reports_each_window(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "2/60,10/3600")
    http_cancel(sim.add_action())
    http_cancel(GUID)

    response = get_quota()

    assert response.status_code == 200
    body = body_of(response)
    assert body["key"] == app_env["RATE_LIMIT_KEY"]
    short, long = body["windows"]
    assert (short["limit"], short["seconds"], short["used"], short["remaining"]) == (2, 60, 2, 0)
    assert 59 <= short["nextSlotInSeconds"] <= 62
    assert (long["limit"], long["used"], long["remaining"]) == (10, 2, 8)
    assert long["nextSlotInSeconds"] <= 0.25  # free now, or once the last reservation has gone
    assert body["blockedUntil"] is None


def test_state_store_down_fails_closed_with_503(
    app_env: dict[str, str],
    sim: DefenderSimulator,
    own_azurite: Azurite,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", own_azurite.connection_string)
    assert http_cancel(sim.add_action()).status_code == 200
    own_azurite.kill()

    response = http_cancel(sim.add_action())
    quota = get_quota()

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert body_of(response)["error"]["code"] == "ServiceUnavailable"
    assert quota.status_code == 503
    assert len(sim.calls()) == 1


def test_state_store_down_at_start_fails_closed(
    app_env: dict[str, str], sim: DefenderSimulator, own_azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", own_azurite.connection_string)
    own_azurite.kill()

    response = http_cancel(sim.add_action())

    assert response.status_code == 503
    assert sim.calls("") == []


def test_a_retry_with_no_quota_left_returns_defenders_last_answer(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localdev.defender import Fault

    monkeypatch.setenv("RATE_LIMITS", "1/60")
    sim.inject(Fault("status", count=1, status=503))

    response = http_cancel(sim.add_action())

    assert response.status_code == 503  # Defender's answer, not our 429: the retry found no slot
    assert len(sim.calls()) == 1


def test_each_defender_api_has_its_own_quota_and_the_quota_route_shows_all_three(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "2/60")
    monkeypatch.setenv("GET_RATE_LIMITS", "5/60")
    monkeypatch.setenv("LIST_RATE_LIMITS", "7/30")
    for _ in range(2):
        assert http_cancel(sim.add_action(), {"Comment": "c", "verify": True}).status_code == 200

    refused = http_cancel(sim.add_action())  # the cancel quota is full; the get quota is not
    body = body_of(get_quota())

    assert refused.status_code == 429 and len(sim.calls(api="cancel")) == 2 and len(sim.calls("", api="get")) == 2
    assert {api: (q["windows"][0]["limit"], q["windows"][0]["used"]) for api, q in body["quotas"].items()} == {
        "cancel": (2, 2),
        "list": (7, 0),
        "get": (5, 2),
    }
    key = app_env["RATE_LIMIT_KEY"]
    assert [body["quotas"][api]["key"] for api in ("cancel", "list", "get")] == [key, f"{key}-list", f"{key}-get"]
    assert body["key"] == key and body["windows"] == body["quotas"]["cancel"]["windows"]  # as before, at the top
