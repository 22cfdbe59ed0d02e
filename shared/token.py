"""Access tokens for the Defender API from the app's managed identity.

One `ManagedIdentityCredential` per process; its MSAL token cache serves repeated calls, so a
warm instance asks the identity endpoint again only when the token nears expiry.
"""

from __future__ import annotations

from typing import Any

from azure.core.exceptions import AzureError

from shared.errors import TokenUnavailable

# The identity endpoint is local to the host; fail fast rather than spend the request's budget.
IDENTITY_RETRY_TOTAL = 2
IDENTITY_RETRY_BACKOFF = 0.2
IDENTITY_CONNECT_TIMEOUT = 2.0
IDENTITY_READ_TIMEOUT = 5.0


class TokenProvider:
    """Bearer tokens for one scope from a managed identity (system- or user-assigned)."""

    def __init__(self, scope: str, client_id: str | None = None, credential: Any = None) -> None:
        self._scope = scope
        self._credential = credential or _managed_identity(client_id)

    def token(self) -> str:
        try:
            return str(self._credential.get_token(self._scope).token)
        except AzureError as exc:  # ClientAuthenticationError, CredentialUnavailableError, transport
            # The SDK's message names the endpoint and status, never the token or identity header.
            raise TokenUnavailable(f"Could not obtain an access token from the managed identity: {exc}") from exc


def _managed_identity(client_id: str | None) -> Any:
    from azure.identity import ManagedIdentityCredential  # imported when first used: ~100 ms

    return ManagedIdentityCredential(
        client_id=client_id,
        retry_total=IDENTITY_RETRY_TOTAL,
        retry_backoff_factor=IDENTITY_RETRY_BACKOFF,
        connection_timeout=IDENTITY_CONNECT_TIMEOUT,
        read_timeout=IDENTITY_READ_TIMEOUT,
    )
