"""The rate limiter's log in Table Storage: one entity per RATE_LIMIT_KEY, ETag-guarded.

The whole log (at most the longest window's limit of int64 epoch-ms send times, 12 KB for 1500)
is packed in one Edm.Binary property, so one conditional write admits a call.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import EdmType, EntityProperty, UpdateMode

from shared.errors import StateStoreUnavailable
from shared.ratelimit.rule import Conflict, Snapshot
from shared.storage.clients import recreating_table
from shared.storage.errors import translated

if TYPE_CHECKING:
    from azure.data.tables import TableClient

ROW_KEY = "sliding-log"
MAX_ENTRIES = (64 * 1024 - 8) // 8  # Edm.Binary holds up to 64 KiB
WHAT = "the rate limit state"
RETRY_AFTER_TOO_LARGE = 60  # not a store that is down: a log this long needs other settings


def pack(log: Sequence[int], blocked_until: int) -> bytes:
    return struct.pack(f"<q{len(log)}q", blocked_until, *log)


def unpack(data: bytes) -> tuple[tuple[int, ...], int]:
    values = struct.unpack(f"<{len(data) // 8}q", data)
    return tuple(values[1:]), values[0] if values else 0


class TableSlidingLog:
    def __init__(self, table: TableClient, key: str) -> None:
        self._table = table
        self._key = key

    def read(self) -> Snapshot:
        try:
            with translated(WHAT):
                entity = self._table.get_entity(self._key, ROW_KEY)
        except ResourceNotFoundError:
            return Snapshot((), 0, None)
        log, blocked_until = unpack(bytes(entity.get("Log") or b""))
        horizon = entity.get("HorizonMs")
        horizon_ms = int(horizon.value if isinstance(horizon, EntityProperty) else horizon or 0)
        return Snapshot(
            log, blocked_until, entity.metadata["etag"], horizon_ms=horizon_ms, writers=str(entity.get("Writers") or "")
        )

    def write(
        self, log: Sequence[int], blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = ""
    ) -> str:
        if len(log) > MAX_ENTRIES:
            raise StateStoreUnavailable(
                "The rate limit log is larger than one entity can hold", retry_after=RETRY_AFTER_TOO_LARGE
            )
        entity: dict[str, Any] = {
            "PartitionKey": self._key,
            "RowKey": ROW_KEY,
            "Log": pack(log, blocked_until),
            "HorizonMs": EntityProperty(horizon_ms, EdmType.INT64),
            "Writers": writers,
        }
        try:
            with translated(WHAT):
                if etag is not None:
                    meta = self._table.update_entity(
                        entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                    )
                else:
                    meta = self._create(entity)
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError):
            raise Conflict from None  # changed, created by another, or vanished since we read it: re-read
        return str(meta["etag"])

    def _create(self, entity: dict[str, Any]) -> dict[str, Any]:
        return recreating_table(self._table, lambda: self._table.create_entity(entity))
