"""The composition root: settings and clients built once per worker process, then reused."""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared import logs, redaction
from shared.cancel.service import CancelService
from shared.config.settings import Settings
from shared.config.tenants import Tenant
from shared.defender.client import DefenderClient
from shared.defender.token import TokenProvider, identity_assertion, managed_identity, tenant_credential
from shared.defender.transport import RequestsTransport
from shared.formats import Api
from shared.ratelimit.limiter import RateLimiter
from shared.storage.audit import AuditLog
from shared.storage.clients import queue_client, table_client

if TYPE_CHECKING:
    from shared.storage.jobs import JobStore


@dataclass(frozen=True)
class TenantApp:
    """One tenant's path to Defender: its own tokens, a quota per Defender API (cancel, list, get:
    each its own log, owned by its client), and the service."""

    tenant: Tenant
    service: CancelService
    defender: DefenderClient
    quotas: Mapping[Api, RateLimiter]
    keys: Mapping[Api, str]  # each quota's log key (shown by /api/quota)

    @property
    def limiter(self) -> RateLimiter:
        return self.quotas[Api.CANCEL]


@dataclass(frozen=True)
class App:
    settings: Settings
    tenants: Mapping[str, TenantApp]  # by tenant id

    @functools.cached_property
    def jobs(self) -> JobStore:
        """The queue's bulk jobs: built on first use, so a cold start does not create their table."""
        from shared.storage.jobs import JobStore

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
    from shared.idempotency.table import IdempotencyStore
    from shared.ratelimit.table import TableSlidingLog

    identity = managed_identity(settings.client_id, settings.timeout_seconds)
    transport = RequestsTransport()  # one connection pool for every tenant: Defender is one host
    audit = AuditLog(table_client(settings.storage, settings.audit_table))
    log_table = table_client(settings.storage, settings.rate_limit_table)
    idempotency_table = table_client(settings.storage, settings.idempotency_table)
    answers = IdempotencyStore(idempotency_table, lease_seconds=settings.idempotency_lease_seconds)

    def tenant_app(tenant: Tenant, tokens: TokenProvider) -> TenantApp:
        keys = {api: settings.quota_key(api, None if tenant.home else tenant.id) for api in Api}
        quotas = {
            api: RateLimiter(TableSlidingLog(log_table, keys[api]), settings.quota_windows(api), settings.safety_ms)
            for api in Api
        }
        defender = DefenderClient(
            settings.api_base_url, tokens, settings.timeout_seconds, quotas=quotas, transport=transport
        )
        service = CancelService(
            defender,
            audit,
            answers=answers,
            budget_seconds=settings.timeout_seconds,
            tenant=tenant,
            verify_seconds=settings.verify_seconds,
        )
        return TenantApp(tenant, service, defender, quotas, keys)

    home = settings.tenants.home
    apps = {home.id: tenant_app(home, TokenProvider(settings.token_scope, credential=identity))}
    assertion = identity_assertion(identity, settings.exchange_audience)
    for tenant in settings.tenants.customers:
        credential = _customer_credential(settings, tenant, assertion)
        apps[tenant.id] = tenant_app(
            tenant, TokenProvider(settings.token_scope, credential=credential, source=_source(tenant))
        )
    return App(settings, apps)


def _customer_credential(settings: Settings, tenant: Tenant, assertion: Any) -> Any:
    assert settings.tenant_app_client_id is not None  # settings require it with TENANTS
    return tenant_credential(
        tenant.id, settings.tenant_app_client_id, assertion, settings.authority_host, settings.timeout_seconds
    )


def _source(tenant: Tenant) -> str:
    return f"tenant {tenant.name} ({tenant.id}) through the app registration's federated credential"
