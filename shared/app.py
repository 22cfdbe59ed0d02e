"""The composition root: settings and clients built once per worker process, then reused."""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared import logs, redaction
from shared.audit import AuditLog
from shared.defender import DefenderClient, RequestsTransport
from shared.ratelimit import RateLimiter
from shared.service import CancelService
from shared.settings import APIS, Settings
from shared.storage import queue_client, table_client
from shared.tenants import Tenant
from shared.token import TokenProvider, identity_assertion, managed_identity, tenant_credential

if TYPE_CHECKING:
    from shared.jobs import JobStore


@dataclass(frozen=True)
class TenantApp:
    """One tenant's path to Defender: its own tokens, a quota per Defender API (cancel, list, get:
    each its own log), and the service."""

    tenant: Tenant
    service: CancelService
    quotas: Mapping[str, RateLimiter]  # by API (shared.settings.APIS)
    rate_limit_key: str  # the cancel quota's; the others append -list / -get

    @property
    def limiter(self) -> RateLimiter:
        return self.quotas["cancel"]

    def quota_key(self, api: str) -> str:
        return quota_key(self.rate_limit_key, api)


def quota_key(cancel_key: str, api: str) -> str:
    """The cancel quota keeps its key (its log survives an upgrade); the read APIs get their own."""
    return cancel_key if api == "cancel" else f"{cancel_key}-{api}"


@dataclass(frozen=True)
class App:
    settings: Settings
    tenants: Mapping[str, TenantApp]  # by tenant id

    @functools.cached_property
    def jobs(self) -> JobStore:
        """The queue's bulk jobs: built on first use, so a cold start does not create their table."""
        from shared.jobs import JobStore

        return JobStore(table_client(self.settings.storage, self.settings.bulk_table))

    def of(self, tenant: Tenant) -> TenantApp:
        return self.tenants[tenant.id]

    @property
    def home(self) -> TenantApp:
        return self.tenants[self.settings.tenants.home.id]

    @property
    def service(self) -> CancelService:
        return self.home.service

    @property
    def limiter(self) -> RateLimiter:
        return self.home.limiter


_lock = threading.Lock()
_app: App | None = None


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read once; a SettingsError names the setting at fault."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
        logs.quiet_sdks(_settings.sdk_log_level)  # before the first SDK call of this worker
    return _settings


def get_app() -> App:
    """The process's App; a failed build (bad settings, storage down) is retried on the next call."""
    global _app
    if _app is None:
        with _lock:
            if _app is None:
                _app = build_app(get_settings())
    return _app


def reset_app() -> None:
    """Forget the process's settings and App, so the next call reads the environment again (tests)."""
    global _app, _settings
    with _lock:
        _app = None
        _settings = None
    queue_client.cache_clear()


def build_app(settings: Settings) -> App:
    redaction.install()
    from shared.idempotency import IdempotencyStore
    from shared.ratelimit_table import TableSlidingLog

    identity = managed_identity(settings.client_id, settings.timeout_seconds)
    transport = RequestsTransport()  # one connection pool for every tenant: Defender is one host
    audit = AuditLog(table_client(settings.storage, settings.audit_table))
    log_table = table_client(settings.storage, settings.rate_limit_table)
    answers = IdempotencyStore(
        table_client(settings.storage, settings.idempotency_table), settings.idempotency_lease_seconds
    )

    def quota(api: str, key: str) -> RateLimiter:
        return RateLimiter(TableSlidingLog(log_table, key), settings.quota_windows(api), settings.safety_ms)

    def tenant_app(tenant: Tenant, tokens: TokenProvider, key: str) -> TenantApp:
        defender = DefenderClient(settings.api_base_url, tokens, settings.timeout_seconds, transport=transport)
        quotas = {api: quota(api, quota_key(key, api)) for api in APIS}
        service = CancelService(defender, audit, quotas["cancel"], answers, settings.timeout_seconds, tenant=tenant,
                                reads=quotas["get"], verify_seconds=settings.verify_seconds)  # fmt: skip
        return TenantApp(tenant, service, quotas, key)

    home = settings.tenants.home
    home_tokens = TokenProvider(settings.token_scope, credential=identity)
    apps = {home.id: tenant_app(home, home_tokens, settings.rate_limit_key)}
    assertion = identity_assertion(identity, settings.exchange_audience)
    for tenant in settings.tenants.customers:
        tokens = TokenProvider(
            settings.token_scope, credential=_customer_credential(settings, tenant, assertion), source=_source(tenant)
        )
        apps[tenant.id] = tenant_app(tenant, tokens, settings.tenant_rate_limit_key(tenant.id))
    return App(settings, apps)


def _customer_credential(settings: Settings, tenant: Tenant, assertion: Any) -> Any:
    assert settings.tenant_app_client_id is not None  # settings require it with TENANTS
    return tenant_credential(
        tenant.id, settings.tenant_app_client_id, assertion, settings.authority_host, settings.timeout_seconds
    )


def _source(tenant: Tenant) -> str:
    return f"tenant {tenant.name} ({tenant.id}) through the app registration's federated credential"
