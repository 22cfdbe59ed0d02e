"""The Azure clouds Defender runs in: per cloud its API root and token resource, Entra's authority,
the token-exchange audience, and the hosts that serve the API."""

from __future__ import annotations

from collections.abc import Mapping

# Per cloud: the API root, and the resource its tokens are for (CONTRACT.md). Public calls go to
# api.security.microsoft.com, the host Microsoft documents now; its tokens are still for
# api.securitycenter.microsoft.com (a token for another audience gets 403).
API_ROOTS: Mapping[str, str] = {
    "Public": "https://api.security.microsoft.com",
    "GCC": "https://api-gcc.securitycenter.microsoft.us",
    "GCCHigh": "https://api-gov.securitycenter.microsoft.us",
    "DoD": "https://api-gov.securitycenter.microsoft.us",
}
TOKEN_RESOURCES: Mapping[str, str] = {
    "Public": "https://api.securitycenter.microsoft.com",
    "GCC": "https://api-gcc.securitycenter.microsoft.us",
    "GCCHigh": "https://api-gov.securitycenter.microsoft.us",
    "DoD": "https://api-gov.securitycenter.microsoft.us",
}
CLOUDS = tuple(API_ROOTS)
# Per cloud: Entra's authority host, and the audience of the identity's token that the app
# registration's federated credential trusts. GCC tenants live in the commercial Entra; GCC High and
# DoD in Azure Government's ("Configure an application to trust a managed identity", Microsoft Entra
# Workload ID docs; cross-cloud exchange is not supported).
AUTHORITY_HOSTS: Mapping[str, str] = {
    "Public": "https://login.microsoftonline.com",
    "GCC": "https://login.microsoftonline.com",
    "GCCHigh": "https://login.microsoftonline.us",
    "DoD": "https://login.microsoftonline.us",
}
EXCHANGE_AUDIENCES: Mapping[str, str] = {
    "Public": "api://AzureADTokenExchange",
    "GCC": "api://AzureADTokenExchange",
    "GCCHigh": "api://AzureADTokenExchangeUSGov",
    "DoD": "api://AzureADTokenExchangeUSGov",
}

# Hosts that serve the Defender for Endpoint API (REFERENCE.md); anything else is refused so a
# mistyped or hostile setting cannot send our bearer token elsewhere.
KNOWN_DEFENDER_HOSTS = frozenset(
    {
        "api.securitycenter.microsoft.com",
        "api-us.securitycenter.microsoft.com",
        "api-eu.securitycenter.microsoft.com",
        "api-uk.securitycenter.microsoft.com",
        "api-au.securitycenter.microsoft.com",
        "api.security.microsoft.com",
        "us.api.security.microsoft.com",
        "eu.api.security.microsoft.com",
        "uk.api.security.microsoft.com",
        "au.api.security.microsoft.com",
        "swa.api.security.microsoft.com",
        "ina.api.security.microsoft.com",
        "aea.api.security.microsoft.com",
        "api-gcc.securitycenter.microsoft.us",
        "api-gov.securitycenter.microsoft.us",
    }
)
