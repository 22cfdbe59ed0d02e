"""The cancel service both triggers share: idempotency, quota, upstream call, audit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from shared import defender, logs
from shared.audit import AuditLog, AuditRecord
from shared.defender import DefenderClient, QuotaGate
from shared.errors import (
    AppError,
    OutcomeUnknown,
    QuotaExceeded,
    StateStoreUnavailable,
    UpstreamUnavailable,
    error_body,
)
from shared.tenants import HOME, Tenant
from shared.validation import CancelCommand

FINAL_STATUSES = frozenset({"Succeeded", "Failed", "TimeOut", "Cancelled"})  # Defender's, for an action
VERIFIED_ANSWERS = frozenset({200, 400})  # cancelled, or "already final": worth reading back
FIRST_POLL_SECONDS = 0.5
MAX_POLL_SECONDS = 4.0
# Verify reads may fill at most this part of every get window: the rest is kept for the read-back of
# a taken-over key, which guards at-most-once and must never starve behind them (invariant 6 of
# shared.ratelimit).
VERIFY_READ_SHARE = 0.8


@dataclass(frozen=True)
class StoredAnswer:
    """An answer kept for an idempotency key: replay it."""

    status: int
    body: Any


@dataclass(frozen=True)
class Claim:
    """The right to call Defender for `key`, as long as the record is still at `etag`."""

    key: str
    action_id: str
    etag: str
    abandoned: bool = False  # taken over from a holder that died: what it did must be read first


UNKNOWN_STATUS = 502
UNKNOWN_CODE = "OutcomeUnknown"


def outcome_unknown() -> StoredAnswer:
    """The answer of a key whose holder died after it may have reached Defender, when Defender's
    state cannot tell what it did."""
    return StoredAnswer(
        UNKNOWN_STATUS,
        error_body(
            UNKNOWN_CODE,
            "An earlier request with this key stopped after it may have reached Defender, before its answer "
            "was recorded. Defender may have cancelled the action: read its status before trying again "
            "with a new key.",
        ),
    )


class AnswerStore(Protocol):
    """Idempotency records, as the service sees them (Table Storage: shared.idempotency, imported
    only when the app is built, so a cold start does not load azure-data-tables)."""

    lease_seconds: float

    def claim(self, key: str, action_id: str) -> StoredAnswer | Claim: ...

    def complete(self, claim: Claim, status: int, body: Any) -> None: ...

    def release(self, claim: Claim) -> None: ...

    def abandon(self, claim: Claim) -> None: ...


@dataclass(frozen=True)
class CancelResult:
    """Defender's answer, passed through unchanged (or replayed from an idempotency record)."""

    status: int
    body: Any
    retry_after: int | None = None
    request_id: str | None = None
    attempts: int = 0
    replayed: bool = False
    verified_status: str | None = None  # with verify: the action's status as read back (or "Unverified")
    verified_body: Any = None  # ... and Defender's answer to that read


def settles(status: int) -> bool:
    """An answer that settles a key: everything but Defender refusing before it acted (429, 503).
    A 500 or a gateway's 502/504 may come after Defender cancelled: it is kept, never sent again."""
    return status not in defender.REFUSED_BEFORE_ACTING


class CancelService:
    def __init__(
        self,
        defender: DefenderClient,
        audit: AuditLog,
        gate: QuotaGate | None = None,
        answers: AnswerStore | None = None,
        budget_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
        tenant: Tenant | None = None,
        reads: QuotaGate | None = None,
        verify_seconds: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._tenant = tenant or Tenant(HOME, HOME, home=True)
        self._defender = defender
        self._reads = reads  # the get quota, for verify
        self._verify_seconds = verify_seconds
        self._sleep = sleep
        self._audit = audit
        self._gate = gate
        self._answers = answers
        self._budget = budget_seconds
        self._monotonic = monotonic

    @property
    def defender(self) -> DefenderClient:
        return self._defender

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
                self._log(self._fields(command, started, "refused", error_code=exc.code, event="refusal"), level)
                exc.recorded = True  # the faces do not record it again
            raise
        if result.replayed:
            self._log(self._fields(command, started, "replayed", status=result.status, event="replay"))
        if command.verify and result.status in VERIFIED_ANSWERS:
            verified = self.verify(command.action_id, result)
            self._log(self._fields(command, started, str(verified.verified_status), status=result.status,
                                   event="verify"))  # fmt: skip
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
                    action_id, self._reads, max(0.0, deadline - self._monotonic()), share=VERIFY_READ_SHARE
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
            reply = self._defender.get_action(held.action_id, self._reads, max_wait)
        except AppError:  # no slot, no token, no answer, a body of the wrong shape: nothing known yet
            answers.abandon(held)
            raise
        if reply.status == 200:  # a MachineAction of this id (the client checked its shape)
            body = reply.body
            if body.get("cancellationDateTimeUtc") or body.get("status") == "Cancelled":
                return CancelResult(200, body, replayed=True)
            return None  # no cancel took effect: sending cannot cancel twice (a final action gets 400)
        if reply.status in defender.REFUSED_BEFORE_ACTING or reply.status >= 500:
            answers.abandon(held)
            if reply.status == 429:
                wait = reply.retry_after or defender.DEFAULT_RETRY_AFTER_SECONDS
                raise QuotaExceeded("Defender throttled the read of a taken-over key", wait_seconds=wait)
            raise UpstreamUnavailable(f"Defender answered {reply.status} to the read of a taken-over key")
        unknown = outcome_unknown()
        return CancelResult(unknown.status, unknown.body, replayed=True)

    def _scoped(self, key: str | None) -> str | None:
        """Idempotency keys are scoped by tenant: one caller's key in two tenants is two cancels.
        The home tenant's keys keep their old form, so an upgrade replays what it stored."""
        if key is None or self._tenant.home:
            return key
        return f"tenant|{self._tenant.id}|{key}"

    def _call(self, command: CancelCommand, max_wait: float, fence: float | None) -> CancelResult:
        started = self._monotonic()
        attempts = 0

        def on_send() -> None:
            nonlocal attempts
            if fence is not None and self._monotonic() > fence:
                raise StateStoreUnavailable("The claim on this idempotency key ran out before the send", retry_after=5)
            attempts += 1

        try:
            reply = self._defender.cancel(command.action_id, command.comment, self._gate, max_wait, on_send)
        except AppError as exc:
            if attempts:  # something was (or may have been) sent upstream: that is worth a record
                self._record(self._fields(command, started, outcome=type(exc).__name__, attempts=attempts,
                                          error_code=exc.code))  # fmt: skip
                exc.recorded = True
            raise
        self._record(self._fields(command, started, outcome=_outcome(reply.status), status=reply.status,
                                  attempts=reply.attempts, request_id=reply.request_id, waited_ms=reply.waited_ms,
                                  upstream_ms=reply.upstream_ms))  # fmt: skip
        return CancelResult(reply.status, reply.body, reply.retry_after, reply.request_id, reply.attempts)

    def _fields(
        self,
        command: CancelCommand,
        started: float,
        outcome: str,
        status: int | None = None,
        attempts: int = 0,
        request_id: str | None = None,
        waited_ms: float = 0.0,
        upstream_ms: float = 0.0,
        error_code: str = "",
        event: str = "cancel",
    ) -> AuditRecord:
        return AuditRecord(
            action_id=command.action_id,
            source=command.source,
            comment=command.comment,
            correlation_id=command.correlation_id,
            upstream_status=status,
            outcome=outcome,
            duration_ms=(self._monotonic() - started) * 1000,
            attempts=attempts,
            request_id=request_id,
            tenant_id=self._tenant.id,
            caller=command.caller,
            waited_ms=waited_ms,
            upstream_ms=upstream_ms,
            error_code=error_code,
            event=event,
        )

    def _record(self, record: AuditRecord) -> None:
        """A request that reached (or may have reached) Defender: a log record and an audit row."""
        logs.record(record.fields())
        self._audit.record(record)

    @staticmethod
    def _log(record: AuditRecord, level: int = logging.INFO) -> None:
        """A request that sent nothing new (refused, replayed) or a read back: a log record only."""
        logs.record(record.fields(), level)


def _outcome(status: int) -> str:
    if 200 <= status < 300:
        return "cancelled"
    if status == 429:
        return "throttled"
    if status >= 500:
        return "upstream_error"
    return "rejected_by_upstream"
