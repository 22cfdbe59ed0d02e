"""The HTTP face of the service: a request's parts in, a status, JSON body and headers out."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from shared import logs
from shared.app import get_app, get_settings
from shared.cancel import bulk
from shared.cancel.commands import (
    BulkRequest,
    correlation_id,
    parse_bulk,
    parse_http_cancel,
    parse_idempotency_key,
    parse_json_object,
    parse_machine_id,
)
from shared.cancel.service import CancelResult
from shared.config.callers import caller_scope, caller_tenant
from shared.config.settings import Settings
from shared.config.tenants import Tenant
from shared.errors import AppError, SettingsError, error_body
from shared.formats import Api
from shared.idempotency.keys import bulk_key
from shared.ratelimit.rule import WindowStats

logger = logging.getLogger(__name__)

CORRELATION_HEADER = "x-correlation-id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
VERIFIED_HEADER = "x-verified-status"
# A bulk request answers at once only when it surely ends by then, else 202 and a status route:
# "The Logic Apps engine will timeout by default after 1-2 minutes of an open HTTP Request"
# (logicappsio/LogicAppsAsyncResponseSample, the asynchronous pattern Logic Apps follows).
INLINE_ANSWER_SECONDS = 100.0
POLL_SECONDS = (2, 30)  # the Retry-After of a 202: at least, at most
_JOB_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    _: KW_ONLY
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scope:
    """One HTTP request as every route sees it: its correlation id, the settings, the tenant this
    caller may act in (403/404 before anything else otherwise), and whose keys and jobs are its own."""

    correlation: str
    settings: Settings
    tenant: Tenant
    caller: str


def serve(headers: Mapping[str, str], tenant_ref: str | None, route: Callable[[Scope], Reply]) -> Reply:
    """Run `route` in the request's scope. Every reply carries `x-correlation-id`; an AppError is
    answered in Defender's error shape (recorded once); any other exception is a 500 in that shape,
    with the correlation id and one log record, never an exception for the host to answer."""
    correlation = correlation_id(headers.get(CORRELATION_HEADER))
    base = {CORRELATION_HEADER: correlation}
    try:
        settings = get_settings()
        tenant = caller_tenant(headers, settings.callers, settings.tenants, tenant_ref)
        reply = route(Scope(correlation, settings, tenant, caller_scope(headers, settings.allowed_callers)))
    except AppError as exc:
        return error_reply(exc, correlation, base)
    except Exception:
        logger.exception("unexpected failure, correlation %s", correlation)
        return Reply(500, error_body("InternalServerError", "Unexpected error", correlation), headers=base)
    return Reply(reply.status, reply.body, headers={**base, **reply.headers})


def cancel(action_id: str, body: bytes, headers: Mapping[str, str], tenant_ref: str | None = None) -> Reply:
    """POST /api/machineactions/{actionId}/cancel, or /api/tenants/{tenant}/machineactions/...."""

    def route(scope: Scope) -> Reply:
        key = headers.get(IDEMPOTENCY_HEADER)
        command = parse_http_cancel(action_id, body, scope.correlation, key, scope.caller)
        service = get_app().of(scope.tenant).service
        return _cancel_reply(service.cancel(command, max_wait=scope.settings.http_max_wait_seconds))

    return serve(headers, tenant_ref, route)


def _cancel_reply(result: CancelResult) -> Reply:
    reply_headers: dict[str, str] = {}
    if result.retry_after is not None and result.status in (429, 503):
        reply_headers["Retry-After"] = str(result.retry_after)
    if result.request_id:
        reply_headers["x-upstream-request-id"] = result.request_id
    if result.replayed:
        reply_headers[REPLAYED_HEADER] = "true"
    if result.verified_status is not None:
        reply_headers[VERIFIED_HEADER] = result.verified_status
    return Reply(result.status, result.body, headers=reply_headers)


def cancel_pending(
    machine_id: str, body: bytes, headers: Mapping[str, str], tenant_ref: str | None = None, url: str = ""
) -> Reply:
    """POST /api/machines/{machineId}/cancelPendingActions (or under /api/tenants/{tenant}/): list,
    then cancel each and sum up at once when that surely ends within INLINE_ANSWER_SECONDS; else
    continue as a durable job and answer 202 with its status route (the asynchronous request-reply
    pattern Logic Apps follows by itself)."""
    started = time.monotonic()

    def route(scope: Scope) -> Reply:
        request = parse_bulk(machine_id, parse_json_object(body))
        key = parse_idempotency_key(headers.get(IDEMPOTENCY_HEADER))
        return _bulk(scope, request, key, started, url)

    return serve(headers, tenant_ref, route)


def _bulk(scope: Scope, request: BulkRequest, key: str | None, started: float, url: str) -> Reply:
    settings, path = scope.settings, get_app().of(scope.tenant)
    # Reads end by the answer's deadline, cancels early enough for their reads to fit before it.
    verify_until = started + INLINE_ANSWER_SECONDS - settings.timeout_seconds
    cancel_until = verify_until - (settings.verify_seconds if request.verify else 0.0)
    listing = bulk.list_pending(path.defender, request, settings.http_max_wait_seconds, cancel_until)
    if listing.status != 200:
        return Reply(listing.status, listing.body)
    if request.dry_run:
        return Reply(200, bulk.summary(request, listing.actions, None))
    eta = path.limiter.seconds_for(len(listing.actions))
    if time.monotonic() + eta + settings.timeout_seconds > cancel_until:  # not surely in time: a job
        from shared.faces import bulk_queue  # the job store, only when a job is made (a cold start skips it)

        job_id = _job_id(scope.caller, key, request)
        job = bulk_queue.open_http(request, job_id, scope.tenant, scope.caller, listing)
        accepted = {**_progress(job_id, job.action_ids, {}), "correlationId": scope.correlation}
        return Reply(202, accepted, headers=_poll_headers(url, job_id, eta))

    def action_key(action_id: str) -> str | None:
        return bulk_key(scope.caller, key, action_id) if key else None

    def cancel(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return bulk.cancel_each(
            path.service,
            actions,
            request,
            scope.correlation,
            action_key,
            cancel_until,
            verify_until,
            caller=scope.caller,
        )

    found, items = bulk.cancel_converging(
        path.defender, request, listing, cancel, settings.http_max_wait_seconds, cancel_until
    )
    return Reply(200, bulk.summary(request, found, items))


def pending_job(
    machine_id: str, job_id: str, headers: Mapping[str, str], tenant_ref: str | None = None, url: str = ""
) -> Reply:
    """GET /api/machines/{machineId}/cancelPendingActions/{jobId} (or under /api/tenants/{tenant}/):
    202 with `Location` and `Retry-After` while the job runs, then 200 with its summary. Only the
    caller that started the job may read it; any other gets 404, as for a job that does not exist."""

    def route(scope: Scope) -> Reply:
        from shared.faces import bulk_queue
        from shared.storage.jobs import job_key

        machine = parse_machine_id(machine_id)
        if not _JOB_ID.fullmatch(job_id):
            raise JobNotFound("No bulk job has this id")
        state = bulk_queue.jobs().state(job_key(scope.tenant.id, job_id, machine, ()))
        job = state.job
        if job is None or job.origin != "http" or job.caller != scope.caller:
            raise JobNotFound("No bulk job has this id")
        if not state.concluded:
            eta = get_app().of(scope.tenant).limiter.seconds_for(len(job.action_ids) - len(state.outcomes))
            progress = _progress(job_id, job.action_ids, state.outcomes)
            return Reply(202, progress, headers=_poll_headers(url, job_id, eta, here=True))
        summary = bulk_queue.summary_of(job, state.outcomes)
        return Reply(200, {"jobId": job_id, "dryRun": False, **summary, "notAttempted": 0})

    return serve(headers, tenant_ref, route)


class JobNotFound(AppError):
    status = 404
    code = "ResourceNotFound"


def _job_id(scope: str, key: str | None, request: BulkRequest) -> str:
    """A new job per request; with an Idempotency-Key, the same job for a repeat of it."""
    if key is None:
        return uuid.uuid4().hex
    return hashlib.sha256("|".join((scope, key, request.machine_id, *request.types)).encode()).hexdigest()[:32]


def _progress(job_id: str, action_ids: Sequence[str], outcomes: Mapping[str, Any]) -> dict[str, Any]:
    return {"jobId": job_id, "status": "running", "found": len(action_ids), "done": len(outcomes)}


def _poll_headers(url: str, job_id: str, eta: float, here: bool = False) -> dict[str, str]:
    """`Location` (the status route, with the request's `code` if it had one: a poll carries no
    other key) and `Retry-After` (about when the job should be done, within POLL_SECONDS)."""
    parts = urlsplit(url)
    status_path = parts.path if here else f"{parts.path.rstrip('/')}/{job_id}"
    code = parse_qs(parts.query).get("code")
    location = urlunsplit((parts.scheme, parts.netloc, status_path, urlencode({"code": code[0]}) if code else "", ""))
    wait = min(POLL_SECONDS[1], max(POLL_SECONDS[0], math.ceil(eta)))
    return {"Location": location, "Retry-After": str(wait)}


def quota(request_headers: Mapping[str, str], tenant_ref: str | None = None) -> Reply:
    """GET /api/quota (or /api/tenants/{tenant}/quota): for each Defender API's quota (cancel, list,
    get) and each of its windows, the calls used, the limit, and when the next slot frees. The
    cancel quota also stays at the top level, where callers found it before."""

    def route(scope: Scope) -> Reply:
        path = get_app().of(scope.tenant)
        stats = {api: (path.keys[api], *limiter.stats()) for api, limiter in path.quotas.items()}
        now = time.time()
        quotas = {str(api): _quota_body(key, windows, blocked, now) for api, (key, windows, blocked) in stats.items()}
        tenant = {"name": scope.tenant.name, "id": scope.tenant.id}
        return Reply(200, {"tenant": tenant, **quotas[Api.CANCEL], "quotas": quotas})

    return serve(request_headers, tenant_ref, route)


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
    return Reply(exc.status, error_body(exc.code, exc.message, correlation), headers=headers)
