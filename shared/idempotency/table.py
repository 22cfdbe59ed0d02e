"""Idempotency records in Table Storage: at most one Defender call per key, answers replayed for 24 h.

`claim` inserts the record if absent (create_entity), so of two instances racing on one key only
one wins; the loser reads the record and does what `decide` (shared.idempotency.record) says: replay
the stored answer, answer "in progress" (409 / a deferral), or take the key over with a conditional
replace. The winner holds a `Claim` (the record's ETag): `complete`, `release` and `abandon` are
conditional on it, so a holder that was overtaken can never overwrite or delete the new holder's
record.

A claim whose holder died (its lease ran out) may have sent its cancel before dying: the next
request takes the key over as an *abandoned* claim, and the service reads Defender's record of the
action before anything else (shared.cancel.service). An answer older than 24 h frees its key.

The lease is judged on the store's clock alone (`store_age`), and the holder counts its lease from
before it wrote the claim. So a slow write or any clock skew between instances can only shorten a
holder's time, never let a taker in while the holder may still send.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.errors import KeyReused, RequestInProgress, error_body
from shared.idempotency.record import UNKNOWN_STATUS, Claim, Decision, IdempotencyRecord, State, StoredAnswer, decide
from shared.storage.clients import recreating_table
from shared.storage.errors import translated

if TYPE_CHECKING:
    from azure.data.tables import TableClient

logger = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600
ROW_KEY = "idempotency"
CHUNK_BYTES = 64 * 1024  # an Edm.Binary property holds 64 KiB
MAX_CHUNKS = 15  # an entity holds 1 MiB; Defender's answers are capped at 1 MiB before compression
COMPLETE_TRIES = 3
COMPLETE_BACKOFF = 0.2
WHAT = "the idempotency records"


def store_age(entity: Mapping[str, Any], date: str | None) -> float | None:
    """Seconds since the store last wrote `entity`, on the store's own clock (its reply's Date less
    the entity's Timestamp); None when either is missing."""
    stamped = getattr(entity, "metadata", {}).get("timestamp")
    if stamped is None or not date:
        return None
    try:
        return float(parsedate_to_datetime(date).timestamp() - stamped.timestamp())
    except (TypeError, ValueError):
        return None


class IdempotencyStore:
    def __init__(
        self,
        table: TableClient,
        *,
        lease_seconds: float = 360.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        age: Callable[[Mapping[str, Any], str | None], float | None] = store_age,
    ) -> None:
        """`lease_seconds`: after this long (on the store's clock: `age`) an in-flight claim is taken
        to be abandoned (its holder died); settings make it longer than any live holder's wait plus
        Defender's budget. `clock` stamps answers for their 24 h."""
        self._table = table
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._sleep = sleep
        self._age = age

    @staticmethod
    def partition(key: str) -> str:
        # Keys are the caller's text; a hash is always a valid PartitionKey.
        return hashlib.sha256(key.encode()).hexdigest()

    def claim(self, key: str, action_id: str) -> StoredAnswer | Claim:
        """A Claim: the caller now owns the key and must call Defender, then complete or release it.
        A StoredAnswer: replay it. Raises RequestInProgress, InvalidRequest, StateStoreUnavailable."""
        entity = self._in_flight(key, action_id)
        try:
            with translated(WHAT):
                meta = recreating_table(self._table, lambda: self._table.create_entity(entity))
            return Claim(key, action_id, str(meta["etag"]))
        except ResourceExistsError:
            return self._existing(key, action_id)

    def _in_flight(self, key: str, action_id: str, state: State = State.IN_FLIGHT) -> dict[str, Any]:
        return {
            "PartitionKey": self.partition(key),
            "RowKey": ROW_KEY,
            "ActionId": action_id,
            "State": str(state),
            "ClaimedAt": self._clock(),
        }

    def _existing(self, key: str, action_id: str) -> StoredAnswer | Claim:
        date: dict[str, str] = {}
        try:
            with translated(WHAT):
                entity = self._table.get_entity(
                    self.partition(key),
                    ROW_KEY,
                    raw_response_hook=lambda r: date.update(d=r.http_response.headers["Date"]),
                )
        except ResourceNotFoundError:  # released between our insert and read: race for it again
            return self.claim(key, action_id)
        record = self._record(entity, date.get("d"))
        decision = decide(record, action_id, self._clock(), self.lease_seconds, TTL_SECONDS)
        if decision is Decision.REUSED:
            raise KeyReused("This idempotency key was already used for another machine action")
        if decision is Decision.REPLAY:
            return StoredAnswer(int(entity["Status"]), unpack_body(entity))  # unpacked only to replay
        if decision is Decision.IN_PROGRESS:
            raise RequestInProgress("A request with this idempotency key is still in progress", retry_after=5)
        # A holder that died (maybe after sending), or a key handed back unread: read what it did first.
        etag = self._replace(self._in_flight(key, action_id), str(entity.metadata["etag"]))
        return Claim(key, action_id, etag, abandoned=decision is Decision.TAKE_OVER)

    def _record(self, entity: Mapping[str, Any], date: str | None) -> IdempotencyRecord:
        """The entity as the decision sees it (its age on the store's clock)."""
        try:
            state: State | None = State(str(entity.get("State")))
        except ValueError:
            state = None
        return IdempotencyRecord(
            state=state,
            action_id=str(entity.get("ActionId")),
            age=self._age(entity, date),
            completed_at=float(entity.get("CompletedAt", 0)),
        )

    def _replace(self, entity: dict[str, Any], etag: str) -> str:
        """Replace the record if it is still at `etag`; its new ETag. Someone else first: 409."""
        try:
            with translated(WHAT):
                meta = self._table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            return str(meta["etag"])
        except (ResourceModifiedError, ResourceNotFoundError):
            raise RequestInProgress("A request with this idempotency key is in progress", retry_after=5) from None

    def _done(self, key: str, action_id: str, status: int, body: Any) -> dict[str, Any]:
        packed = pack_body(body)
        if packed is None:  # replay an honest error, never Defender's status with a stand-in body
            note = error_body("AnswerNotStored", f"Defender answered {status}; its answer was too large to keep")
            status, packed = UNKNOWN_STATUS, pack_body(note) or {}
        return {
            "PartitionKey": self.partition(key),
            "RowKey": ROW_KEY,
            "ActionId": action_id,
            "State": str(State.DONE),
            "Status": status,
            "CompletedAt": self._clock(),
            **packed,
        }

    def complete(self, claim: Claim, status: int, body: Any) -> None:
        """Store Defender's answer for the claimed key, if the claim still holds; retried a few times.
        Never raises: the caller must still get the answer. If every try fails, the claim stays in
        flight and, after its lease, the next request reads what became of the action."""
        entity = self._done(claim.key, claim.action_id, status, body)
        for attempt in range(COMPLETE_TRIES):
            try:
                self._table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=claim.etag, match_condition=MatchConditions.IfNotModified
                )
                return
            except ResourceModifiedError:
                logger.warning("an idempotency claim was taken over before its answer was stored")
                return
            except ResourceNotFoundError:  # the record was lost: store the answer unless someone claimed anew
                try:
                    recreating_table(self._table, lambda: self._table.create_entity(entity))
                except ResourceExistsError:
                    logger.warning("an idempotency key was claimed anew before its answer was stored")
                except AzureError as exc:
                    logger.error("could not store the answer for an idempotency key (%s)", type(exc).__name__)
                return
            except AzureError as exc:
                logger.warning("storing an idempotency answer failed (%s), try %d", type(exc).__name__, attempt + 1)
                if attempt + 1 < COMPLETE_TRIES:
                    self._sleep(COMPLETE_BACKOFF * 2**attempt)
        logger.error("could not store the answer for an idempotency key; it settles as unknown after its lease")

    def release(self, claim: Claim) -> None:
        """Forget a claim that reached no one (nothing was sent), if it still holds, so a retry may
        call Defender."""
        try:
            self._table.delete_entity(
                self.partition(claim.key), ROW_KEY, etag=claim.etag, match_condition=MatchConditions.IfNotModified
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            pass  # taken over or gone: not ours to delete
        except AzureError as exc:  # the claim lapses after its lease instead
            logger.error("could not release an idempotency key (%s)", type(exc).__name__)

    def abandon(self, claim: Claim) -> None:
        """Hand a taken-over key back unread (no read of Defender could be made now), if the claim
        still holds: the next request takes it over at once and reads first. If this fails too, the
        claim lapses after its lease, to the same effect."""
        entity = self._in_flight(claim.key, claim.action_id, State.ABANDONED)
        try:
            self._table.update_entity(
                entity, mode=UpdateMode.REPLACE, etag=claim.etag, match_condition=MatchConditions.IfNotModified
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            pass  # taken over or gone: not ours to hand back
        except AzureError as exc:
            logger.error("could not hand back an idempotency key (%s)", type(exc).__name__)


def pack_body(body: Any) -> dict[str, bytes | int] | None:
    """The answer's JSON, compressed, in as many 64 KiB binary properties as it needs; None when
    more than one entity can hold."""
    raw = zlib.compress(json.dumps(body).encode(), 6)
    chunks = [raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)]
    if len(chunks) > MAX_CHUNKS:
        return None
    return {"Body": chunks[0], **{f"Body{i}": chunk for i, chunk in enumerate(chunks[1:], 1)}, "BodyZ": len(chunks)}


def unpack_body(entity: Mapping[str, Any]) -> Any:
    count = entity.get("BodyZ")
    if count is None:  # a record written before answers were compressed
        return json.loads(bytes(entity["Body"]))
    raw = bytes(entity["Body"]) + b"".join(bytes(entity[f"Body{i}"]) for i in range(1, int(count)))
    return json.loads(zlib.decompress(raw))
