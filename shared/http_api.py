"""The HTTP face of the service: a request's parts in, a status, JSON body and headers out."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared import bulk, logs
from shared.app import get_app, get_settings
from shared.callers import caller_scope, caller_tenant
from shared.errors import AppError, SettingsError, error_body
from shared.ratelimit import WindowStats
from shared.settings import HTTP_RESPONSE_LIMIT_SECONDS
from shared.validation import (
    bulk_key,
    correlation_id,
    parse_http_cancel,
    parse_idempotency_key,
    parse_json_object,
)

logger = logging.getLogger(__name__)

CORRELATION_HEADER = "x-correlation-id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
VERIFIED_HEADER = "x-verified-status"
BULK_MARGIN_SECONDS = 10.0  # a bulk answer leaves this much of Azure's 230 s unused


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def cancel(action_id: str, body: bytes, headers: Mapping[str, str], tenant_ref: str | None = None) -> Reply:
    """POST /api/machineactions/{actionId}/cancel, or /api/tenants/{tenant}/machineactions/...."""
    correlation = correlation_id(headers.get(CORRELATION_HEADER))
    reply_headers = {CORRELATION_HEADER: correlation}
    try:
        settings = get_settings()
        tenant = caller_tenant(headers, settings.callers, settings.tenants, tenant_ref)
        scope = caller_scope(headers, settings.allowed_callers)
        command = parse_http_cancel(action_id, body, correlation, headers.get(IDEMPOTENCY_HEADER), scope)
        app = get_app()
        result = app.of(tenant).service.cancel(command, max_wait=app.settings.http_max_wait_seconds)
    except AppError as exc:
        return error_reply(exc, correlation, reply_headers)
    except Exception:
        logger.exception("unexpected failure, correlation %s", correlation)
        return Reply(500, error_body("InternalServerError", "Unexpected error", correlation), reply_headers)
    if result.retry_after is not None and result.status in (429, 503):
        reply_headers["Retry-After"] = str(result.retry_after)
    if result.request_id:
        reply_headers["x-upstream-request-id"] = result.request_id
    if result.replayed:
        reply_headers[REPLAYED_HEADER] = "true"
    if result.verified_status is not None:
        reply_headers[VERIFIED_HEADER] = result.verified_status
    return Reply(result.status, result.body, reply_headers)


def cancel_pending(machine_id: str, body: bytes, headers: Mapping[str, str], tenant_ref: str | None = None) -> Reply:
    """POST /api/machines/{machineId}/cancelPendingActions (or under /api/tenants/{tenant}/): list,
    cancel each, sum up."""
    correlation = correlation_id(headers.get(CORRELATION_HEADER))
    reply_headers = {CORRELATION_HEADER: correlation}
    started = time.monotonic()
    try:
        settings = get_settings()
        tenant = caller_tenant(headers, settings.callers, settings.tenants, tenant_ref)
        scope = caller_scope(headers, settings.allowed_callers)
        request = bulk.parse_bulk(machine_id, parse_json_object(body))
        key = parse_idempotency_key(headers.get(IDEMPOTENCY_HEADER))
        path = get_app().of(tenant)
        # Azure cuts an HTTP answer at 230 s: cancels start early enough to end, with their reads, by then.
        verify_until = started + HTTP_RESPONSE_LIMIT_SECONDS - BULK_MARGIN_SECONDS - settings.timeout_seconds
        cancel_until = verify_until - (settings.verify_seconds if request.verify else 0.0)
        listing = bulk.list_pending(
            path.service, path.quotas["list"], request, settings.http_max_wait_seconds, cancel_until
        )
    except AppError as exc:
        return error_reply(exc, correlation, reply_headers)
    if listing.status != 200:
        return Reply(listing.status, listing.body, reply_headers)
    items = None
    if not request.dry_run:

        def action_key(action_id: str) -> str | None:
            return bulk_key(scope, key, action_id) if key else None

        items = bulk.cancel_each(path.service, listing.actions, request, correlation, action_key, cancel_until,
                                 verify_until, scope)  # fmt: skip
    return Reply(200, bulk.summary(request, listing.actions, items), reply_headers)


def quota(request_headers: Mapping[str, str], tenant_ref: str | None = None) -> Reply:
    """GET /api/quota (or /api/tenants/{tenant}/quota): for each Defender API's quota (cancel, list,
    get) and each of its windows, the calls used, the limit, and when the next slot frees. The
    cancel quota also stays at the top level, where callers found it before."""
    correlation = correlation_id(request_headers.get(CORRELATION_HEADER))
    headers = {CORRELATION_HEADER: correlation}
    try:
        settings = get_settings()
        tenant = caller_tenant(request_headers, settings.callers, settings.tenants, tenant_ref)
        path = get_app().of(tenant)
        stats = {api: (path.quota_key(api), *limiter.stats()) for api, limiter in path.quotas.items()}
    except AppError as exc:
        return error_reply(exc, correlation, headers)
    now = time.time()
    quotas = {api: _quota_body(key, windows, blocked, now) for api, (key, windows, blocked) in stats.items()}
    body = {"tenant": {"name": tenant.name, "id": tenant.id}, **quotas["cancel"], "quotas": quotas}
    return Reply(200, body, headers)


def _quota_body(key: str, windows: Sequence[WindowStats], blocked_until: int, now: float) -> dict[str, Any]:
    return {
        "key": key,
        "windows": [
            {
                "limit": w.limit,
                "seconds": w.seconds,
                "used": w.used,
                "remaining": max(0, w.limit - w.used),
                "nextSlotAt": _iso(w.next_free_ms),
                "nextSlotInSeconds": round(max(0.0, w.next_free_ms / 1000 - now), 3),
            }
            for w in windows
        ],
        "blockedUntil": _iso(blocked_until) if blocked_until > now * 1000 else None,
    }


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def error_reply(exc: AppError, correlation: str, headers: dict[str, str]) -> Reply:
    if not exc.recorded and not isinstance(exc, SettingsError):
        logs.refused(exc, correlation)
    if exc.retry_after is not None:
        headers = {**headers, "Retry-After": str(exc.retry_after)}
    return Reply(exc.status, error_body(exc.code, exc.message, correlation), headers)
