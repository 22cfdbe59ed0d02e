"""The HTTP I/O to Defender: one pooled `requests` session, a connection opened ahead of the slot,
then one request. The only module that imports requests or urllib3.

No redirects (a 307/308 would re-POST without the limiter), no adapter retries (the client's
RetryPolicy decides), no proxy or .netrc from the environment, bodies capped at 1 MiB.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

from shared.errors import UpstreamTimeout, UpstreamUnavailable

CONNECT_TIMEOUT = 3.05
MAX_BODY_BYTES = 1024 * 1024
POOL_MAXSIZE = 16
USER_AGENT = "cancel-machine-action-function/1.0"


class NotSent(Exception):
    """No connection could be made: nothing reached Defender, so the attempt may be retried."""


class Transport(Protocol):
    """The HTTP I/O: a connection opened ahead of time, then one POST or GET."""

    def warm(self, url: str) -> None:
        """Have an open connection to `url`'s host ready; raise NotSent when none can be made."""

    def post(
        self, url: str, payload: str, headers: Mapping[str, str], deadline: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Status, body and headers; raises NotSent, UpstreamTimeout or UpstreamUnavailable."""

    def get(self, url: str, headers: Mapping[str, str], deadline: float) -> tuple[int, bytes, Mapping[str, str]]:
        """The same for a GET (a read: safe to lose, never OutcomeUnknown)."""


class RequestsTransport:
    """A pooled `requests` session (one for every tenant: Defender is one host)."""

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
