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
from dataclasses import dataclass, field

from shared.config.tenants import Tenant, TenantDirectory, not_found
from shared.errors import AppError, SettingsError

PRINCIPAL_HEADER = "X-MS-CLIENT-PRINCIPAL"
PRINCIPAL_ID_HEADER = "X-MS-CLIENT-PRINCIPAL-ID"
OBJECT_ID_CLAIM = "http://schemas.microsoft.com/identity/claims/objectidentifier"
ID_CLAIMS = frozenset({"appid", "azp", "oid", OBJECT_ID_CLAIM})


class CallerForbidden(AppError):
    status = 403
    code = "Forbidden"


class TenantForbidden(CallerForbidden):
    """The caller may call, but not in this tenant (an ALLOWED_CALLERS limit)."""


@dataclass(frozen=True, kw_only=True)
class CallerPolicy:
    """ALLOWED_CALLERS: who may call at all, and the tenants each limited caller may act in."""

    allowed: frozenset[str] = frozenset()
    limits: Mapping[str, frozenset[str]] = field(default_factory=dict)  # caller id -> tenant ids

    def may_act_in(self, caller_ids: set[str], tenant: Tenant) -> bool:
        """No ALLOWED_CALLERS: every key holder, everywhere. Else one of the caller's ids must be
        listed without a limit, or with this tenant."""
        if not self.allowed:
            return True
        return any(c in self.allowed and (c not in self.limits or tenant.id in self.limits[c]) for c in caller_ids)

    def everywhere(self, caller_ids: set[str]) -> bool:
        """Whether the caller may act in every tenant (and so may learn which ones exist)."""
        return not self.allowed or any(c in self.allowed and c not in self.limits for c in caller_ids)

    def tenant_for(self, caller_ids: set[str], tenants: TenantDirectory, ref: str | None) -> Tenant:
        """The tenant `ref` names, if this caller may act in it. A caller limited to some tenants
        gets 403 for every other name, configured or not, so it cannot list an MSSP's customers."""
        tenant = tenants.home if ref is None else tenants.find(ref)
        if tenant is None and self.everywhere(caller_ids):
            raise not_found(ref)
        if tenant is None or not self.may_act_in(caller_ids, tenant):
            raise TenantForbidden("The caller may not act in this tenant (ALLOWED_CALLERS)")
        return tenant


def parse_callers(raw: str, tenants: TenantDirectory) -> CallerPolicy:
    allowed: set[str] = set()
    limits: dict[str, frozenset[str]] = {}
    for part in (p.strip().lower() for p in raw.split(",") if p.strip()):
        caller, limited, refs = (s.strip() for s in part.partition("="))
        allowed.add(caller)
        if not limited:
            continue
        ids = set()
        for ref in (r.strip() for r in refs.split("|") if r.strip()):
            tenant = tenants.find(ref)
            if tenant is None:
                raise SettingsError(f"ALLOWED_CALLERS limits {caller} to {ref!r}, which is not in TENANTS")
            ids.add(tenant.id)
        if not ids:
            raise SettingsError(f"ALLOWED_CALLERS: {caller}= must name at least one tenant (name|name)")
        limits[caller] = limits.get(caller, frozenset()) | ids
    return CallerPolicy(allowed=frozenset(allowed), limits=limits)


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
