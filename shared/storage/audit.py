"""The audit trail: one Table Storage record per cancel that reached (or tried to reach) Defender.

Rows are partitioned by machine action id, newest first, so "what happened to action X" is one
partition query. An audit write that fails is logged, not raised: the cancel already happened and
its answer must still reach the caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.formats import MAX_COMMENT_CHARS
from shared.logs import AuditRecord
from shared.storage.clients import recreating_table

if TYPE_CHECKING:
    from azure.data.tables import TableClient

logger = logging.getLogger(__name__)

_TICKS_MAX = 10**19


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
