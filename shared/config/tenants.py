"""The tenants one deployment serves, and which caller may act in which.

The home tenant is where the app's managed identity lives: its tokens come straight from the
identity, as they always did. Every other tenant is a customer whose admin consented a multi-tenant
app registration; its tokens come from that app, which trusts the identity through a federated
credential (shared.defender.token). Defender counts its quota per app and tenant, so each tenant is its own
quota (and, for the home tenant, the identity is a different app from the registration).

`TENANTS` = `name=tenantId,...`; `ALLOWED_CALLERS` entries may be limited to some tenants with
`callerId=tenant|tenant` (names or ids). A tenant is referred to by its name or id, either case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field

from shared.errors import AppError, SettingsError
from shared.formats import GUID

HOME = "home"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # a name is safe in a route, a key and a log line


class TenantNotFound(AppError):
    status = 404
    code = "TenantNotFound"


@dataclass(frozen=True)
class Tenant:
    name: str
    id: str  # the directory id (lower case); the home tenant's is HOME_TENANT_ID, or "home" unset
    _: KW_ONLY
    home: bool = False


@dataclass(frozen=True)
class TenantDirectory:
    """The configured tenants, found by name or id."""

    home: Tenant
    _: KW_ONLY
    customers: tuple[Tenant, ...] = ()
    _index: Mapping[str, Tenant] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, home_id: str | None, customers: tuple[Tenant, ...]) -> TenantDirectory:
        home = Tenant(HOME, home_id or HOME, home=True)
        index: dict[str, Tenant] = {}
        for tenant in (home, *customers):
            for ref in {tenant.name, tenant.id}:
                if ref in index:
                    raise SettingsError(f"TENANTS: {ref!r} names two tenants (the home tenant is {HOME!r})")
                index[ref] = tenant
        return cls(home, customers=customers, _index=index)

    @property
    def all(self) -> tuple[Tenant, ...]:
        return (self.home, *self.customers)

    def find(self, ref: str) -> Tenant | None:
        return self._index.get(ref.strip().lower())

    def resolve(self, ref: str | None) -> Tenant:
        """The tenant a route or message names (None: the home tenant); 404 when none is configured."""
        tenant = self.home if ref is None else self.find(ref)
        if tenant is None:
            raise not_found(ref)
        return tenant


def not_found(ref: str | None) -> TenantNotFound:
    return TenantNotFound(f"No tenant {str(ref)[:64]!r} is configured in TENANTS")


def parse_tenants(raw: str, home_id: str | None) -> TenantDirectory:
    """`name=tenantId` pairs, comma separated; names are lower-case letters, digits and dashes."""
    customers = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        name, _, tenant_id = (s.strip().lower() for s in part.partition("="))
        if not _NAME.fullmatch(name) or not GUID.fullmatch(tenant_id) or name == HOME:
            raise SettingsError(
                "TENANTS must be a comma list of name=tenantId, each name 1-63 lower-case letters, digits or "
                f"dashes (not {HOME!r}) and each id a GUID, e.g. contoso=72f988bf-86f1-41af-91ab-2d7cd011db47; "
                f"got {part!r}"
            )
        if GUID.fullmatch(name):  # a route's GUID is read as a tenant id: a name shaped so would alias another
            raise SettingsError(
                f"TENANTS: the name {name!r} is shaped like a tenant id; a name must not be a GUID "
                f"(tenants/<GUID> means the tenant with that id); got {part!r}"
            )
        customers.append(Tenant(name, tenant_id))
    if home_id is not None and not GUID.fullmatch(home_id):
        raise SettingsError(f"HOME_TENANT_ID must be the home directory's id (a GUID); got {home_id!r}")
    return TenantDirectory.build(home_id.lower() if home_id else None, tuple(customers))
