"""The Defender for Endpoint API client: the retry policy, and one pooled transport that does the I/O.

Every attempt reaches Defender, so it must pass the shared rate limiter first, and arrive close to
the slot the limiter logged for it (invariant 1 of shared.ratelimit). So each attempt gets its
token and an open connection *before* it asks for a slot, checks right before sending that its
slot is still good, and only then starts the time budget for Defender's answer.

We retry only what Defender cannot have acted on: a connection never made, and Defender's own 503
(it refused before doing anything). A timeout, a connection lost after sending, a 500 or a
gateway's 502/504 may come after Defender cancelled the action; retrying would hear 400 "already
cancelled" and hide what happened, so the caller gets that attempt's answer (a POST is not
idempotent; urllib3 does not retry it either).
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from shared.errors import OutcomeUnknown, QuotaExceeded, UpstreamTimeout, UpstreamUnavailable, error_body
from shared.ratelimit import Permit
from shared.token import TokenProvider
from shared.validation import GUID

CONNECT_TIMEOUT = 3.05
MAX_BODY_BYTES = 1024 * 1024
POOL_MAXSIZE = 16
USER_AGENT = "cancel-machine-action-function/1.0"
REQUEST_ID_HEADERS = ("request-id", "x-ms-request-id", "client-request-id")
# The longest Retry-After we honour: Defender's longest window is an hour; a larger value is a
# broken header, and held as an hour it still stops every instance.
MAX_RETRY_AFTER_SECONDS = 3600
DEFAULT_RETRY_AFTER_SECONDS = 60  # a 429 without Retry-After holds the quota this long
# Defender's MachineAction.status values (its Swagger and REFERENCE.md).
ACTION_STATUSES = frozenset({"Pending", "InProgress", "Succeeded", "Failed", "TimeOut", "Cancelled"})


# Defender's answers given without acting: its throttle (held off, not retried: see RateLimiter.throttled)
# and 503 (retried). Every other answer may come after the cancel took effect.
REFUSED_BEFORE_ACTING = frozenset({429, 503})


class NotSent(Exception):
    """No connection could be made: nothing reached Defender, so the attempt may be retried."""


class InvalidUpstreamResponse(UpstreamUnavailable):
    """Defender answered 200 with a body that is not the shape its API documents: an error naming
    what was wrong, never read as an empty answer."""

    code = "InvalidUpstreamResponse"


@dataclass(frozen=True)
class RetryPolicy:
    """Which answers are retried (only those Defender gave without acting), how often, and the
    back-off between attempts (full jitter, or Defender's Retry-After)."""

    max_attempts: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    refused_statuses: frozenset[int] = REFUSED_BEFORE_ACTING - {429}

    def retries(self, status: int) -> bool:
        return status in self.refused_statuses

    def backoff(self, attempt: int, retry_after: int | None = None) -> float:
        if retry_after is not None:
            return float(retry_after)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class UpstreamReply:
    """What Defender answered: status, parsed JSON body, and the headers a caller needs."""

    status: int
    body: Any
    retry_after: int | None
    request_id: str | None
    attempts: int
    waited_ms: float = 0.0  # for slots of the quota, over every attempt
    upstream_ms: float = 0.0  # from the first send to the answer


class QuotaGate(Protocol):
    """The shared rate limiter, as a sender sees it (shared.ratelimit.RateLimiter)."""

    def acquire(self, max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Permit:
        """Return when a call may be sent now, filling at most `share` of each window; raise
        QuotaExceeded or StateStoreUnavailable."""

    def on_time(self, permit: Permit) -> bool:
        """Whether a send may still leave on `permit`."""

    def throttled(self, retry_after: int) -> None:
        """Defender answered 429 anyway: hold every instance off this API for `retry_after` seconds."""


class Transport(Protocol):
    """The HTTP I/O: a connection opened ahead of time, then one POST."""

    def warm(self, url: str) -> None:
        """Have an open connection to `url`'s host ready; raise NotSent when none can be made."""

    def post(
        self, url: str, payload: str, headers: Mapping[str, str], deadline: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Status, body and headers; raises NotSent, UpstreamTimeout or UpstreamUnavailable."""

    def get(self, url: str, headers: Mapping[str, str], deadline: float) -> tuple[int, bytes, Mapping[str, str]]:
        """The same for a GET (a read: safe to lose, never OutcomeUnknown)."""


class DefenderClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        timeout_seconds: float,
        retry: RetryPolicy | None = None,
        transport: Transport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._budget = timeout_seconds
        self._retry = retry or RetryPolicy()
        self._transport = transport or RequestsTransport()
        self._monotonic = monotonic
        self._sleep = sleep

    def cancel(
        self,
        action_id: str,
        comment: str,
        gate: QuotaGate | None = None,
        max_wait: float = 0.0,
        on_send: Callable[[], None] | None = None,
    ) -> UpstreamReply:
        """POST /api/machineactions/{id}/cancel; `action_id` must already be a validated GUID.

        `max_wait` bounds the first attempt's wait for a slot (QuotaExceeded past it); retries take
        only a slot free now. `on_send` is told of each request about to leave."""
        url = f"{self._base_url}/api/machineactions/{action_id}/cancel"
        return self._send(url, json.dumps({"Comment": comment}), gate, max_wait, on_send)

    def get_action(
        self, action_id: str, gate: QuotaGate | None = None, max_wait: float = 0.0, share: float = 1.0
    ) -> UpstreamReply:
        """GET /api/machineactions/{id} (needs Machine.Read.All); on the get quota, filling at most
        `share` of it. A 200 is a MachineAction of that id with a known status
        (InvalidUpstreamResponse otherwise)."""
        reply = self._send(f"{self._base_url}/api/machineactions/{action_id}", None, gate, max_wait, share=share)
        if reply.status == 200:
            problem = action_problem(reply.body)
            if problem is None and str(reply.body["id"]).lower() != action_id.lower():
                problem = f"it describes action {reply.body['id']!r}, not {action_id!r}"
            if problem:
                raise InvalidUpstreamResponse(f"Defender's read of {action_id} is not a MachineAction: {problem}")
        return reply

    def list_page(self, url: str, gate: QuotaGate | None = None, max_wait: float = 0.0) -> UpstreamReply:
        """One page of GET /api/machineactions: the first (`?$filter=...`) or an `@odata.nextLink`,
        which must point at our own API root: the bearer token never goes anywhere else. A 200 is
        `{"value": [MachineAction...]}` with an optional string `@odata.nextLink`
        (InvalidUpstreamResponse otherwise)."""
        if not url.startswith(self._base_url + "/api/machineactions?"):
            raise UpstreamUnavailable("Defender's next page link points outside the Defender API root")
        reply = self._send(url, None, gate, max_wait)
        if reply.status == 200:
            problem = page_problem(reply.body)
            if problem:
                raise InvalidUpstreamResponse(f"Defender's list of machine actions is not a page of them: {problem}")
        return reply

    def list_url(self, odata_filter: str) -> str:
        return f"{self._base_url}/api/machineactions?{urlencode({'$filter': odata_filter})}"

    def _send(
        self,
        url: str,
        payload: str | None,
        gate: QuotaGate | None,
        max_wait: float,
        on_send: Callable[[], None] | None = None,
        share: float = 1.0,
    ) -> UpstreamReply:
        """One request under the policy: a POST when there is a payload, else a GET."""
        reply: UpstreamReply | None = None
        deadline: float | None = None  # set by the first attempt that reaches for the wire
        waited, first_send = 0.0, None
        for attempt in range(1, self._retry.max_attempts + 1):
            if deadline is not None:
                pause = self._retry.backoff(attempt - 1, reply.retry_after if reply else None)
                if self._monotonic() + pause >= deadline:
                    break
                self._sleep(pause)
            try:
                token = self._tokens.token()  # the slow parts before the slot: token, then connection
                self._transport.warm(url)
                admit_start = self._monotonic()
                try:
                    self._admit(gate, max_wait if attempt == 1 else 0.0, share)
                finally:
                    waited += self._monotonic() - admit_start
                if on_send is not None:
                    on_send()
                first_send = first_send or self._monotonic()
                deadline = deadline or self._monotonic() + self._budget  # the budget starts at the send
                status, raw, headers = (
                    self._post(url, payload, token, deadline)
                    if payload is not None
                    else self._transport.get(url, _headers(token, json_body=False), deadline)
                )
            except NotSent:
                deadline = deadline or self._monotonic() + self._budget
                continue
            except QuotaExceeded:
                if attempt == 1:
                    raise
                break  # no quota left for a retry: the last answer stands
            reply = _reply(status, raw, headers, attempt)
            if status == 429 and gate is not None:  # every instance holds off this API, whichever it is
                gate.throttled(reply.retry_after or DEFAULT_RETRY_AFTER_SECONDS)
            if not self._retry.retries(status):
                break
        if reply is None:
            raise UpstreamUnavailable("Could not connect to the Defender API")
        upstream = self._monotonic() - first_send if first_send is not None else 0.0
        return replace(reply, waited_ms=waited * 1000, upstream_ms=upstream * 1000)

    def _post(self, url: str, payload: str, token: str, deadline: float) -> tuple[int, bytes, Mapping[str, str]]:
        """The send. A failure after the request may have left is OutcomeUnknown: never retried."""
        try:
            return self._transport.post(url, payload, _headers(token), deadline)
        except (UpstreamTimeout, UpstreamUnavailable) as exc:
            raise OutcomeUnknown(exc) from None

    @staticmethod
    def _admit(gate: QuotaGate | None, max_wait: float, share: float) -> None:
        """Return when a slot to send on is good now; a stale one is asked again, within the
        limiter's bound on entries (StateStoreUnavailable past it)."""
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


class RequestsTransport:
    """A pooled `requests` session: no redirects (a 307/308 would re-POST without the limiter), no
    adapter retries (ours are the policy's), no proxy or .netrc from the environment."""

    def __init__(self, session: requests.Session | None = None) -> None:
        self._session = session or _pooled_session()

    def warm(self, url: str) -> None:
        adapter = self._session.get_adapter(url)
        if not isinstance(adapter, HTTPAdapter):
            return
        try:
            request = requests.Request("POST", url).prepare()
            pool = adapter.get_connection_with_tls_context(request, verify=True)
            if not isinstance(pool, HTTPConnectionPool):
                return
            # urllib3 has no public "connect ahead"; its pool hands the same connection to the POST.
            conn = pool._get_conn()
            try:
                if not conn.is_connected:
                    conn.timeout = CONNECT_TIMEOUT
                    conn.connect()
            finally:
                pool._put_conn(conn)
        except (OSError, HTTPError, ValueError) as exc:
            raise NotSent(type(exc).__name__) from None

    def post(
        self, url: str, payload: str, headers: Mapping[str, str], deadline: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        return self._request("POST", url, payload, headers, deadline)

    def get(self, url: str, headers: Mapping[str, str], deadline: float) -> tuple[int, bytes, Mapping[str, str]]:
        return self._request("GET", url, None, headers, deadline)

    def _request(
        self, method: str, url: str, payload: str | None, headers: Mapping[str, str], deadline: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        remaining = max(0.001, deadline - time.monotonic())
        try:
            with self._session.request(
                method,
                url,
                data=payload,
                headers=dict(headers),
                timeout=(min(CONNECT_TIMEOUT, remaining), remaining),
                stream=True,
                allow_redirects=False,
            ) as response:
                return response.status_code, _read_capped(response, deadline), response.headers
        except requests.ConnectionError as exc:
            if _never_connected(exc):
                raise NotSent(type(exc).__name__) from None
            if isinstance(exc, requests.Timeout):
                raise UpstreamTimeout("The Defender API did not answer within the time budget") from None
            raise UpstreamUnavailable("The connection to the Defender API failed mid-request") from None
        except requests.Timeout:
            raise UpstreamTimeout("The Defender API did not answer within the time budget") from None
        except requests.RequestException as exc:
            raise UpstreamUnavailable(f"The Defender API call failed: {type(exc).__name__}") from None


def _pooled_session() -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_MAXSIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
    session.trust_env = False  # no proxy or .netrc surprises for a call that carries a bearer token
    return session


def _never_connected(exc: requests.ConnectionError) -> bool:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _read_capped(response: requests.Response, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise UpstreamUnavailable(f"The Defender API answered with a body over {MAX_BODY_BYTES} bytes")
        if time.monotonic() > deadline:
            raise UpstreamTimeout("The Defender API did not finish its answer within the time budget")
        chunks.append(chunk)
    return b"".join(chunks)


def _reply(status: int, raw: bytes, headers: Mapping[str, str], attempts: int) -> UpstreamReply:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, (dict, list)):
        body = error_body("InvalidUpstreamResponse", f"The Defender API answered {status} with a body that is not JSON")
    request_id = next((headers[h] for h in REQUEST_ID_HEADERS if h in headers), None)
    return UpstreamReply(status, body, parse_retry_after(headers.get("Retry-After")), request_id, attempts)


def parse_retry_after(value: str | None) -> int | None:
    """Whole seconds (>= 1) from `Retry-After` given as seconds or as an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(seconds)))


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
