"""Caller identity behind App Service Authentication (ALLOWED_CALLERS)."""

from __future__ import annotations

import pytest

from localdev.defender import DefenderSimulator
from tests.support.rig import body_of, http_cancel, principal

ALLOWED_APP = "4f1c2d3e-1111-2222-3333-444455556666"


@pytest.fixture
def authenticated(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
    monkeypatch.setenv("ALLOWED_CALLERS", f"{ALLOWED_APP.upper()}, 0bj-7")


def test_a_listed_app_id_may_cancel(authenticated: None, sim: DefenderSimulator) -> None:
    response = http_cancel(sim.add_action(), headers={"X-MS-CLIENT-PRINCIPAL": principal(appid=ALLOWED_APP)})

    assert response.status_code == 200


def test_a_listed_object_id_may_cancel(authenticated: None, sim: DefenderSimulator) -> None:
    response = http_cancel(sim.add_action(), headers={"X-MS-CLIENT-PRINCIPAL-ID": "0BJ-7"})

    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-MS-CLIENT-PRINCIPAL": principal(appid="someone-else")},
        {"X-MS-CLIENT-PRINCIPAL": "not base64 json"},
        {"X-MS-CLIENT-PRINCIPAL": principal(name=ALLOWED_APP)},  # a claim that does not identify
    ],
)
def test_anyone_else_gets_403_and_no_upstream_call(
    authenticated: None, sim: DefenderSimulator, headers: dict[str, str]
) -> None:
    response = http_cancel(sim.add_action(), headers=headers)

    assert response.status_code == 403
    assert body_of(response)["error"]["code"] == "Forbidden"
    assert sim.calls("") == []


def test_the_caller_check_comes_before_validation(authenticated: None, sim: DefenderSimulator) -> None:
    assert http_cancel("not-a-guid").status_code == 403
