"""The cancel service both triggers share: idempotency, quota, upstream call, audit."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.audit import AuditLog, AuditRecord
from shared.defender import DefenderClient
from shared.errors import AppError
from shared.validation import CancelCommand

if TYPE_CHECKING:
    from shared.idempotency import StoredAnswer

logger = logging.getLogger(__name__)


class QuotaGate(Protocol):
    """The shared rate limiter, as the service sees it."""

    def acquire(self, max_wait: float) -> None:
        """Return when a call may be sent now; raise QuotaExceeded or StateStoreUnavailable."""

    def throttled(self, retry_after: int) -> None:
        """Defender answered 429 anyway: hold every instance off for `retry_after` seconds."""


class AnswerStore(Protocol):
    """Idempotency records, as the service sees them (see shared.idempotency)."""

    def claim(self, key: str, action_id: str) -> StoredAnswer | None: ...

    def complete(self, key: str, action_id: str, status: int, body: Any) -> None: ...

    def release(self, key: str) -> None: ...


@dataclass(frozen=True)
class CancelResult:
    """Defender's answer, passed through unchanged (or replayed from an idempotency record)."""

    status: int
    body: Any
    retry_after: int | None = None
    request_id: str | None = None
    attempts: int = 0
    replayed: bool = False


def is_final(status: int) -> bool:
    """An answer worth replaying: not throttled, not a server failure a retry could change."""
    return status != 429 and status < 500


class CancelService:
    def __init__(
        self,
        defender: DefenderClient,
        audit: AuditLog,
        gate: QuotaGate | None = None,
        answers: AnswerStore | None = None,
    ) -> None:
        self._defender = defender
        self._audit = audit
        self._gate = gate
        self._answers = answers

    def cancel(self, command: CancelCommand, max_wait: float = 0.0) -> CancelResult:
        """Cancel one machine action, at most once per idempotency key.

        Raises AppError subclasses when Defender gave no answer (quota, state store, network)."""
        key = command.idempotency_key
        if key is None or self._answers is None:
            return self._call(command, max_wait)
        stored = self._answers.claim(key, command.action_id)
        if stored is not None:
            return CancelResult(stored.status, stored.body, replayed=True)
        try:
            result = self._call(command, max_wait)
        except BaseException:
            self._answers.release(key)  # no answer: a retry may call Defender
            raise
        if is_final(result.status):
            self._answers.complete(key, command.action_id, result.status, result.body)
        else:
            self._answers.release(key)
        return result

    def _call(self, command: CancelCommand, max_wait: float) -> CancelResult:
        started = time.monotonic()
        attempts = 0

        def before_attempt() -> None:
            nonlocal attempts
            if self._gate is not None:
                self._gate.acquire(max_wait if attempts == 0 else 0.0)
            attempts += 1

        try:
            reply = self._defender.cancel(command.action_id, command.comment, before_attempt)
        except AppError as exc:
            if attempts:  # something was (or may have been) sent upstream: that is worth a record
                self._record(command, None, type(exc).__name__, started, attempts, None)
            raise
        if reply.status == 429 and self._gate is not None:
            self._gate.throttled(reply.retry_after or 60)
        self._record(command, reply.status, _outcome(reply.status), started, reply.attempts, reply.request_id)
        return CancelResult(reply.status, reply.body, reply.retry_after, reply.request_id, reply.attempts)

    def _record(
        self,
        command: CancelCommand,
        status: int | None,
        outcome: str,
        started: float,
        attempts: int,
        request_id: str | None,
    ) -> None:
        duration_ms = (time.monotonic() - started) * 1000
        logger.info(
            "cancel %s via %s: upstream %s (%s) in %.1f ms, %d attempt(s), correlation %s",
            command.action_id,
            command.source,
            status,
            outcome,
            duration_ms,
            attempts,
            command.correlation_id,
        )
        self._audit.record(
            AuditRecord(
                action_id=command.action_id,
                source=command.source,
                comment=command.comment,
                correlation_id=command.correlation_id,
                upstream_status=status,
                outcome=outcome,
                duration_ms=duration_ms,
                attempts=attempts,
                request_id=request_id,
            )
        )


def _outcome(status: int) -> str:
    if 200 <= status < 300:
        return "cancelled"
    if status == 429:
        return "throttled"
    if status >= 500:
        return "upstream_error"
    return "rejected_by_upstream"
