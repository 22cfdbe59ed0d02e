"""The Defender for Endpoint API client: one pooled session, timeouts, bounded retries.

Retries are ours, not the HTTP adapter's, because every attempt reaches Defender and so must pass
the shared rate limiter first (`before_attempt`). We retry only what cannot have cancelled anything
twice: a connection never established, and 502/503/504 answers. A read timeout or a connection lost
after sending is not retried: Defender may already have acted (the POST is not idempotent to the
caller, a second cancel answers 400).
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from shared.errors import QuotaExceeded, UpstreamTimeout, UpstreamUnavailable, error_body
from shared.token import TokenProvider

CONNECT_TIMEOUT = 3.05
MAX_BODY_BYTES = 1024 * 1024
POOL_MAXSIZE = 16
USER_AGENT = "cancel-machine-action-function/1.0"
REQUEST_ID_HEADERS = ("request-id", "x-ms-request-id", "client-request-id")


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried, how often, and how long to back off (full jitter)."""

    max_attempts: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    statuses: frozenset[int] = frozenset({502, 503, 504})

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


class DefenderClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        timeout_seconds: float,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._budget = timeout_seconds
        self._retry = retry or RetryPolicy()
        self._session = session or _pooled_session()

    def cancel(
        self,
        action_id: str,
        comment: str,
        before_attempt: Callable[[], None] | None = None,
    ) -> UpstreamReply:
        """POST /api/machineactions/{id}/cancel; `action_id` must already be a validated GUID."""
        url = f"{self._base_url}/api/machineactions/{action_id}/cancel"
        payload = json.dumps({"Comment": comment})
        deadline = time.monotonic() + self._budget
        attempt = 0
        reply: UpstreamReply | None = None
        while True:
            attempt += 1
            if before_attempt is not None:
                try:
                    before_attempt()
                except QuotaExceeded:
                    if attempt == 1:
                        raise
                    if reply is None:  # no quota left to retry a failed connection
                        raise UpstreamUnavailable("Could not connect to the Defender API") from None
                    return reply  # no quota left for a retry: Defender's last answer stands
            reply = self._attempt(url, payload, deadline, attempt)
            if reply is not None and reply.status not in self._retry.statuses:
                return reply
            if attempt >= self._retry.max_attempts:
                if reply is None:
                    raise UpstreamUnavailable("Could not connect to the Defender API")
                return reply
            pause = self._retry.backoff(attempt, reply.retry_after if reply else None)
            if time.monotonic() + pause >= deadline:
                if reply is None:
                    raise UpstreamUnavailable("Could not connect to the Defender API within the time budget")
                return reply
            time.sleep(pause)

    def _attempt(self, url: str, payload: str, deadline: float, attempt: int) -> UpstreamReply | None:
        """One POST; None when the connection was never established (safe to retry)."""
        headers = {"Authorization": f"Bearer {self._tokens.token()}", "Content-Type": "application/json"}
        remaining = deadline - time.monotonic()  # after the token: its fetch spends the same budget
        if remaining <= 0:
            raise UpstreamTimeout("The Defender API did not answer within the time budget")
        try:
            with self._session.post(
                url, data=payload, headers=headers, timeout=(min(CONNECT_TIMEOUT, remaining), remaining), stream=True
            ) as response:
                raw = _read_capped(response, deadline)
                return _reply(response.status_code, raw, response.headers, attempt)
        except requests.ConnectionError as exc:
            if _never_connected(exc):
                if isinstance(exc, requests.ConnectTimeout) and time.monotonic() >= deadline:
                    raise UpstreamTimeout("The Defender API did not accept a connection in time") from None
                return None
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
    except ValueError:
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
    return max(1, math.ceil(seconds))
