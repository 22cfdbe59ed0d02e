"""A managed identity endpoint on loopback speaking the App Service protocol.

`GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...[&client_id=...]` with header
`X-IDENTITY-HEADER` answers `{"access_token", "expires_on", "resource", "token_type"}`, as App
Service and Functions do. Tokens carry what Entra's do for a managed identity: the home tenant
(`tid`), the issuer `https://login.microsoftonline.com/<tenant>/v2.0`, the identity's client id
(`appid`) and, as `sub`/`oid`, its object id -- which differs from the client id, as in Azure, so
a federated credential naming the wrong one fails. It counts requests and can fail or stall.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from localdev import tokens
from localdev.loopback import LoopbackServer, LoopbackService, Request, Response

TOKEN_PATH = "/msi/token"
SYSTEM_IDENTITY = "00000000-0000-0000-0000-00000000a11d"
HOME_TENANT = "8a0f4c1e-6f0b-4c8e-9d51-3f3c0e6a9b10"  # the local stack's home directory
ISSUER_HOST = "https://login.microsoftonline.com"


def object_id(client_id: str) -> str:
    """The identity's object (principal) id: fixed per client id, and never equal to it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"local-identity:{client_id}"))


@dataclass
class IdentityFaults:
    status: int | None = None  # answer this status instead of a token
    count: int = 0  # for this many requests (0 = until cleared)
    delay: float = 0.0  # stall each answer this long


class IdentityEndpoint(LoopbackService):
    def __init__(
        self,
        port: int = 0,
        header_secret: str | None = None,
        token_secret: str = tokens.DEFAULT_SECRET,
        lifetime: int = 3600,
        home_tenant: str = HOME_TENANT,
    ) -> None:
        self.home_tenant = home_tenant
        self.header_secret = header_secret or secrets.token_hex(16)
        self.token_secret = token_secret
        self.lifetime = lifetime
        self.requests: list[dict[str, str]] = []
        self.faults = IdentityFaults()
        self._lock = threading.Lock()
        self._server = LoopbackServer(self.handle, port)

    @property
    def endpoint(self) -> str:
        return self._server.base_url + TOKEN_PATH

    def env(self) -> dict[str, str]:
        """The variables the platform sets for the app (and azure-identity reads)."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.header_secret}

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def fail(self, status: int = 500, count: int = 0) -> None:
        with self._lock:
            self.faults = IdentityFaults(status=status, count=count, delay=self.faults.delay)

    def stall(self, seconds: float) -> None:
        with self._lock:
            self.faults = IdentityFaults(status=self.faults.status, count=self.faults.count, delay=seconds)

    def heal(self) -> None:
        with self._lock:
            self.faults = IdentityFaults()

    def handle(self, request: Request) -> Response | None:
        if request.path == "/_identity/faults" and request.method == "POST":
            spec = request.json()
            with self._lock:
                self.faults = IdentityFaults(spec.get("status"), int(spec.get("count", 0)), float(spec.get("delay", 0)))
            return Response(204)
        if request.path == "/_identity/stats":
            return Response(200, {"requests": len(self.requests)})
        if request.path != TOKEN_PATH or request.method != "GET":
            return Response(404, {"error": "not_found"})
        with self._lock:
            self.requests.append(dict(request.query))
            fault = self._take_fault()
        if fault.delay:
            time.sleep(fault.delay)
        if fault.status:
            return Response(fault.status, {"error": "unavailable", "error_description": "fault injected"})
        return self._token(request)

    def _take_fault(self) -> IdentityFaults:
        fault = self.faults
        if fault.status and fault.count:
            remaining = fault.count - 1
            self.faults = IdentityFaults(fault.status if remaining else None, remaining, fault.delay)
        return fault

    def _token(self, request: Request) -> Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.header_secret:
            return Response(
                401, {"error": "unauthorized", "error_description": "X-IDENTITY-HEADER is missing or wrong"}
            )
        if request.query.get("api-version") != "2019-08-01" or not request.query.get("resource"):
            return Response(400, {"error": "invalid_request", "error_description": "api-version and resource required"})
        resource = request.query["resource"]
        client_id = request.query.get("client_id") or SYSTEM_IDENTITY
        token, expires_on = tokens.mint(
            self.token_secret,
            resource,
            object_id(client_id),
            self.lifetime,
            iss=f"{ISSUER_HOST}/{self.home_tenant}/v2.0",
            tid=self.home_tenant,
            appid=client_id,
            idtyp="app",
        )
        body = {
            "access_token": token,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        }
        return Response(200, body)


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback managed identity endpoint (App Service protocol)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--header-secret", default=None)
    parser.add_argument("--token-secret", default=tokens.DEFAULT_SECRET)
    args = parser.parse_args()
    endpoint = IdentityEndpoint(args.port, args.header_secret, args.token_secret)
    print(json.dumps({"identity": endpoint.env()}), flush=True)
    endpoint.serve_forever()


if __name__ == "__main__":
    main()
