"""The queue's messages, typed: parsed once at the edge, written by `to_json()` in one place.

In: a cancel (`QueueCancel`: a caller's message, a deferred copy of one, or a bulk job's child) or
a bulk job (`BulkJobMessage`: a caller's, a deferred copy, or a job's continuation). Out: a `Result`
for one cancel (or a message we could not take), a `ListingResult` for a job whose listing Defender
refused, and a `Summary` (or a part of one) for a bulk job. Every `outcome` is a shared.outcomes word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from shared.cancel.commands import BulkRequest, CancelCommand
from shared.idempotency.keys import queue_key
from shared.outcomes import Outcome


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Message:
    """A message's JSON: its fields in the contract's names, optional ones only when set."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True, kw_only=True)
class QueueCancel(Message):
    """A valid cancel message: what to cancel, and where its idempotency key comes from."""

    action_id: str
    comment: str
    correlation_id: str | None  # as given; None when the message had none
    message_id: str  # the first delivery's queue message id (kept by deferred copies)
    attempts: int = 0  # deliveries of earlier copies (deferrals)
    tenant_ref: str | None = None  # as given: a TENANTS name or id; None is the home tenant
    verify: bool = False
    bulk_job: str | None = None  # a child of a bulk job (shared.faces.bulk_queue): its outcome goes to the job

    @property
    def reported_correlation(self) -> str:
        return self.correlation_id or self.message_id

    def command(self) -> CancelCommand:
        key = queue_key(self.correlation_id, self.action_id, self.message_id)
        source = "bulk" if self.bulk_job else "queue"
        return CancelCommand(
            self.action_id, self.comment, self.reported_correlation, source, idempotency_key=key, verify=self.verify
        )

    def again(self, deliveries: int) -> QueueCancel:
        """The copy to send again: the same key, and every delivery counted."""
        return replace(self, attempts=self.attempts + deliveries)

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"machineActionId": self.action_id, "comment": self.comment}
        if self.attempts:
            message["attempts"] = self.attempts
        if self.correlation_id:
            message["correlationId"] = self.correlation_id
        else:
            message["messageId"] = self.message_id
        if self.tenant_ref is not None:
            message["tenantId"] = self.tenant_ref
        if self.verify:
            message["verify"] = True
        if self.bulk_job:
            message["bulkJob"] = self.bulk_job
        return message


@dataclass(frozen=True, kw_only=True)
class BulkJobMessage(Message):
    """A bulk job message: a caller's, its deferred copy, or a job's continuation (`bulk_round`)."""

    request: BulkRequest
    correlation_id: str | None = None  # as given
    message_id: str | None = None  # carried by a deferred copy without a correlation id
    tenant_ref: str | None = None
    attempts: int = 0
    bulk_round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        request = self.request
        message: dict[str, Any] = {"machineId": request.machine_id, "comment": request.comment}
        optional = {
            "types": list(request.types) or None,
            "dryRun": request.dry_run or None,
            "verify": request.verify or None,
            "correlationId": self.correlation_id,
            "messageId": None if self.correlation_id else self.message_id,
            "tenantId": self.tenant_ref,
            "attempts": self.attempts or None,
            "bulkRound": self.bulk_round,
        }
        return {**message, **{name: value for name, value in optional.items() if value is not None}}


@dataclass(frozen=True, kw_only=True)
class Result(Message):
    """The result of one cancel message (or of a message we could not take, or a job that failed)."""

    correlation_id: str | None
    action_id: str | None
    tenant_id: str | None
    status: int | None
    body: Any
    outcome: Outcome
    attempts: int
    replayed: bool = False
    verified_status: str | None = None
    completed_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "correlationId": self.correlation_id,
            "machineActionId": self.action_id,
            "tenantId": self.tenant_id,
            "status": self.status,
            "body": self.body,
            "outcome": str(self.outcome),
            "attempts": self.attempts,
            "completedAt": self.completed_at,
        }
        if self.replayed:
            message["replayed"] = True
        if self.verified_status is not None:
            message["verifiedStatus"] = self.verified_status
        return message


@dataclass(frozen=True, kw_only=True)
class ListingResult(Message):
    """A bulk job whose listing Defender refused: its answer, in place of a summary."""

    correlation_id: str
    machine_id: str
    tenant_id: str
    status: int
    body: Any
    outcome: Outcome
    completed_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return {
            "correlationId": self.correlation_id,
            "machineId": self.machine_id,
            "tenantId": self.tenant_id,
            "status": self.status,
            "body": self.body,
            "outcome": str(self.outcome),
            "completedAt": self.completed_at,
        }


@dataclass(frozen=True, kw_only=True)
class Summary(Message):
    """A bulk job's summary (`counts`: machineId, found, the counts and `actions`), or part of one."""

    correlation_id: str
    tenant_id: str
    counts: dict[str, Any]
    replayed: bool = False
    part: int | None = None
    parts: int | None = None
    completed_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "correlationId": self.correlation_id,
            "tenantId": self.tenant_id,
            "outcome": str(Outcome.COMPLETED),
            **self.counts,
            "completedAt": self.completed_at,
        }
        if self.replayed:
            message["replayed"] = True
        if self.part is not None:
            message.update(part=self.part, parts=self.parts)
        return message
