"""The audit trail: one Table Storage record per cancel that reached (or tried to reach) Defender.

Rows are partitioned by machine action id, newest first, so "what happened to action X" is one
partition query. An audit write that fails is logged, not raised: the cancel already happened and
its answer must still reach the caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.storage import recreating_table
from shared.validation import MAX_COMMENT_CHARS

if TYPE_CHECKING:
    from azure.data.tables import TableClient

logger = logging.getLogger(__name__)

_TICKS_MAX = 10**19


@dataclass(frozen=True)
class AuditRecord:
    """What happened to one cancel request: a row here when it reached Defender, and, for every
    request (refusals too), one structured log record with the same fields (shared.logs)."""

    action_id: str
    source: str  # "http", "queue" or "bulk"
    comment: str
    correlation_id: str
    upstream_status: int | None
    outcome: str
    duration_ms: float
    attempts: int
    request_id: str | None = None
    tenant_id: str = "home"  # the directory acted in (shared.tenants)
    caller: str = ""  # whose request: "function-key", "principal:<ids>" or "queue"
    waited_ms: float = 0.0  # for a slot of the quota
    upstream_ms: float = 0.0  # from the first send to Defender's answer
    error_code: str = ""  # our error's code, when there was no answer from Defender
    event: str = "cancel"  # "cancel" (sent), "replay", "refusal" (nothing sent), "verify"

    def fields(self) -> dict[str, Any]:
        """The record's fields, under the names the audit table and the log queries use."""
        return {
            "Event": self.event,
            "ActionId": self.action_id,
            "Source": self.source,
            "TenantId": self.tenant_id,
            "Caller": self.caller,
            "CorrelationId": self.correlation_id,
            "Outcome": self.outcome,
            "UpstreamStatus": self.upstream_status if self.upstream_status is not None else -1,
            "Attempts": self.attempts,
            "WaitedMs": round(self.waited_ms, 3),
            "UpstreamMs": round(self.upstream_ms, 3),
            "DurationMs": round(self.duration_ms, 3),
            "UpstreamRequestId": self.request_id or "",
            "ErrorCode": self.error_code,
        }


class AuditLog:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def record(self, record: AuditRecord) -> None:
        entity = to_entity(record)
        try:
            recreating_table(self._table, lambda: self._table.create_entity(entity))
        except Exception as exc:  # noqa: BLE001 - any storage failure; the caller's answer comes first
            logger.error(
                "audit write failed (%s) for action %s, correlation %s",
                type(exc).__name__,
                record.action_id,
                record.correlation_id,
            )


def to_entity(record: AuditRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    # Inverted time in the RowKey lists an action's newest records first.
    inverted = _TICKS_MAX - int(now * 1_000_000)
    return {
        "PartitionKey": record.action_id,
        "RowKey": f"{inverted:020d}-{uuid.uuid4().hex[:12]}",
        **record.fields(),
        "Comment": record.comment[:MAX_COMMENT_CHARS],
        "At": datetime.fromtimestamp(now, tz=UTC),
    }
