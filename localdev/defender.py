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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from localdev import tokens
from localdev.identity import HOME_TENANT
from localdev.loopback import LoopbackServer, LoopbackService, Request, Response

PUBLIC_AUDIENCE = "https://api.securitycenter.microsoft.com"
DEFAULT_WINDOWS = ((100, 60.0), (1500, 3600.0))
FINAL_STATES = frozenset({"Succeeded", "Failed", "TimeOut", "Cancelled"})
OPEN_STATES = ("Pending", "InProgress")
ACTION_TYPES = ("Isolate", "RunAntiVirusScan", "CollectInvestigationPackage", "LiveResponse", "RestrictCodeExecution")
_CANCEL = re.compile(r"/api/machineactions/([^/]+)/cancel")
_ACTION = re.compile(r"/api/machineactions/([^/]+)")
_LIST = "/api/machineactions"
READ_ROLES = ("Machine.Read.All", "Machine.ReadWrite.All")
FILTER_FIELDS = ("id", "status", "machineId", "type", "requestor")
_CLAUSE = re.compile(r"\s*(\w+)\s+eq\s+'([^']*)'\s*")
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
    api: str = ""  # "cancel", "list" or "get": each has its own rate windows, as Defender lists them


@dataclass
class Fault:
    mode: str  # "status", "garbage", "huge", "slow", "drop", "redirect"; "acted": act, then a gateway answers `status`
    count: int = 1  # how many calls it applies to (0 = until cleared)
    status: int = 500
    seconds: float = 0.0  # "slow": stall this long before answering
    retry_after: int | None = None
    body: str = ""  # "body": answer `status` with exactly this body (a JSON of the wrong shape, say)


@dataclass
class SimulatorState:
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # action id -> its tenant
    # action id -> (when it finishes on its own, as what): to race a cancel
    finishes: dict[str, tuple[float, str]] = field(default_factory=dict)
    cancels: dict[str, float] = field(default_factory=dict)  # action id -> when an accepted cancel takes effect
    calls: list[Call] = field(default_factory=list)
    admitted: dict[str, deque[float]] = field(default_factory=dict)  # per app|tenant: arrivals the windows count
    fault: Fault | None = None


class DefenderSimulator(LoopbackService):
    def __init__(
        self,
        port: int = 0,
        windows: tuple[tuple[int, float], ...] = DEFAULT_WINDOWS,
        audience: str = PUBLIC_AUDIENCE,
        token_secret: str = tokens.DEFAULT_SECRET,
        home_tenant: str = HOME_TENANT,
        page_size: int = 10_000,
        api_windows: dict[str, tuple[tuple[int, float], ...]] | None = None,
        cancel_takes: float = 0.0,
    ) -> None:
        self.home_tenant = home_tenant
        self.page_size = page_size  # server-driven paging: at most this many per page, then @odata.nextLink
        self.api_windows = {k: tuple(sorted(v, key=lambda w: w[1])) for k, v in (api_windows or {}).items()}
        self.cancel_takes = cancel_takes  # an accepted cancel shows as Cancelled only this much later
        # told each list page served (1, 2, ...), under the lock: it may change `state`, not call methods
        self.after_list: Callable[[int], None] | None = None
        self._pages_served = 0
        self.tenants = {home_tenant}  # onboarded to Defender
        self.windows = tuple(sorted(windows, key=lambda w: w[1]))
        self.audience = audience
        self.token_secret = token_secret
        self.state = SimulatorState()
        self._lock = threading.Lock()
        self._server = LoopbackServer(self.handle, port)

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
        machine_id: str | None = None,
        finish_after: float | None = None,
        finish_as: str = "Succeeded",
    ) -> str:
        """An action; with `finish_after`, it ends as `finish_as` that many seconds from now unless a
        cancel took effect first."""
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
            "machineId": machine_id or uuid.uuid4().hex + uuid.uuid4().hex[:8],
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
            if finish_after is not None:
                self.state.finishes[action_id] = (time.time() + finish_after, finish_as)
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

    def calls(self, path_contains: str = "/cancel", tenant: str | None = None, api: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.state.calls
                if path_contains in c.path and tenant in (None, c.tenant) and api in (None, c.api)
            ]

    def status_of(self, action_id: str) -> str:
        with self._lock:
            self._settle(action_id)
            return str(self.state.actions[action_id]["status"])

    def reset(self) -> None:
        with self._lock:
            self.state = SimulatorState(
                actions=self.state.actions, owners=self.state.owners, finishes=self.state.finishes
            )

    # --- request handling ------------------------------------------------------------------
    def handle(self, request: Request) -> Response | None:
        if request.path.startswith("/_sim/"):
            return self._admin(request)
        call = Call(time.time(), request.method, request.path, request.headers.get("Authorization", ""), "")
        call.api = _api(request)
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
        throttled = self._check_rate(f"{call.api}|{call.app}|{call.tenant}", self.api_windows.get(call.api))
        if throttled:
            return throttled, None
        if call.api in ("list", "get") and not _may_read(claims):
            message = f"Missing application roles. API required roles: {', '.join(READ_ROLES)}"
            return _error(403, "Forbidden", message), None
        fault = self._take_fault()
        if fault and fault.mode not in ("slow", "acted"):  # a failing front end answers without acting
            return Response(0), fault
        cancel = _CANCEL.fullmatch(request.path)
        if cancel and request.method == "POST":
            return self._cancel(cancel.group(1), request.body, call.tenant), fault
        if call.api == "list":
            return self._list(request, call.tenant), fault
        action = _ACTION.fullmatch(request.path)
        if action and request.method == "GET":
            entity = self._find(action.group(1), call.tenant)
            if entity is None:
                return _error(404, "ResourceNotFound", f"Machine action {action.group(1)} was not found"), fault
            return Response(200, dict(entity)), fault
        return _error(404, "NotFound", "Resource not found"), fault

    def _list(self, request: Request, tenant: str) -> Response:
        """OData `$filter` (eq clauses on FILTER_FIELDS, joined by and/or, in parentheses), `$top`,
        `$skip`; server-driven pages of `page_size` with `@odata.nextLink`."""
        try:
            match = parse_filter(request.query.get("$filter", ""))
            top = _whole(request.query.get("$top"), 10_000)
            skip = _whole(request.query.get("$skip"), 0)
        except ValueError as exc:
            return _error(400, "InvalidRequest", f"Invalid OData query: {exc}")
        found = []
        for action_id, owner in self.state.owners.items():
            if owner == tenant:
                self._settle(action_id)
                entity = self.state.actions[action_id]
                if match(entity):
                    found.append(entity)
        found.sort(key=lambda e: (e["creationDateTimeUtc"], e["id"]))
        page = found[skip : skip + min(top, self.page_size)]
        self._pages_served += 1
        if self.after_list is not None:  # e.g. an action ends between two pages
            self.after_list(self._pages_served)
        body: dict[str, Any] = {"@odata.context": f"{PUBLIC_AUDIENCE}/api/$metadata#MachineActions",
                                "value": [dict(e) for e in page]}  # fmt: skip
        if len(page) < top and skip + len(page) < len(found):
            query = {"$skip": str(skip + len(page)), "$top": str(top - len(page))}
            if request.query.get("$filter"):
                query["$filter"] = request.query["$filter"]
            body["@odata.nextLink"] = f"{self.base_url}{_LIST}?{urlencode(query)}"
        return Response(200, body)

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
        if self.state.owners.get(action_id) != tenant:
            return None
        self._settle(action_id)
        return self.state.actions[action_id]

    def _settle(self, action_id: str) -> None:
        """Let time act: an accepted cancel or the action's own end, whichever came first."""
        entity = self.state.actions[action_id]
        if entity["status"] in FINAL_STATES:
            return
        now = time.time()
        ends = [(at, how) for at, how in (self.state.finishes.get(action_id, (math.inf, "")),) if at <= now]
        cancel_at = self.state.cancels.get(action_id, math.inf)
        if cancel_at <= now and (not ends or cancel_at <= ends[0][0]):
            entity.update(status="Cancelled", lastUpdateDateTimeUtc=_now_iso())
        elif ends:
            entity.update(status=ends[0][1], lastUpdateDateTimeUtc=_now_iso())

    def _check_rate(self, key: str, windows: tuple[tuple[int, float], ...] | None = None) -> Response | None:
        now = time.time()
        windows = windows or self.windows
        admitted = self.state.admitted.setdefault(key, deque())
        longest = windows[-1][1]
        while admitted and admitted[0] <= now - longest:
            admitted.popleft()
        for limit, seconds in windows:
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
        self._settle(entity["id"])
        if entity["status"] in FINAL_STATES:
            return _error(
                400, "BadRequest", f"Machine action {raw_id} is already {entity['status']} and cannot be canceled"
            )
        now = _now_iso()
        entity.update(
            lastUpdateDateTimeUtc=now,
            cancellationRequestor="cancel-machine-action-function",
            cancellationComment=payload["Comment"],
            cancellationDateTimeUtc=now,
        )
        self.state.cancels.setdefault(entity["id"], time.time() + self.cancel_takes)
        self._settle(entity["id"])
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
        if fault.mode == "body":
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            return Response(fault.status, raw=fault.body.encode(), headers=extra)
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


def _api(request: Request) -> str:
    if request.method == "POST" and _CANCEL.fullmatch(request.path):
        return "cancel"
    if request.method == "GET" and request.path == _LIST:
        return "list"
    if request.method == "GET" and _ACTION.fullmatch(request.path):
        return "get"
    return "other"


def _may_read(claims: dict[str, Any]) -> bool:
    """Reads need Machine.Read.All (or ReadWrite); tokens without a roles claim (the local identity
    endpoint's) are taken as granted."""
    roles = claims.get("roles")
    return roles is None or any(r in READ_ROLES for r in roles)


def _whole(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > 10_000:
        raise ValueError(f"{raw!r} is not a whole number up to 10000")
    return int(raw)


def parse_filter(raw: str) -> Any:
    """An OData `$filter` of `field eq 'value'` clauses: `and` between terms, `or` inside parentheses.
    Returns a predicate on an entity; ValueError for anything else."""
    terms = [t.strip() for t in re.split(r"\s+and\s+", raw.strip())] if raw.strip() else []
    groups: list[list[tuple[str, str]]] = []
    for term in terms:
        inner = term[1:-1] if term.startswith("(") and term.endswith(")") else term
        clauses = []
        for clause in re.split(r"\s+or\s+", inner):
            found = _CLAUSE.fullmatch(clause)
            if not found or found.group(1) not in FILTER_FIELDS:
                raise ValueError(f"unsupported clause {clause.strip()!r}")
            clauses.append((found.group(1), found.group(2)))
        groups.append(clauses)

    def match(entity: dict[str, Any]) -> bool:
        return all(any(str(entity.get(f, "")).lower() == v.lower() for f, v in group) for group in groups)

    return match


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
