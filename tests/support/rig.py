"""The rig's helpers for tests of every tier: what the host does for a request to an HTTP function,
and the constants the fixtures (tests/conftest.py) share with the tests."""

from __future__ import annotations

import base64
import importlib
import json
import secrets
from pathlib import Path
from typing import Any

import azure.functions as func

from localdev.azurite import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN_SECRET = secrets.token_hex(16)
GUID = "988cc94e-7a8f-4b28-ab65-54970c5d5018"


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


def get_quota() -> func.HttpResponse:
    return call("GetQuota")


def principal(**claims: str) -> str:
    """An X-MS-CLIENT-PRINCIPAL header as App Service Authentication sets it, with these claims."""
    payload = {"auth_typ": "aad", "claims": [{"typ": k, "val": v} for k, v in claims.items()]}
    return base64.b64encode(json.dumps(payload).encode()).decode()
