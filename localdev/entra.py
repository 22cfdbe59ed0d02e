"""A Microsoft Entra token endpoint on loopback, for the client-assertion exchange of customer tenants.

`POST /{tenant}/oauth2/v2.0/token` with `grant_type=client_credentials`,
`client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`, the app's
`client_id`, a `client_assertion` (the managed identity's token) and `scope=<resource>/.default`,
checked as Entra checks it:

- the tenant must exist (AADSTS90002) and the app must be consented there (AADSTS700016);
- the assertion must be a token the local identity endpoint signed, still valid (AADSTS700024);
- one of the app's federated credentials must match its issuer (AADSTS700211), subject
  (AADSTS700213) and audience (AADSTS700212), in that order.

The token it issues is for the resource, in that tenant (`tid`), for the app (`appid`), with the
app roles the tenant's admin consented to. azure-identity insists on https for an authority, so it
is served over TLS with a certificate from a throwaway CA (trustme) made at start; clients trust that
CA through `REQUESTS_CA_BUNDLE`, never by turning verification off.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trustme

from localdev import tokens
from localdev.loopback import LoopbackServer, LoopbackService, Request, Response

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_ROLES = ("Machine.Isolate", "Machine.Scan", "Machine.CollectForensics", "Machine.RestrictExecution",
                 "Machine.Read.All")  # fmt: skip
_TOKEN_PATH = re.compile(r"/([^/]+)/oauth2/v2\.0/token")


@dataclass(frozen=True)
class FederatedCredential:
    issuer: str
    subject: str
    audience: str = "api://AzureADTokenExchange"


@dataclass
class AppRegistration:
    client_id: str
    credentials: list[FederatedCredential] = field(default_factory=list)
    consented: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tenant -> roles granted there


@dataclass
class TokenRequest:
    tenant: str
    client_id: str
    error: str | None  # the AADSTS code, or None when a token was issued


class EntraEndpoint(LoopbackService):
    def __init__(self, port: int = 0, token_secret: str = tokens.DEFAULT_SECRET, lifetime: int = 3600) -> None:
        self.token_secret = token_secret
        self.lifetime = lifetime
        self.tenants: set[str] = set()
        self.apps: dict[str, AppRegistration] = {}
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="local-entra-")
        ca = trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self.ca_path = str(Path(self._dir.name) / "local-entra-ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        self._server = LoopbackServer(self.handle, port, tls=context)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def authority(self) -> str:
        return self._server.base_url

    def stop(self) -> None:
        super().stop()
        self._dir.cleanup()

    # --- directory set-up (the admin's work in a real tenant) -------------------------------
    def add_tenant(self, tenant_id: str) -> None:
        with self._lock:
            self.tenants.add(tenant_id.lower())

    def register(self, client_id: str, *credentials: FederatedCredential) -> AppRegistration:
        with self._lock:
            app = self.apps.setdefault(client_id.lower(), AppRegistration(client_id.lower()))
            app.credentials = list(credentials)
            return app

    def consent(self, client_id: str, tenant_id: str, roles: tuple[str, ...] = DEFAULT_ROLES) -> None:
        with self._lock:
            self.apps[client_id.lower()].consented[tenant_id.lower()] = roles

    def issued(self, tenant_id: str | None = None) -> int:
        """Tokens issued (to `tenant_id`, or in all)."""
        with self._lock:
            return sum(1 for r in self.requests if r.error is None and tenant_id in (None, r.tenant))

    # --- the token endpoint ----------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        if request.path == "/_entra/stats":
            with self._lock:
                return Response(200, {"requests": [r.__dict__ for r in self.requests]})
        match = _TOKEN_PATH.fullmatch(request.path)
        if not match or request.method != "POST":
            return Response(404, {"error": "not_found"})
        tenant = match.group(1).lower()
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
        with self._lock:
            answer, code = self._exchange(tenant, form)
            self.requests.append(TokenRequest(tenant, form.get("client_id", ""), code))
        return answer

    def _exchange(self, tenant: str, form: dict[str, str]) -> tuple[Response, str | None]:
        if tenant not in self.tenants:
            return _error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials" or form.get("client_assertion_type") != JWT_BEARER:
            return _error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id", "").lower()
        app = self.apps.get(client_id)
        if app is None or tenant not in app.consented:
            message = f"Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            return _error(400, "unauthorized_client", 700016, message)
        claims = tokens.verify(self.token_secret, form.get("client_assertion", ""))
        if claims is None:
            return _error(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
        failed = _unmatched(app.credentials, claims)
        if failed:
            return failed
        scope = form.get("scope", "")
        if not scope.endswith("/.default"):
            return _error(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        return self._token(tenant, app, scope.removesuffix("/.default")), None

    def _token(self, tenant: str, app: AppRegistration, resource: str) -> Response:
        principal = str(uuid.uuid5(uuid.NAMESPACE_URL, f"local-sp:{tenant}:{app.client_id}"))
        token, _ = tokens.mint(
            self.token_secret,
            resource,
            principal,
            self.lifetime,
            iss=f"https://sts.windows.net/{tenant}/",
            tid=tenant,
            appid=app.client_id,
            roles=list(app.consented[tenant]),
            idtyp="app",
        )
        body = {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                "access_token": token}  # fmt: skip
        return Response(200, body)


def _unmatched(credentials: list[FederatedCredential], claims: dict[str, Any]) -> tuple[Response, str | None] | None:
    """Entra's federated credential checks, in its order: issuer, then subject (case-sensitive),
    then audience."""
    issuer, subject, audience = claims.get("iss"), claims.get("sub"), claims.get("aud")
    by_issuer = [c for c in credentials if c.issuer == issuer]
    by_subject = [c for c in by_issuer if c.subject == subject]
    for code, claim, value, matches in (
        (700211, "issuer", issuer, by_issuer),
        (700213, "subject", subject, by_subject),
        (700212, "audience", audience, [c for c in by_subject if c.audience == audience]),
    ):
        if not matches:
            sentence = f"No matching federated identity record found for presented assertion {claim} '{value}'."
            return _error(400, "invalid_client", code, sentence)
    return None


def _error(status: int, error: str, code: int, message: str) -> tuple[Response, str]:
    trace = str(uuid.uuid4())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {message} Trace ID: {trace} Correlation ID: {uuid.uuid4()} "
        f"Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return Response(status, body), f"AADSTS{code}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback Entra token endpoint (client-assertion exchange)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-secret", default=tokens.DEFAULT_SECRET)
    args = parser.parse_args()
    endpoint = EntraEndpoint(args.port, args.token_secret)
    print(json.dumps({"authority": endpoint.authority, "caBundle": endpoint.ca_path}), flush=True)
    try:
        endpoint.serve_forever()
    finally:
        endpoint.stop()


if __name__ == "__main__":
    main()
