"""The composition root: settings and clients built once per worker process, then reused."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from shared import redaction
from shared.audit import AuditLog
from shared.defender import DefenderClient
from shared.ratelimit import RateLimiter
from shared.service import CancelService
from shared.settings import Settings
from shared.storage import queue_client, table_client
from shared.token import TokenProvider


@dataclass(frozen=True)
class App:
    settings: Settings
    service: CancelService
    limiter: RateLimiter


_lock = threading.Lock()
_app: App | None = None


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read once; a SettingsError names the setting at fault."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
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

    tokens = TokenProvider(settings.token_scope, settings.client_id, settings.timeout_seconds)
    defender = DefenderClient(settings.api_base_url, tokens, settings.timeout_seconds)
    audit = AuditLog(table_client(settings.storage, settings.audit_table))
    store = TableSlidingLog(table_client(settings.storage, settings.rate_limit_table), settings.rate_limit_key)
    limiter = RateLimiter(store, settings.rate_limits, settings.safety_ms)
    answers = IdempotencyStore(
        table_client(settings.storage, settings.idempotency_table), settings.idempotency_lease_seconds
    )
    service = CancelService(defender, audit, limiter, answers, budget_seconds=settings.timeout_seconds)
    return App(settings, service, limiter)
