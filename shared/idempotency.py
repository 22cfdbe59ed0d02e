"""Idempotency records in Table Storage: one Defender call per key, answers replayed for 24 h.

`claim` inserts the record if absent (create_entity), so of two instances racing on one key only
one wins; the other sees it in flight (409 / a deferral) or, once done, replays the stored answer.
A claim whose holder died is taken over after a lease, with an ETag-guarded replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.errors import InvalidRequest, RequestInProgress, StateStoreUnavailable
from shared.storage import recreating_table

if TYPE_CHECKING:
    from azure.data.tables import TableClient

logger = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600
MAX_BODY_BYTES = 60 * 1024  # Edm.Binary holds 64 KiB
ROW_KEY = "idempotency"


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    body: Any


def _unavailable(exc: AzureError) -> StateStoreUnavailable:
    return StateStoreUnavailable(f"The idempotency records cannot be reached: {type(exc).__name__}", retry_after=5)


class IdempotencyStore:
    def __init__(self, table: TableClient, lease_seconds: float = 360.0, clock: Any = time.time) -> None:
        """`lease_seconds`: after this long an in-flight claim is taken to be abandoned (its holder
        died); it must exceed the function timeout, so a live holder is never overtaken."""
        self._table = table
        self._lease = lease_seconds
        self._clock = clock

    @staticmethod
    def partition(key: str) -> str:
        # Keys are the caller's text; a hash is always a valid PartitionKey.
        return hashlib.sha256(key.encode()).hexdigest()

    def claim(self, key: str, action_id: str) -> StoredAnswer | None:
        """None: the caller now owns the key and must call Defender, then complete or release it."""
        pk = self.partition(key)
        record = {"PartitionKey": pk, "RowKey": ROW_KEY, "ActionId": action_id, "State": "in_flight",
                  "ClaimedAt": self._clock()}  # fmt: skip
        try:
            recreating_table(self._table, lambda: self._table.create_entity(record))
            return None
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise _unavailable(exc) from None
        return self._existing(pk, key, action_id, record)

    def _existing(self, pk: str, key: str, action_id: str, record: dict[str, Any]) -> StoredAnswer | None:
        try:
            entity = self._table.get_entity(pk, ROW_KEY)
        except ResourceNotFoundError:  # released between our insert and read: race for it again
            return self.claim(key, action_id)
        except AzureError as exc:
            raise _unavailable(exc) from None
        now = self._clock()
        answered = entity.get("State") == "done" and now - float(entity.get("CompletedAt", 0)) < TTL_SECONDS
        in_flight = entity.get("State") == "in_flight" and now - float(entity.get("ClaimedAt", 0)) < self._lease
        if (answered or in_flight) and entity.get("ActionId") != action_id:
            raise InvalidRequest("This idempotency key was already used for another machine action")
        if answered:
            return StoredAnswer(int(entity["Status"]), json.loads(bytes(entity["Body"])))
        if in_flight:
            raise RequestInProgress("A request with this idempotency key is still in progress", retry_after=5)
        try:  # expired answer or abandoned claim: take it over, unless someone else just did
            self._table.update_entity(
                record,
                mode=UpdateMode.REPLACE,
                etag=entity.metadata["etag"],
                match_condition=MatchConditions.IfNotModified,
            )
            return None
        except ResourceModifiedError:
            raise RequestInProgress("A request with this idempotency key is in progress", retry_after=5) from None
        except AzureError as exc:
            raise _unavailable(exc) from None

    def complete(self, key: str, action_id: str, status: int, body: Any) -> None:
        """Store Defender's final answer. A failure is logged, not raised: the caller must still get
        the answer; the claim then lapses after its lease."""
        raw = json.dumps(body).encode()
        if len(raw) > MAX_BODY_BYTES:
            raw = json.dumps(
                {"error": {"code": "AnswerTooLarge", "message": "Defender's answer was not stored"}}
            ).encode()
        entity = {"PartitionKey": self.partition(key), "RowKey": ROW_KEY, "ActionId": action_id, "State": "done",
                  "Status": status, "Body": raw, "CompletedAt": self._clock()}  # fmt: skip
        try:
            recreating_table(self._table, lambda: self._table.upsert_entity(entity, mode=UpdateMode.REPLACE))
        except AzureError as exc:
            logger.error("could not store the answer for an idempotency key (%s)", type(exc).__name__)

    def release(self, key: str) -> None:
        """Forget an in-flight claim that got no final answer, so a retry may call Defender."""
        try:
            self._table.delete_entity(self.partition(key), ROW_KEY)
        except AzureError as exc:  # the claim lapses after its lease instead
            logger.error("could not release an idempotency key (%s)", type(exc).__name__)
