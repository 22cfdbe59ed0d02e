"""Access tokens for the Defender API: from the app's managed identity, or, for a customer tenant,
from the multi-tenant app registration that trusts that identity.

One `ManagedIdentityCredential` per process; its MSAL token cache serves repeated calls, so a
warm instance asks the identity endpoint again only when the token nears expiry. A customer tenant's
token comes from a `ClientAssertionCredential` (one per tenant, each with its own cache) whose
assertion is the identity's token for the exchange audience: Microsoft's documented pattern for
"an application that trusts a managed identity" (Entra Workload ID docs; azure-identity's
ClientAssertionCredential calls the assertion function only when it needs a new token).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import AzureError

from shared.errors import TokenUnavailable, UpstreamTimeout
from shared.redaction import redact

# The identity endpoint is local to the host; fail fast rather than spend the request's budget:
# all attempts together fit in the cancel's time budget.
IDENTITY_RETRY_TOTAL = 2
IDENTITY_RETRY_BACKOFF = 0.2
IDENTITY_CONNECT_TIMEOUT = 2.0
IDENTITY_READ_TIMEOUT = 5.0
MIN_READ_TIMEOUT = 0.5


class TokenTimeout(UpstreamTimeout):
    code = "TokenUnavailable"


class TokenProvider:
    """Bearer tokens for one scope from a managed identity (system- or user-assigned)."""

    def __init__(
        self,
        scope: str,
        *,
        client_id: str | None = None,
        budget_seconds: float = 30.0,
        credential: Any = None,
        source: str = "the managed identity",
    ) -> None:
        self._scope = scope
        self._credential = credential or managed_identity(client_id, budget_seconds)
        self._source = source
        # azure-identity does not serialise a cold cache: threads arriving together would each ask
        # the endpoint. One at a time, the rest find the cached token (a cache hit takes microseconds).
        self._lock = threading.Lock()

    def token(self) -> str:
        try:
            with self._lock:
                return str(self._credential.get_token(self._scope).token)
        except AzureError as exc:  # ClientAuthenticationError, CredentialUnavailableError, transport
            if _timed_out(exc):
                raise TokenTimeout(
                    f"Could not obtain an access token from {self._source}: the endpoint did not answer in time"
                ) from None
            # The SDK's message names the endpoint and status (and Entra's AADSTS code), never a token.
            message = f"Could not obtain an access token from {self._source}: {_reason(exc)}"
            raise TokenUnavailable(message) from None


# Entra's answer leads with its code and one sentence ("AADSTS700213: No matching federated identity
# record found for presented assertion subject '...'."), then trace ids and the raw body.
_ENTRA_REASON = re.compile(r"AADSTS\d+:.*?(?= Trace ID:|\r|\n|$)")


def _reason(exc: AzureError) -> str:
    """Entra's code and sentence when there is one, else the SDK's message (endpoint and status)."""
    text = str(exc)
    entra = _ENTRA_REASON.search(text)
    return redact(entra.group(0) if entra else text)


def _timed_out(exc: BaseException) -> bool:
    from azure.core.exceptions import ServiceRequestTimeoutError, ServiceResponseTimeoutError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ServiceRequestTimeoutError, ServiceResponseTimeoutError, TimeoutError)):
            return True
        if "timed out" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transport_options(budget_seconds: float) -> dict[str, Any]:
    attempts = IDENTITY_RETRY_TOTAL + 1
    read_timeout = min(IDENTITY_READ_TIMEOUT, max(MIN_READ_TIMEOUT, (budget_seconds - 1) / attempts))
    return {
        "retry_total": IDENTITY_RETRY_TOTAL,
        "retry_backoff_factor": IDENTITY_RETRY_BACKOFF,
        "connection_timeout": min(IDENTITY_CONNECT_TIMEOUT, read_timeout),
        "read_timeout": read_timeout,
    }


def managed_identity(client_id: str | None, budget_seconds: float) -> Any:
    from azure.identity import ManagedIdentityCredential  # imported when first used: ~100 ms

    return ManagedIdentityCredential(client_id=client_id, **_transport_options(budget_seconds))


def identity_assertion(identity: Any, exchange_audience: str) -> Callable[[], str]:
    """The identity's token for the exchange audience: the assertion the app registration's
    federated credential accepts (the identity's own cache serves it while it is fresh)."""
    scope = exchange_audience.rstrip("/") + "/.default"
    lock = threading.Lock()

    def assertion() -> str:
        with lock:
            return str(identity.get_token(scope).token)

    return assertion


def tenant_credential(
    tenant_id: str, app_client_id: str, assertion: Callable[[], str], authority: str, budget_seconds: float
) -> Any:
    """The app registration's credential in a customer tenant, proven by the identity's assertion."""
    from azure.identity import ClientAssertionCredential

    return ClientAssertionCredential(
        tenant_id, app_client_id, assertion, authority=authority, **_transport_options(budget_seconds)
    )
