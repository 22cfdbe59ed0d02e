"""Access tokens for the Defender API from the app's managed identity.

One `ManagedIdentityCredential` per process; its MSAL token cache serves repeated calls, so a
warm instance asks the identity endpoint again only when the token nears expiry.
"""

from __future__ import annotations

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
        self, scope: str, client_id: str | None = None, budget_seconds: float = 30.0, credential: Any = None
    ) -> None:
        self._scope = scope
        self._credential = credential or _managed_identity(client_id, budget_seconds)

    def token(self) -> str:
        try:
            return str(self._credential.get_token(self._scope).token)
        except AzureError as exc:  # ClientAuthenticationError, CredentialUnavailableError, transport
            if _timed_out(exc):
                raise TokenTimeout(
                    "Could not obtain an access token: the managed identity endpoint did not answer in time"
                ) from None
            # The SDK's message names the endpoint and status, never the token or identity header.
            raise TokenUnavailable(
                f"Could not obtain an access token from the managed identity: {redact(str(exc))}"
            ) from None


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


def _managed_identity(client_id: str | None, budget_seconds: float) -> Any:
    from azure.identity import ManagedIdentityCredential  # imported when first used: ~100 ms

    attempts = IDENTITY_RETRY_TOTAL + 1
    read_timeout = min(IDENTITY_READ_TIMEOUT, max(MIN_READ_TIMEOUT, (budget_seconds - 1) / attempts))
    return ManagedIdentityCredential(
        client_id=client_id,
        retry_total=IDENTITY_RETRY_TOTAL,
        retry_backoff_factor=IDENTITY_RETRY_BACKOFF,
        connection_timeout=min(IDENTITY_CONNECT_TIMEOUT, read_timeout),
        read_timeout=read_timeout,
    )
