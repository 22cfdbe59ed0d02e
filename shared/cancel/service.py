"""The cancel service both triggers share: idempotency, quota, upstream call, audit.

It sees its collaborators as ports: the Defender client (which owns each API's quota), the
idempotency records (AnswerStore, shared.idempotency.table in production) and the audit trail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any, Protocol

from shared import logs
from shared.cancel.commands import CancelCommand
from shared.config.tenants import HOME, Tenant
from shared.defender.client import DefenderClient
from shared.defender.retry import DEFAULT_RETRY_AFTER_SECONDS, REFUSED_BEFORE_ACTING
from shared.errors import (
    AppError,
    OutcomeUnknown,
    QuotaExceeded,
    StateStoreUnavailable,
    UpstreamUnavailable,
    error_body,
)
from shared.formats import FINAL_STATUSES
from shared.idempotency.keys import in_tenant
from shared.idempotency.record import Claim, StoredAnswer, outcome_unknown
from shared.logs import AuditRecord
from shared.outcomes import Outcome, of_answer

VERIFIED_ANSWERS = frozenset({200, 400})  # cancelled, or "already final": worth reading back
FIRST_POLL_SECONDS = 0.5
MAX_POLL_SECONDS = 4.0
# Verify reads may fill at most this part of every get window: the rest is kept for the read-back of
# a taken-over key, which guards at-most-once and must never starve behind them (invariant 6 of
# shared.ratelimit.limiter).
VERIFY_READ_SHARE = 0.8


class AnswerStore(Protocol):
    """Idempotency records, as the service sees them (Table Storage: shared.idempotency.table,
    imported only when the app is built, so a cold start does not load azure-data-tables)."""

    lease_seconds: float

    def claim(self, key: str, action_id: str) -> StoredAnswer | Claim: ...

    def complete(self, claim: Claim, status: int, body: Any) -> None: ...

    def release(self, claim: Claim) -> None: ...

    def abandon(self, claim: Claim) -> None: ...


class AuditTrail(Protocol):
    """Where a request that reached Defender is recorded (shared.storage.audit.AuditLog)."""

    def record(self, record: AuditRecord) -> None: ...


@dataclass(frozen=True)
class CancelResult:
    """Defender's answer, passed through unchanged (or replayed from an idempotency record)."""

    status: int
    body: Any
    _: KW_ONLY
    retry_after: int | None = None
    request_id: str | None = None
    attempts: int = 0
    replayed: bool = False
    verified_status: str | None = None  # with verify: the action's status as read back (or "Unverified")
    verified_body: Any = None  # ... and Defender's answer to that read


def settles(status: int) -> bool:
    """An answer that settles a key: everything but Defender refusing before it acted (429, 503).
    A 500 or a gateway's 502/504 may come after Defender cancelled: it is kept, never sent again."""
    return status not in REFUSED_BEFORE_ACTING


class CancelService:
    def __init__(
        self,
        defender: DefenderClient,
        audit: AuditTrail,
        *,
        answers: AnswerStore | None = None,
        budget_seconds: float = 30.0,
        tenant: Tenant | None = None,
        verify_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._tenant = tenant or Tenant(HOME, HOME, home=True)
        self._defender = defender
        self._verify_seconds = verify_seconds
        self._sleep = sleep
        self._audit = audit
        self._answers = answers
        self._budget = budget_seconds
        self._monotonic = monotonic

    def cancel(self, command: CancelCommand, max_wait: float = 0.0) -> CancelResult:
        """Cancel one machine action, at most once per idempotency key; with `command.verify`, then
        read it back until it is final or VERIFY_SECONDS pass.

        Raises AppError subclasses when Defender gave no answer (quota, state store, network). Every
        request leaves one structured log record (shared.logs): sent, replayed, or refused."""
        started = self._monotonic()
        try:
            result = self._cancel_once(command, max_wait)
        except AppError as exc:
            if not exc.recorded:  # refused before anything was sent
                level = logging.WARNING if exc.status >= 500 else logging.INFO  # fail-closed and token: warnings
                refusal = self._fields(command, started, Outcome.REFUSED, error_code=exc.code, event="refusal")
                self._log(refusal, level)
                exc.recorded = True  # the faces do not record it again
            raise
        if result.replayed:
            self._log(self._fields(command, started, Outcome.REPLAYED, upstream_status=result.status, event="replay"))
        if command.verify and result.status in VERIFIED_ANSWERS:
            verified = self.verify(command.action_id, result)
            read = str(verified.verified_status)
            fields: dict[str, Any] = {"upstream_status": result.status, "event": "verify", "verified_status": read}
            self._log(self._fields(command, started, Outcome.VERIFIED, **fields))
            return verified
        return result

    def verify(self, action_id: str, result: CancelResult, until: float | None = None) -> CancelResult:
        """What Defender really ended with: a cancel can race the action's own end, and a 200 does
        not mean the action is Cancelled yet. Reads on the get quota, backing off 0.5 s to 4 s, for
        VERIFY_SECONDS (or until `until`, a monotonic time, when that comes first)."""
        deadline = self._monotonic() + self._verify_seconds
        deadline = deadline if until is None else min(deadline, until)
        pause, status, body = FIRST_POLL_SECONDS, "Unverified", None
        while True:
            try:
                reply = self._defender.get_action(
                    action_id, max_wait=max(0.0, deadline - self._monotonic()), share=VERIFY_READ_SHARE
                )
            except AppError as exc:  # no slot in time, or no answer: unverified
                body = error_body(exc.code, exc.message)
                break
            body = reply.body
            read = body.get("status") if reply.status == 200 and isinstance(body, dict) else None
            if read is None:  # e.g. 403: the app lacks Machine.Read.All; Defender's answer says so
                break
            status = str(read)
            if status in FINAL_STATUSES or self._monotonic() + pause > deadline:
                break
            self._sleep(pause)
            pause = min(pause * 2, MAX_POLL_SECONDS)
        return replace(result, verified_status=status, verified_body=body)

    def _cancel_once(self, command: CancelCommand, max_wait: float) -> CancelResult:
        key = self._scoped(command.idempotency_key)
        if key is None or self._answers is None:
            return self._call(command, max_wait, None)
        # The lease is counted from before the claim is written (the store stamps it later, and a
        # taker judges it by the store's clock), so a slow write shortens this holder's time, never
        # the taker's wait. The send must start while the lease can still cover Defender's budget.
        fence = self._monotonic() + self._answers.lease_seconds - self._budget
        held = self._answers.claim(key, command.action_id)
        if isinstance(held, StoredAnswer):
            return CancelResult(held.status, held.body, replayed=True)
        if held.abandoned:
            known = self._what_the_dead_holder_did(self._answers, held, max_wait)
            if known is not None:
                self._answers.complete(held, known.status, known.body)
                return known
        # A wait that would outlast the fence is a quota answer (429, a deferral), not a lapsed claim.
        max_wait = max(0.0, min(max_wait, fence - self._monotonic()))
        try:
            result = self._call(command, max_wait, fence)
        except OutcomeUnknown as exc:  # it may have acted: the key keeps this answer
            self._answers.complete(held, exc.status, error_body(exc.code, exc.message))
            raise
        except BaseException:
            self._answers.release(held)  # nothing was sent: a retry may call Defender
            raise
        if settles(result.status):
            self._answers.complete(held, result.status, result.body)
        else:
            self._answers.release(held)
        return result

    def _what_the_dead_holder_did(self, answers: AnswerStore, held: Claim, max_wait: float) -> CancelResult | None:
        """A holder died after its claim, and its lease ran out: whatever it sent has arrived by now
        (sends start within lease minus budget, and the budget ends them). Only Defender's record of
        the action may let this request send: cancellation fields set, the dead holder's cancel took
        effect (replay that); a MachineAction without them, it never did (None: send). The read
        waits for the get quota like the cancel would, ahead of verify reads (VERIFY_READ_SHARE).
        A read that could not be made or tells nothing now (no slot, Defender's 429 or 5xx, a body
        of the wrong shape) hands the key back, still to be read first, and raises; a refusal that
        will not change (no Machine.Read.All: 403) settles the key as outcome unknown."""
        try:
            reply = self._defender.get_action(held.action_id, max_wait=max_wait)
        except AppError:  # no slot, no token, no answer, a body of the wrong shape: nothing known yet
            answers.abandon(held)
            raise
        if reply.status == 200:  # a MachineAction of this id (the client checked its shape)
            body = reply.body
            if body.get("cancellationDateTimeUtc") or body.get("status") == "Cancelled":
                return CancelResult(200, body, replayed=True)
            return None  # no cancel took effect: sending cannot cancel twice (a final action gets 400)
        if reply.status in REFUSED_BEFORE_ACTING or reply.status >= 500:
            answers.abandon(held)
            if reply.status == 429:
                wait = reply.retry_after or DEFAULT_RETRY_AFTER_SECONDS
                raise QuotaExceeded("Defender throttled the read of a taken-over key", wait_seconds=wait)
            raise UpstreamUnavailable(f"Defender answered {reply.status} to the read of a taken-over key")
        unknown = outcome_unknown()
        return CancelResult(unknown.status, unknown.body, replayed=True)

    def _scoped(self, key: str | None) -> str | None:
        return None if key is None else in_tenant(key, self._tenant.id, self._tenant.home)

    def _call(self, command: CancelCommand, max_wait: float, fence: float | None) -> CancelResult:
        started = self._monotonic()
        attempts = 0

        def on_send() -> None:
            nonlocal attempts
            if fence is not None and self._monotonic() > fence:
                raise StateStoreUnavailable("The claim on this idempotency key ran out before the send", retry_after=5)
            attempts += 1

        try:
            reply = self._defender.cancel(command.action_id, command.comment, max_wait=max_wait, on_send=on_send)
        except AppError as exc:
            if attempts:  # something was (or may have been) sent upstream: that is worth a record
                self._record(self._fields(command, started, Outcome.FAILED, attempts=attempts, error_code=exc.code))
                exc.recorded = True
            raise
        sent: dict[str, Any] = {
            "upstream_status": reply.status,
            "attempts": reply.attempts,
            "request_id": reply.request_id,
            "waited_ms": reply.waited_ms,
            "upstream_ms": reply.upstream_ms,
        }
        self._record(self._fields(command, started, of_answer(reply.status), **sent))
        return CancelResult(
            reply.status,
            reply.body,
            retry_after=reply.retry_after,
            request_id=reply.request_id,
            attempts=reply.attempts,
        )

    def _fields(self, command: CancelCommand, started: float, outcome: Outcome, **fields: Any) -> AuditRecord:
        """The record of this request: who, what, how long, and `fields` (AuditRecord's own names)."""
        return AuditRecord(
            action_id=command.action_id,
            source=command.source,
            comment=command.comment,
            correlation_id=command.correlation_id,
            outcome=outcome,
            duration_ms=(self._monotonic() - started) * 1000,
            tenant_id=self._tenant.id,
            caller=command.caller,
            **fields,
        )

    def _record(self, record: AuditRecord) -> None:
        """A request that reached (or may have reached) Defender: a log record and an audit row."""
        logs.record(record.fields())
        self._audit.record(record)

    @staticmethod
    def _log(record: AuditRecord, level: int = logging.INFO) -> None:
        """A request that sent nothing new (refused, replayed) or a read back: a log record only."""
        logs.record(record.fields(), level)
