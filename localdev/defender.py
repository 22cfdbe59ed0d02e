"""A Defender for Endpoint API simulator on loopback, for the cancel operation.

Behaves like the documented API (REFERENCE.md, mde.swagger.json): machine actions with states;
cancel of a Pending/InProgress action answers 200 with the updated entity; a final action 400; an
unknown id 404; a body without `Comment` 400; its own rolling rate windows answer 429 with
`Retry-After`; a missing token 401, a token with a bad signature, expiry or audience 403. Like
Defender it serves many tenants: the token's `tid` picks the tenant (403 for one not onboarded), an
action is found only in its own tenant (404 elsewhere), and the rate windows count per app
(`appid`) and tenant. Every call is recorded with its arrival time, tenant and app. Faults (5xx,
garbage, huge or slow bodies, dropped connections) can be injected for the next N calls, including a
gateway that fails after Defender acted. Admin routes under `/_sim/` need no token.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from localdev import tokens
from localdev.identity import HOME_TENANT
from localdev.loopback import LoopbackServer, Request, Response

PUBLIC_AUDIENCE = "https://api.securitycenter.microsoft.com"
DEFAULT_WINDOWS = ((100, 60.0), (1500, 3600.0))
FINAL_STATES = frozenset({"Succeeded", "Failed", "TimeOut", "Cancelled"})
OPEN_STATES = ("Pending", "InProgress")
ACTION_TYPES = ("Isolate", "RunAntiVirusScan", "CollectInvestigationPackage", "LiveResponse", "RestrictCodeExecution")
_CANCEL = re.compile(r"/api/machineactions/([^/]+)/cancel")
_ACTION = re.compile(r"/api/machineactions/([^/]+)")
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, {"error": {"code": code, "message": message, "target": str(uuid.uuid4())}}, headers)


@dataclass
class Call:
    """One request to the API routes, as the simulator saw it."""

    at: float  # time.time() on arrival
    method: str
    path: str
    authorization: str
    body: str
    status: int = 0
    response: str = ""  # the answer's body as sent (first 64 KiB)
    tenant: str = ""  # the token's tenant (tid), when it had a valid one
    app: str = ""  # the token's app (appid)


@dataclass
class Fault:
    mode: str  # "status", "garbage", "huge", "slow", "drop", "redirect"; "acted": act, then a gateway answers `status`
    count: int = 1  # how many calls it applies to (0 = until cleared)
    status: int = 500
    seconds: float = 0.0  # "slow": stall this long before answering
    retry_after: int | None = None


@dataclass
class SimulatorState:
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # action id -> its tenant
    calls: list[Call] = field(default_factory=list)
    admitted: dict[str, deque[float]] = field(default_factory=dict)  # per app|tenant: arrivals the windows count
    fault: Fault | None = None


class DefenderSimulator:
    def __init__(
        self,
        port: int = 0,
        windows: tuple[tuple[int, float], ...] = DEFAULT_WINDOWS,
        audience: str = PUBLIC_AUDIENCE,
        token_secret: str = tokens.DEFAULT_SECRET,
        home_tenant: str = HOME_TENANT,
    ) -> None:
        self.home_tenant = home_tenant
        self.tenants = {home_tenant}  # onboarded to Defender
        self.windows = tuple(sorted(windows, key=lambda w: w[1]))
        self.audience = audience
        self.token_secret = token_secret
        self.state = SimulatorState()
        self._lock = threading.Lock()
        self._server = LoopbackServer(self.handle, port)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> DefenderSimulator:
        self._server.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.stop()

    # --- test-facing API (also over HTTP under /_sim/) --------------------------------------
    def add_tenant(self, tenant_id: str) -> None:
        with self._lock:
            self.tenants.add(tenant_id.lower())

    def add_action(
        self,
        status: str = "Pending",
        action_type: str = "Isolate",
        action_id: str | None = None,
        tenant: str | None = None,
    ) -> str:
        action_id = action_id or str(uuid.uuid4())
        created = _now_iso()
        entity: dict[str, Any] = {
            "@odata.context": f"{PUBLIC_AUDIENCE}/api/$metadata#MachineActions/$entity",
            "id": action_id,
            "type": action_type,
            "title": None,
            "requestor": "SOC-Automation",
            "requestorComment": f"{action_type} requested by the simulator seed",
            "status": status,
            "machineId": uuid.uuid4().hex + uuid.uuid4().hex[:8],
            "computerDnsName": f"desktop-{action_id[:6]}",
            "creationDateTimeUtc": created,
            "lastUpdateDateTimeUtc": created,
            "cancellationRequestor": None,
            "cancellationComment": None,
            "cancellationDateTimeUtc": None,
            "errorHResult": 0,
            "scope": "Full" if action_type == "Isolate" else None,
            "externalId": None,
            "requestSource": "PublicApi",
            "relatedFileInfo": None,
            "commands": [],
            "troubleshootInfo": None,
        }
        with self._lock:
            self.state.actions[action_id] = entity
            self.state.owners[action_id] = (tenant or self.home_tenant).lower()
        return action_id

    def seed(self, count: int, rng: random.Random | None = None, tenant: str | None = None) -> list[str]:
        rng = rng or random.Random(0)
        return [
            self.add_action(
                OPEN_STATES[i % 2],
                ACTION_TYPES[i % len(ACTION_TYPES)],
                str(uuid.UUID(int=rng.getrandbits(128))),
                tenant,
            )
            for i in range(count)
        ]

    def inject(self, fault: Fault | None) -> None:
        with self._lock:
            self.state.fault = fault

    def calls(self, path_contains: str = "/cancel", tenant: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self.state.calls if path_contains in c.path and tenant in (None, c.tenant)]

    def reset(self) -> None:
        with self._lock:
            self.state = SimulatorState(actions=self.state.actions, owners=self.state.owners)

    # --- request handling ------------------------------------------------------------------
    def handle(self, request: Request) -> Response | None:
        if request.path.startswith("/_sim/"):
            return self._admin(request)
        call = Call(time.time(), request.method, request.path, request.headers.get("Authorization", ""), "")
        call.body = request.body.decode("utf-8", "replace")[:1000]
        with self._lock:
            self.state.calls.append(call)
            response, fault = self._route(request, call)
        answer = self._apply_fault(fault, response)
        if answer is not None:
            call.status = answer.status
            call.response = answer.raw[: 64 * 1024].decode("utf-8", "replace")
        return answer

    def _route(self, request: Request, call: Call) -> tuple[Response, Fault | None]:
        claims = self._check_token(request.headers.get("Authorization", ""))
        if isinstance(claims, Response):
            return claims, None
        call.tenant, call.app = str(claims.get("tid", "")), str(claims.get("appid", ""))
        if call.tenant not in self.tenants:
            return _error(403, "Forbidden", f"Tenant {call.tenant!r} is not onboarded to Defender for Endpoint"), None
        throttled = self._check_rate(f"{call.app}|{call.tenant}")
        if throttled:
            return throttled, None
        fault = self._take_fault()
        if fault and fault.mode not in ("slow", "acted"):  # a failing front end answers without acting
            return Response(0), fault
        cancel = _CANCEL.fullmatch(request.path)
        if cancel and request.method == "POST":
            return self._cancel(cancel.group(1), request.body, call.tenant), fault
        action = _ACTION.fullmatch(request.path)
        if action and request.method == "GET":
            entity = self._find(action.group(1), call.tenant)
            if entity is None:
                return _error(404, "ResourceNotFound", f"Machine action {action.group(1)} was not found"), fault
            return Response(200, entity), fault
        return _error(404, "NotFound", "Resource not found"), fault

    def _check_token(self, authorization: str) -> dict[str, Any] | Response:
        if not authorization.startswith("Bearer ") or not authorization[7:].strip():
            return _error(401, "Unauthorized", "Authorization header with a Bearer token is required")
        claims = tokens.verify(self.token_secret, authorization[7:].strip())
        if claims is None:
            return _error(403, "Forbidden", "The token is invalid or expired")
        if claims.get("aud") != self.audience:
            return _error(403, "Forbidden", f"The token audience {claims.get('aud')!r} is not {self.audience!r}")
        return claims

    def _find(self, raw_id: str, tenant: str) -> dict[str, Any] | None:
        """An action of this tenant; another tenant's is as unknown as a made-up id."""
        action_id = raw_id.lower()
        return self.state.actions.get(action_id) if self.state.owners.get(action_id) == tenant else None

    def _check_rate(self, key: str) -> Response | None:
        now = time.time()
        admitted = self.state.admitted.setdefault(key, deque())
        longest = self.windows[-1][1]
        while admitted and admitted[0] <= now - longest:
            admitted.popleft()
        for limit, seconds in self.windows:
            in_window = [t for t in admitted if t > now - seconds]
            if len(in_window) >= limit:
                wait = max(1, math.ceil(in_window[-limit] + seconds - now))
                return _error(
                    429,
                    "TooManyRequests",
                    f"API calls quota exceeded! Maximal {limit} calls per {seconds:g} seconds",
                    {"Retry-After": str(wait)},
                )
        admitted.append(now)
        return None

    def _take_fault(self) -> Fault | None:
        fault = self.state.fault
        if fault and fault.count:
            fault.count -= 1
            if fault.count == 0:
                self.state.fault = None
        return fault

    def _cancel(self, raw_id: str, body: bytes, tenant: str) -> Response:
        if not _GUID.fullmatch(raw_id):
            return _error(400, "InvalidRequestBody", f"Invalid machine action id {raw_id!r}")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "InvalidRequestBody", "Request body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("Comment"), str):
            return _error(400, "MissingRequiredParameter", "Comment is a required parameter")
        entity = self._find(raw_id, tenant)
        if entity is None:
            return _error(404, "ResourceNotFound", f"Machine action {raw_id} was not found")
        if entity["status"] in FINAL_STATES:
            return _error(
                400, "BadRequest", f"Machine action {raw_id} is already {entity['status']} and cannot be canceled"
            )
        now = _now_iso()
        entity.update(
            status="Cancelled",
            lastUpdateDateTimeUtc=now,
            cancellationRequestor="cancel-machine-action-function",
            cancellationComment=payload["Comment"],
            cancellationDateTimeUtc=now,
        )
        return Response(200, dict(entity))

    def _apply_fault(self, fault: Fault | None, response: Response) -> Response | None:
        """ "slow" answers the real response late; the other modes replace it."""
        if fault is None:
            return response
        if fault.mode == "slow":
            time.sleep(fault.seconds)
            return response
        if fault.mode == "drop":
            return None
        if fault.mode == "redirect":  # a front end pointing the caller elsewhere
            return Response(fault.status, raw=b"", headers={"Location": "/api/machineactions/redirected/cancel"})
        if fault.mode == "acted":  # Defender did its work; the gateway in front lost the answer
            code = {500: "InternalServerError", 502: "BadGateway"}.get(fault.status, "GatewayTimeout")
            return _error(fault.status, code, "The answer was lost after the action was cancelled")
        if fault.mode == "garbage":
            return Response(
                fault.status, raw=b"<html>upstream proxy error</html>", headers={"Content-Type": "text/html"}
            )
        if fault.mode == "huge":
            return Response(200, raw=b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}')
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else None
        return _error(
            fault.status,
            "InternalServerError" if fault.status == 500 else "ServiceUnavailable",
            "Injected failure",
            headers,
        )

    def _admin(self, request: Request) -> Response:
        if request.path == "/_sim/actions" and request.method == "POST":
            spec = request.json()
            action_id = self.add_action(
                spec.get("status", "Pending"), spec.get("type", "Isolate"), spec.get("id"), spec.get("tenant")
            )
            return Response(201, self.state.actions[action_id])
        if request.path == "/_sim/actions":
            with self._lock:
                return Response(200, list(self.state.actions.values()))
        if request.path == "/_sim/calls":
            return Response(200, [asdict(c) for c in self.calls("")])
        if request.path == "/_sim/faults" and request.method == "POST":
            spec = request.json()
            self.inject(Fault(**spec) if spec else None)
            return Response(204)
        if request.path == "/_sim/reset" and request.method == "POST":
            self.reset()
            return Response(204)
        return Response(404, {"error": {"code": "NotFound", "message": "unknown admin route"}})


def parse_windows(raw: str) -> tuple[tuple[int, float], ...]:
    return tuple((int(c), float(s)) for c, s in (part.split("/") for part in raw.split(",")))


def main() -> None:
    parser = argparse.ArgumentParser(description="Defender for Endpoint API simulator (cancel machine action)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--windows", default="100/60,1500/3600", help="COUNT/SECONDS,... like RATE_LIMITS")
    parser.add_argument("--audience", default=PUBLIC_AUDIENCE)
    parser.add_argument("--token-secret", default=tokens.DEFAULT_SECRET)
    parser.add_argument("--seed", type=int, default=6, help="how many open actions to create")
    args = parser.parse_args()
    sim = DefenderSimulator(args.port, parse_windows(args.windows), args.audience, args.token_secret)
    seeded = sim.seed(args.seed)
    print(json.dumps({"defender": sim.base_url, "actions": seeded}), flush=True)
    sim.serve_forever()


if __name__ == "__main__":
    main()
