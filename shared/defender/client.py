"""The Defender for Endpoint API client: each API on its own quota, the retry policy per attempt,
and Defender's answers checked against the shapes its API documents.

Every attempt reaches Defender, so it must pass that API's shared quota first, and arrive close to
the slot the limiter logged for it (invariant 1 of shared.ratelimit.limiter). So each attempt gets
its token and an open connection *before* it asks for a slot, checks right before sending that its
slot is still good, and only then starts the time budget for Defender's answer. Any 429 from
Defender, whichever API answered it, holds that API's quota for every instance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlencode

from shared.defender.retry import DEFAULT_RETRY_AFTER_SECONDS, RetryPolicy, parse_retry_after
from shared.defender.token import TokenProvider
from shared.defender.transport import NotSent, RequestsTransport, Transport
from shared.errors import OutcomeUnknown, QuotaExceeded, UpstreamTimeout, UpstreamUnavailable, error_body
from shared.formats import ACTION_STATUSES, GUID, Api
from shared.ratelimit.limiter import Permit

REQUEST_ID_HEADERS = ("request-id", "x-ms-request-id", "client-request-id")


class InvalidUpstreamResponse(UpstreamUnavailable):
    """Defender answered 200 with a body that is not the shape its API documents: an error naming
    what was wrong, never read as an empty answer."""

    code = "InvalidUpstreamResponse"


@dataclass(frozen=True)
class UpstreamReply:
    """What Defender answered: status, parsed JSON body, and the headers a caller needs."""

    status: int
    body: Any
    retry_after: int | None
    request_id: str | None
    attempts: int
    _: KW_ONLY
    waited_ms: float = 0.0  # for slots of the quota, over every attempt
    upstream_ms: float = 0.0  # from the first send to the answer


class QuotaGate(Protocol):
    """One API's shared quota, as a sender sees it (shared.ratelimit.limiter.RateLimiter)."""

    def acquire(self, max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Permit:
        """Return when a call may be sent now, filling at most `share` of each window; raise
        QuotaExceeded or StateStoreUnavailable."""

    def on_time(self, permit: Permit) -> bool:
        """Whether a send may still leave on `permit`."""

    def throttled(self, retry_after: int) -> None:
        """Defender answered 429 anyway: hold every instance off this API for `retry_after` seconds."""


class DefenderClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        timeout_seconds: float,
        *,
        quotas: Mapping[Api, QuotaGate] | None = None,
        retry: RetryPolicy | None = None,
        transport: Transport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`quotas`: the shared quota of each API (an API without one is not limited: tests, tools)."""
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._budget = timeout_seconds
        self._quotas = dict(quotas or {})
        self._retry = retry or RetryPolicy()
        self._transport = transport or RequestsTransport()
        self._monotonic = monotonic
        self._sleep = sleep

    def cancel(
        self, action_id: str, comment: str, *, max_wait: float = 0.0, on_send: Callable[[], None] | None = None
    ) -> UpstreamReply:
        """POST /api/machineactions/{id}/cancel on the cancel quota; `action_id` must already be a
        validated GUID. `max_wait` bounds the first attempt's wait for a slot (QuotaExceeded past
        it); retries take only a slot free now. `on_send` is told of each request about to leave."""
        url = f"{self._base_url}/api/machineactions/{action_id}/cancel"
        return self._send(Api.CANCEL, url, json.dumps({"Comment": comment}), max_wait, on_send=on_send)

    def get_action(self, action_id: str, *, max_wait: float = 0.0, share: float = 1.0) -> UpstreamReply:
        """GET /api/machineactions/{id} (needs Machine.Read.All) on the get quota, filling at most
        `share` of it. A 200 is a MachineAction of that id with a known status
        (InvalidUpstreamResponse otherwise)."""
        reply = self._send(Api.GET, f"{self._base_url}/api/machineactions/{action_id}", None, max_wait, share=share)
        if reply.status == 200:
            problem = action_problem(reply.body)
            if problem is None and str(reply.body["id"]).lower() != action_id.lower():
                problem = f"it describes action {reply.body['id']!r}, not {action_id!r}"
            if problem:
                raise InvalidUpstreamResponse(f"Defender's read of {action_id} is not a MachineAction: {problem}")
        return reply

    def list_page(self, url: str, *, max_wait: float = 0.0) -> UpstreamReply:
        """One page of GET /api/machineactions on the list quota: the first (`?$filter=...`) or an
        `@odata.nextLink`, which must point at our own API root: the bearer token never goes
        anywhere else. A 200 is `{"value": [MachineAction...]}` with an optional string
        `@odata.nextLink` (InvalidUpstreamResponse otherwise)."""
        if not url.startswith(self._base_url + "/api/machineactions?"):
            raise UpstreamUnavailable("Defender's next page link points outside the Defender API root")
        reply = self._send(Api.LIST, url, None, max_wait)
        if reply.status == 200:
            problem = page_problem(reply.body)
            if problem:
                raise InvalidUpstreamResponse(f"Defender's list of machine actions is not a page of them: {problem}")
        return reply

    def list_url(self, odata_filter: str) -> str:
        return f"{self._base_url}/api/machineactions?{urlencode({'$filter': odata_filter})}"

    def _send(
        self,
        api: Api,
        url: str,
        payload: str | None,
        max_wait: float,
        *,
        on_send: Callable[[], None] | None = None,
        share: float = 1.0,
    ) -> UpstreamReply:
        """One request under the retry policy: a POST when there is a payload, else a GET."""
        gate = self._quotas.get(api)
        reply: UpstreamReply | None = None
        deadline = 0.0  # set by the first attempt that reaches for the wire
        waited, first_send = 0.0, None
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            try:
                token = self._tokens.token()  # the slow parts before the slot: token, then connection
                self._transport.warm(url)
                admit_start = self._monotonic()
                try:
                    _admit(gate, max_wait if attempt == 1 else 0.0, share)
                finally:
                    waited += self._monotonic() - admit_start
                if on_send is not None:
                    on_send()
                first_send = first_send or self._monotonic()
                deadline = deadline or self._monotonic() + self._budget  # the budget starts at the send
                reply = self._attempt(url, payload, token, deadline, attempt)
                status = reply.status
            except NotSent:
                deadline = deadline or self._monotonic() + self._budget
            except QuotaExceeded:
                if attempt == 1:
                    raise
                break  # no quota left for a retry: the last answer stands
            if status == 429 and gate is not None:  # every instance holds off this API
                gate.throttled(reply.retry_after if reply and reply.retry_after else DEFAULT_RETRY_AFTER_SECONDS)
            verdict = self._retry.increment(
                attempt, status, reply.retry_after if reply else None, deadline - self._monotonic()
            )
            if verdict.stop is not None:
                break
            self._sleep(verdict.wait)
        if reply is None:
            raise UpstreamUnavailable("Could not connect to the Defender API")
        upstream = self._monotonic() - first_send if first_send is not None else 0.0
        return replace(reply, waited_ms=waited * 1000, upstream_ms=upstream * 1000)

    def _attempt(self, url: str, payload: str | None, token: str, deadline: float, attempt: int) -> UpstreamReply:
        """The send. A POST that fails after the request may have left is OutcomeUnknown: never retried."""
        if payload is None:
            status, raw, headers = self._transport.get(url, _headers(token, json_body=False), deadline)
        else:
            try:
                status, raw, headers = self._transport.post(url, payload, _headers(token), deadline)
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                raise OutcomeUnknown(exc) from None
        return _reply(status, raw, headers, attempt)


def _admit(gate: QuotaGate | None, max_wait: float, share: float) -> None:
    """Return when a slot to send on is good now; a stale one is asked again, within the limiter's
    bound on entries (StateStoreUnavailable past it)."""
    if gate is None:
        return
    permit = gate.acquire(max_wait, share=share)
    while not gate.on_time(permit):
        permit = gate.acquire(0.0, spent=permit.entries, share=share)


def _headers(token: str, json_body: bool = True) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def _reply(status: int, raw: bytes, headers: Mapping[str, str], attempts: int) -> UpstreamReply:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, (dict, list)):
        body = error_body("InvalidUpstreamResponse", f"The Defender API answered {status} with a body that is not JSON")
    request_id = next((headers[h] for h in REQUEST_ID_HEADERS if h in headers), None)
    return UpstreamReply(status, body, parse_retry_after(headers.get("Retry-After")), request_id, attempts)


def action_problem(body: Any) -> str | None:
    """What makes `body` not a MachineAction we can rely on (a GUID id and a known status), or None."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    if not isinstance(body.get("id"), str) or not GUID.fullmatch(body["id"]):
        return f"its id is {body.get('id')!r}, not a GUID"
    if body.get("status") not in ACTION_STATUSES:
        return f"its status is {body.get('status')!r}, not one of {', '.join(sorted(ACTION_STATUSES))}"
    return None


def page_problem(body: Any) -> str | None:
    """What makes `body` not a page of MachineActions, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("value"), list):
        return "it has no 'value' list"
    link = body.get("@odata.nextLink")
    if link is not None and not isinstance(link, str):
        return "its '@odata.nextLink' is not a string"
    for position, entry in enumerate(body["value"]):
        problem = action_problem(entry)
        if problem:
            return f"entry {position}: {problem}"
    return None


def error_message(body: Any) -> str:
    """The message of Defender's error shape, whatever the body's shape ('' when it has none)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")
    return error if isinstance(error, str) else ""
