"""Caller identity behind App Service Authentication: only ALLOWED_CALLERS may call.

With authentication on, the platform validates the caller's Entra token, strips any forged
`X-MS-CLIENT-PRINCIPAL*` headers and sets its own (settings refuse ALLOWED_CALLERS otherwise).
`X-MS-CLIENT-PRINCIPAL` is base64 JSON with the token's claims; a caller is allowed when its app id
(`appid`/`azp`) or object id (`oid`) is listed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping

from shared.errors import AppError
from shared.tenants import CallerPolicy, Tenant, TenantDirectory

PRINCIPAL_HEADER = "X-MS-CLIENT-PRINCIPAL"
PRINCIPAL_ID_HEADER = "X-MS-CLIENT-PRINCIPAL-ID"
OBJECT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
ID_CLAIMS = frozenset({"appid", "azp", "oid", OBJECT_ID_CLAIM})


class CallerForbidden(AppError):
    status = 403
    code = "Forbidden"


def caller_ids(headers: Mapping[str, str]) -> set[str]:
    """The app and object ids the platform vouches for (lower case); empty when none."""
    ids = set()
    principal_id = headers.get(PRINCIPAL_ID_HEADER)
    if principal_id:
        ids.add(principal_id.strip().lower())
    raw = headers.get(PRINCIPAL_HEADER)
    if raw:
        try:
            principal = json.loads(base64.b64decode(raw, validate=False))
            claims = principal.get("claims", []) if isinstance(principal, dict) else []
        except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
            claims = []
        for claim in claims if isinstance(claims, list) else []:
            if isinstance(claim, dict) and claim.get("typ") in ID_CLAIMS and isinstance(claim.get("val"), str):
                ids.add(claim["val"].strip().lower())
    return ids


def check_caller(headers: Mapping[str, str], allowed: frozenset[str]) -> None:
    """Raise CallerForbidden unless `allowed` is empty (keys only) or names this caller."""
    if allowed and not caller_ids(headers) & allowed:
        raise CallerForbidden("The caller is not in ALLOWED_CALLERS")


def caller_scope(headers: Mapping[str, str], allowed: frozenset[str]) -> str:
    """Whose idempotency keys these are: the caller's ids where the platform vouches for them
    (ALLOWED_CALLERS needs it), else every function-key holder shares one scope."""
    if allowed:
        return "principal:" + ",".join(sorted(caller_ids(headers)))
    return "function-key"


def caller_tenant(
    headers: Mapping[str, str], policy: CallerPolicy, tenants: TenantDirectory, ref: str | None
) -> Tenant:
    """The tenant a request acts in (None: the home tenant): 403 for a caller not allowed at all or
    not allowed there, 404 for a name no tenant has -- all before any token is asked for."""
    check_caller(headers, policy.allowed)
    return policy.tenant_for(caller_ids(headers), tenants, ref)
