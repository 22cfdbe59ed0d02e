"""The test rig: real Azurite, the loopback identity endpoint, Entra's token endpoint and the Defender
simulator.

Servers listen on free loopback ports picked here, never on the standard ones.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from hypothesis import settings

from localdev.azurite import Azurite, free_port
from localdev.defender import DefenderSimulator
from localdev.entra import EntraEndpoint
from localdev.identity import IdentityEndpoint
from shared.app import reset_app

# CI replays one fixed sample of every property test, so a landing never hangs on a new random
# case; developers' runs explore fresh ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
TOKEN_SECRET = secrets.token_hex(16)
GUID = "988cc94e-7a8f-4b28-ab65-54970c5d5018"


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = Azurite().start()
    yield server
    server.stop()


@pytest.fixture
def own_azurite() -> Iterator[Azurite]:
    """An Azurite of the test's own, to kill or restart without disturbing the others."""
    server = Azurite().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def identity() -> Iterator[IdentityEndpoint]:
    endpoint = IdentityEndpoint(token_secret=TOKEN_SECRET).start()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def entra() -> Iterator[EntraEndpoint]:
    """Entra's token endpoint on loopback, over TLS with a CA of its own (localdev.entra)."""
    endpoint = EntraEndpoint(token_secret=TOKEN_SECRET).start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def sim() -> Iterator[DefenderSimulator]:
    simulator = DefenderSimulator(windows=((10_000, 60.0),), token_secret=TOKEN_SECRET).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def app_env(
    monkeypatch: pytest.MonkeyPatch, azurite: Azurite, identity: IdentityEndpoint, sim: DefenderSimulator
) -> Iterator[dict[str, str]]:
    """The app's settings pointing at the rig; the app is rebuilt for each test."""
    identity.heal()
    identity.requests.clear()
    env = {
        "AzureWebJobsStorage": azurite.connection_string,
        "DEFENDER_API_BASE_URL": sim.base_url,
        "DEFENDER_TIMEOUT_SECONDS": "5",
        "RATE_LIMIT_KEY": f"test-{secrets.token_hex(6)}",  # each test draws on a quota of its own
        **identity.env(),
    }
    unset = ("DEFENDER_CLOUD", "DEFENDER_TOKEN_SCOPE", "AZURE_CLIENT_ID", "RATE_LIMITS", "RATE_LIMIT_SAFETY_MS",
             "HTTP_MAX_WAIT_SECONDS", "ALLOWED_CALLERS")  # fmt: skip
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_app()
    yield env
    reset_app()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (a refused connection)."""
    return f"http://127.0.0.1:{free_port()}"


def call(folder: str, body: bytes = b"", headers: dict[str, str] | None = None, **route: str) -> func.HttpResponse:
    """What the host does for a request to an HTTP function: the method and route of its
    function.json, filled with `route`, handed to its main(); the response."""
    trigger = json.loads((ROOT / folder / "function.json").read_text())["bindings"][0]
    request = func.HttpRequest(
        method=trigger["methods"][0].upper(),
        url="http://localhost:7071/api/" + trigger["route"].format(**route),
        route_params=route,
        headers=headers or {},
        body=body,
    )
    response: func.HttpResponse = importlib.import_module(folder).main(request)
    return response


def http_cancel(
    action_id: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> func.HttpResponse:
    """Given a request as the host would build it, when CancelMachineAction.main runs, its response."""
    if raw is None:
        raw = json.dumps({"Comment": "cancelled by test"} if body is None else body).encode()
    return call("CancelMachineAction", raw, headers, actionId=action_id)


def body_of(response: func.HttpResponse) -> Any:
    return json.loads(response.get_body())
