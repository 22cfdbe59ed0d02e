"""The test rig: real Azurite, the loopback identity endpoint, Entra's token endpoint and the Defender
simulator.

Servers listen on free loopback ports picked here, never on the standard ones.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import settings

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.entra import EntraEndpoint
from localdev.identity import IdentityEndpoint
from shared.app import reset_app
from tests.support.rig import TOKEN_SECRET

# CI replays one fixed sample of every property test, so a landing never hangs on a new random
# case; developers' runs explore fresh ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
