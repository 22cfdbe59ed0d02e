"""The queue face of the service: one message in, one result message out (or a deferral).

Message: `{"machineActionId", "comment", "correlationId"?, "tenantId"?, "verify"?}` (+ our own
`attempts` and `messageId`, carried by deferred copies, and `bulkJob` on a bulk job's children);
`tenantId` is a TENANTS name or id, absent for the home tenant. A message with `machineId` instead
is a bulk job (shared.faces.bulk_queue). Its idempotency key is (correlationId, machineActionId), or the
first delivery's message id when it has no correlationId, so a redelivered or deferred copy
replays the answer instead of cancelling again. Outcomes:
- Defender answered (2xx/4xx): a result with its status and body.
- Defender may have acted but its answer was lost (a timeout, a cut connection, a 500/502/504):
  a `failed` result at once, with that answer; a retry could only replay it.
- Invalid message, or a tenant not in TENANTS: a `rejected` result quoting it; never retried.
- Quota used up, Defender's 429, or the same key in flight: the message is sent again with a
  visibility delay and this invocation ends cleanly, so it never counts toward poison.
- Nothing reached Defender (state store down, no token, no connection, Defender's 503): raise, so
  the host retries; on the last allowed attempt a `failed` result is sent first (the host writes
  no output binding on failure).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Any

from shared import logs
from shared.app import get_app, get_settings
from shared.cancel.commands import (
    correlation_id,
    parse_action_id,
    parse_bulk,
    parse_comment,
    parse_flag,
    parse_json_object,
)
from shared.cancel.service import CancelResult
from shared.config.settings import QUEUE as QUEUE
from shared.config.settings import QUEUE_INLINE_WAIT_SECONDS
from shared.config.settings import RESULTS_QUEUE as RESULTS_QUEUE
from shared.config.tenants import Tenant, TenantNotFound
from shared.errors import AppError, InvalidRequest, OutcomeUnknown, QuotaExceeded, RequestInProgress, error_body
from shared.faces import bulk_queue
from shared.faces.messages import BulkJobMessage, Message, QueueCancel, Result
from shared.outcomes import Outcome, of_result
from shared.redaction import redact
from shared.storage.clients import queue_client

logger = logging.getLogger(__name__)

IN_FLIGHT_DEFER_SECONDS = 5
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600
MAX_QUOTED_CHARS = 8192
_ID_RULE = "1 to 128 letters, digits or . _ : -"
_JOB_KEY = re.compile(r"[A-Za-z0-9._:\-]{1,64}\|[A-Za-z0-9._:\-]{1,128}\|[0-9a-f]{40}\|[A-Za-z+]{1,400}")
JOB_FIELDS = frozenset({"machineId", "correlationId", "tenantId", "messageId", "attempts", "bulkRound"})


def handle(body: bytes, dequeue_count: int, message_id: str | None = None) -> Message | None:
    """The result message to send, or None when the message was deferred or belongs to a bulk job
    (whose one summary is sent by shared.faces.bulk_queue). Raises to be retried."""
    try:
        payload = parse_json_object(body, "The message")
        if "machineId" in payload and "machineActionId" not in payload:  # a job; a cancel may name its machine
            return bulk_job(job_message(payload, message_id), dequeue_count, message_id)
        message = message_from(payload, message_id)
    except (InvalidRequest, TenantNotFound) as exc:
        return rejected(body, exc, dequeue_count)
    try:
        tenant = get_settings().tenants.resolve(message.tenant_ref)
    except TenantNotFound as exc:
        if message.bulk_job and _own_job(message, message.tenant_ref):
            # its tenant was removed mid-job: the job records the refusal, so its summary still comes
            bulk_queue.finish(message.bulk_job, rejected(body, exc, dequeue_count), message_id or message.message_id)
            return None
        return rejected(body, exc, dequeue_count)
    if message.bulk_job and not _own_job(message, tenant.id):
        refused = InvalidRequest(
            "bulkJob names no stored job of this tenant that lists this action", code="InvalidRequestBody"
        )
        return rejected(body, refused, dequeue_count)
    result = cancel(message, tenant, dequeue_count, body)
    if result is not None and message.bulk_job:
        bulk_queue.finish(message.bulk_job, result, message_id or message.message_id)
        return None
    return result


def _own_job(message: QueueCancel, tenant_id: str | None) -> bool:
    """Whether a bulk child belongs to a stored job of its own tenant that lists its action: a forged
    or stale `bulkJob` can neither cancel through a job nor complete another's."""
    job = bulk_queue.jobs().get(str(message.bulk_job))
    return job is not None and job.tenant_id == tenant_id and message.action_id in job.action_ids


def job_message(payload: dict[str, Any], message_id: str | None) -> BulkJobMessage:
    return BulkJobMessage(
        request=parse_bulk(payload.get("machineId"), payload, JOB_FIELDS),
        correlation_id=_optional_id(payload, "correlationId"),
        message_id=_optional_id(payload, "messageId") or message_id,
        tenant_ref=_optional_id(payload, "tenantId"),
        attempts=_attempts(payload),
        bulk_round=_bulk_round(payload),
    )


def bulk_job(message: BulkJobMessage, dequeue_count: int, message_id: str | None) -> Message | None:
    """A bulk job message (or its continuation, `bulkRound`): its summary comes later, from the
    child that completes it."""
    tenant = get_settings().tenants.resolve(message.tenant_ref)
    job_id = message.correlation_id or message.message_id or correlation_id(None)
    try:
        return bulk_queue.start(
            message.request, job_id, tenant, owner=message_id or job_id, bulk_round=message.bulk_round
        )
    except QuotaExceeded as exc:  # no list slot yet (or Defender's 429): the job comes back when one frees
        again = replace(message, message_id=job_id, attempts=message.attempts + dequeue_count)
        _send_again(again, int(exc.wait_seconds))
        return None
    except AppError as exc:  # a list that could not be made (a read: safe to retry); the last try answers
        if dequeue_count >= get_settings().max_dequeue_count:
            return Result(
                correlation_id=job_id,
                action_id=None,
                tenant_id=tenant.id,
                status=None,
                body=error_body(exc.code, exc.message),
                outcome=Outcome.FAILED,
                attempts=message.attempts + dequeue_count,
            )
        raise


def _bulk_round(payload: dict[str, Any]) -> int | None:
    value = payload.get("bulkRound")
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise InvalidRequest("bulkRound must be a listing round this app wrote", code="InvalidRequestBody")
    return value


def cancel(message: QueueCancel, tenant: Tenant, dequeue_count: int, body: bytes) -> Result | None:
    """One cancel: its result message, or None when it was deferred. Raises to be retried."""
    attempts = message.attempts + dequeue_count
    command = message.command()
    try:
        result = get_app().of(tenant).service.cancel(command, max_wait=QUEUE_INLINE_WAIT_SECONDS)
    except QuotaExceeded as exc:
        # Back a little before the slot frees (rounded down), then the short rest is slept in place.
        defer(message, int(exc.wait_seconds), dequeue_count)
        return None
    except RequestInProgress:
        defer(message, IN_FLIGHT_DEFER_SECONDS, dequeue_count)
        return None
    except InvalidRequest as exc:  # e.g. a messageId key reused for another action (422)
        return rejected(body, exc, attempts)
    except OutcomeUnknown as exc:
        return _result(message, tenant, None, error_body(exc.code, exc.message), Outcome.FAILED, attempts)
    except AppError as exc:
        last_attempt(message, tenant, attempts, dequeue_count, None, error_body(exc.code, exc.message))
        raise
    if result.status == 429:
        defer(message, result.retry_after or IN_FLIGHT_DEFER_SECONDS, dequeue_count)
        return None
    if result.status == 503:  # Defender refused before acting, even after our retries
        last_attempt(message, tenant, attempts, dequeue_count, result.status, result.body)
        raise TransientUpstreamError(f"Defender answered {result.status}; the host will retry")
    return result_message(message, tenant, result, attempts)


class TransientUpstreamError(Exception):
    """Defender answered 503: raised so the host retries the message."""


def parse_message(body: bytes, message_id: str | None = None) -> QueueCancel:
    return message_from(parse_json_object(body, "The message"), message_id)


def message_from(payload: dict[str, Any], message_id: str | None = None) -> QueueCancel:
    return QueueCancel(
        action_id=parse_action_id(payload.get("machineActionId")),
        comment=parse_comment(payload),
        correlation_id=_optional_id(payload, "correlationId"),
        # no id at all (not from the host): one now
        message_id=_optional_id(payload, "messageId") or message_id or correlation_id(None),
        attempts=_attempts(payload),
        tenant_ref=_optional_id(payload, "tenantId"),
        verify=parse_flag(payload, "verify"),
        bulk_job=_bulk_job_key(payload),
    )


def _bulk_job_key(payload: dict[str, Any]) -> str | None:
    key = payload.get("bulkJob")
    if key is not None and not (isinstance(key, str) and _JOB_KEY.fullmatch(key)):
        raise InvalidRequest("bulkJob must be a job key this app wrote", code="InvalidRequestBody")
    return key


def _attempts(payload: dict[str, Any]) -> int:
    attempts = payload.get("attempts", 0)
    return attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0 else 0


def _optional_id(payload: dict[str, Any], name: str) -> str | None:
    given = payload.get(name)
    if given is not None and correlation_id(given if isinstance(given, str) else None) != given:
        raise InvalidRequest(f"{name} must be {_ID_RULE}", code="InvalidRequestBody")
    return given


def rejected(body: bytes, exc: AppError, attempts: int) -> Result:
    """A message we cannot take: quoted (secrets scrubbed) in the result, never retried."""
    quoted = redact(body.decode("utf-8", "replace")[:MAX_QUOTED_CHARS])
    try:
        original: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        original = None
    fields = original if isinstance(original, dict) else {}
    answer = error_body(exc.code, exc.message)
    answer["message"] = quoted
    logs.refused(exc, _text(fields.get("correlationId")) or "", "queue")
    return Result(
        correlation_id=_text(fields.get("correlationId")),
        action_id=_text(fields.get("machineActionId")),
        tenant_id=_text(fields.get("tenantId")),
        status=None,
        body=answer,
        outcome=Outcome.REJECTED,
        attempts=attempts,
    )


def result_message(message: QueueCancel, tenant: Tenant, result: CancelResult, attempts: int) -> Result:
    return Result(
        correlation_id=message.reported_correlation,
        action_id=message.action_id,
        tenant_id=tenant.id,
        status=result.status,
        body=result.body,
        outcome=of_result(result.status),
        attempts=attempts,
        replayed=result.replayed,
        verified_status=result.verified_status,
    )


def last_attempt(
    message: QueueCancel, tenant: Tenant, attempts: int, dequeue_count: int, status: int | None, body: Any
) -> None:
    """On the last attempt the host allows, send a `failed` result ourselves before raising (a bulk
    job's child records it in its job instead)."""
    settings = get_settings()
    if dequeue_count < settings.max_dequeue_count:
        return
    result = _result(message, tenant, status, body, Outcome.FAILED, attempts)
    if message.bulk_job:
        bulk_queue.finish(message.bulk_job, result, message.message_id)
        return
    queue_client(settings.queue_storage, RESULTS_QUEUE).send_message(result.to_json())


def defer(message: QueueCancel, seconds: int, deliveries: int) -> None:
    """Send the message again, visible in `seconds`; this invocation then ends cleanly."""
    delay = _send_again(message.again(deliveries), seconds)
    # the service's record of the refusal (quota, in flight) already says why; this is detail
    logger.debug("deferred %s by %d s (correlation %s)", message.action_id, delay, message.reported_correlation)


def _send_again(message: Message, seconds: int) -> int:
    delay = max(1, min(int(seconds), MAX_VISIBILITY_SECONDS))
    queue_client(get_settings().queue_storage, QUEUE).send_message(message.to_json(), visibility_timeout=delay)
    return delay


def _result(
    message: QueueCancel, tenant: Tenant, status: int | None, body: Any, outcome: Outcome, attempts: int
) -> Result:
    return Result(
        correlation_id=message.reported_correlation,
        action_id=message.action_id,
        tenant_id=tenant.id,
        status=status,
        body=body,
        outcome=outcome,
        attempts=attempts,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
