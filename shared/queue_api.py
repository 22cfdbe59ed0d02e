"""The queue face of the service: one message in, one result message out (or a deferral).

Message: `{"machineActionId", "comment", "correlationId"?}` (+ our own `attempts`). Outcomes:
- Defender answered finally (2xx/4xx): a result with its status and body.
- Invalid message: a `rejected` result quoting it; never retried.
- Quota used up, Defender's 429, or the same correlation id in flight: the message is sent again
  with a visibility delay and this invocation ends cleanly, so it never counts toward poison.
- Transient failure (5xx, timeout, state store down): raise, so the host retries; on the last
  allowed attempt a `failed` result is sent first (the host writes no output binding on failure).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from shared.app import get_app, get_settings
from shared.errors import AppError, InvalidRequest, QuotaExceeded, RequestInProgress, error_body
from shared.redaction import redact
from shared.service import CancelResult, is_final
from shared.storage import queue_client
from shared.validation import CancelCommand, correlation_id, parse_action_id, parse_comment, parse_json_object

logger = logging.getLogger(__name__)

QUEUE = "cancel-machine-action"
RESULTS_QUEUE = "cancel-machine-action-results"
INLINE_WAIT_SECONDS = 5.0  # a shorter wait for a slot is slept in place, a longer one deferred
IN_FLIGHT_DEFER_SECONDS = 5
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600
MAX_QUOTED_CHARS = 8192


def handle(body: bytes, dequeue_count: int) -> dict[str, Any] | None:
    """The result message to send, or None when the message was deferred. Raises to be retried."""
    try:
        message = parse_message(body)
    except InvalidRequest as exc:
        return rejected(body, exc, dequeue_count)
    prior = int(message.get("attempts", 0))
    command = CancelCommand(
        message["machineActionId"], message["comment"], message["correlationId"], "queue", message["correlationId"]
    )
    try:
        app = get_app()
        result = app.service.cancel(command, max_wait=INLINE_WAIT_SECONDS)
    except QuotaExceeded as exc:
        # Back a little before the slot frees (rounded down), then the short rest is slept in place.
        defer(message, int(exc.wait_seconds))
        return None
    except RequestInProgress:
        defer(message, IN_FLIGHT_DEFER_SECONDS)
        return None
    except InvalidRequest as exc:  # e.g. a correlation id reused for another action
        return rejected(body, exc, prior + dequeue_count)
    except AppError as exc:
        last_attempt(command, prior + dequeue_count, dequeue_count, None, error_body(exc.code, exc.message))
        raise
    if result.status == 429:
        defer(message, result.retry_after or IN_FLIGHT_DEFER_SECONDS)
        return None
    if not is_final(result.status):
        last_attempt(command, prior + dequeue_count, dequeue_count, result.status, result.body)
        raise TransientUpstreamError(f"Defender answered {result.status}; the host will retry")
    return result_message(command, result, prior + dequeue_count)


class TransientUpstreamError(Exception):
    """Defender answered 5xx: raised so the host retries the message."""


def parse_message(body: bytes) -> dict[str, Any]:
    payload = parse_json_object(body, "The message")
    given = payload.get("correlationId")
    if given is not None and correlation_id(given if isinstance(given, str) else None) != given:
        raise InvalidRequest("correlationId must be 1 to 128 letters, digits or . _ : -", code="InvalidRequestBody")
    attempts = payload.get("attempts", 0)
    return {
        "machineActionId": parse_action_id(payload.get("machineActionId")),
        "comment": parse_comment(payload),
        # A message without one gets one now, so its deferrals and its result share it.
        "correlationId": given or correlation_id(None),
        "attempts": attempts if isinstance(attempts, int) and attempts >= 0 else 0,
    }


def rejected(body: bytes, exc: InvalidRequest, attempts: int) -> dict[str, Any]:
    quoted = redact(body.decode("utf-8", "replace")[:MAX_QUOTED_CHARS])
    try:
        original: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        original = None
    fields = original if isinstance(original, dict) else {}
    answer = error_body(exc.code, exc.message)
    answer["message"] = quoted
    logger.warning("rejected queue message: %s", exc.message)
    return _result(_text(fields.get("correlationId")), _text(fields.get("machineActionId")), None, answer,
                   "rejected", attempts)  # fmt: skip


def result_message(command: CancelCommand, result: CancelResult, attempts: int) -> dict[str, Any]:
    outcome = "cancelled" if 200 <= result.status < 300 else "upstream_rejected"
    message = _result(command.correlation_id, command.action_id, result.status, result.body, outcome, attempts)
    if result.replayed:
        message["replayed"] = True
    return message


def last_attempt(command: CancelCommand, attempts: int, dequeue_count: int, status: int | None, body: Any) -> None:
    """On the last attempt the host allows, send a `failed` result ourselves before raising."""
    settings = get_settings()
    if dequeue_count < settings.max_dequeue_count:
        return
    message = _result(command.correlation_id, command.action_id, status, body, "failed", attempts)
    queue_client(settings.queue_storage, RESULTS_QUEUE).send_message(json.dumps(message))


def defer(message: dict[str, Any], seconds: int) -> None:
    """Send the message again, visible in `seconds`; this invocation then ends cleanly."""
    again = {**message, "attempts": int(message.get("attempts", 0)) + 1}
    delay = max(1, min(int(seconds), MAX_VISIBILITY_SECONDS))
    queue_client(get_settings().queue_storage, QUEUE).send_message(json.dumps(again), visibility_timeout=delay)
    logger.info("deferred %s by %d s (correlation %s)", message["machineActionId"], delay, message["correlationId"])


def _result(
    correlation: str | None, action_id: str | None, status: int | None, body: Any, outcome: str, attempts: int
) -> dict[str, Any]:
    return {
        "correlationId": correlation,
        "machineActionId": action_id,
        "status": status,
        "body": body,
        "outcome": outcome,
        "attempts": attempts,
        "completedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
