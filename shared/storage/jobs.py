"""Bulk jobs in Table Storage: the actions a job found, each action's outcome, and the claims that
make the job's next listing and its summary happen once.

One partition per job: row `job` (the action ids in the order they were found: a redelivered job
message never lists again, so a crash cannot change what the job is about; a later listing only
appends what it newly found), one row per action's outcome, a row `relist-N` claimed by whoever
starts listing round N+1, and row `summary`, inserted once by whoever completes the job (its owner
may send again after a crash; a job begun over HTTP is read back instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.storage.clients import recreating_table
from shared.storage.errors import translated

if TYPE_CHECKING:
    from azure.data.tables import TableClient

JOB_ROW = "job"
SUMMARY_ROW = "summary"
RELIST_ROW = "relist-{}"
IDS_PER_PROPERTY = 800  # 37 characters each: a string property holds 32 K characters
T = TypeVar("T")


def job_key(tenant_id: str, job_id: str, machine_id: str, types: tuple[str, ...]) -> str:
    """A job is its tenant, its id (a ticket's correlation id), its machine and the types it asks
    for: one ticket may cancel what is pending on many machines, and each is its own job."""
    return "|".join((tenant_id, job_id, machine_id, "+".join(sorted(types)) or "all"))


@dataclass(frozen=True)
class Job:
    key: str  # job_key(): the partition
    correlation_id: str
    machine_id: str
    tenant_id: str
    comment: str
    verify: bool
    action_ids: tuple[str, ...]
    _: KW_ONLY
    fanned_out: int = 0  # how many of action_ids have had their child message sent
    types: tuple[str, ...] = ()
    rounds: int = 1  # listings made so far
    converged: bool = False  # the last listing found nothing new (or the rounds ran out)
    origin: str = "queue"  # "http": the summary is read from the status route, not sent
    caller: str = "queue"  # whose job: the HTTP caller's scope may read it
    owner: str = ""  # the job message (or HTTP request) that opened it
    etag: str = ""  # the job row's version as read: a later listing appends only to this version


@dataclass(frozen=True)
class JobState:
    job: Job | None
    _: KW_ONLY
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    concluded: bool = False  # its summary is claimed

    @property
    def complete(self) -> bool:
        """Every action found so far has its outcome."""
        return self.job is not None and all(a in self.outcomes for a in self.job.action_ids)


class JobStore:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def open(self, job: Job) -> Job:
        """Store the job unless it is stored already; either way, the stored one."""
        entity: dict[str, Any] = {
            "PartitionKey": job.key,
            "RowKey": JOB_ROW,
            "CorrelationId": job.correlation_id,
            "MachineId": job.machine_id,
            "TenantId": job.tenant_id,
            "Comment": job.comment,
            "Verify": job.verify,
            "Types": ",".join(job.types),
            "Origin": job.origin,
            "Caller": job.caller,
            "Owner": job.owner,
            "Rounds": job.rounds,
            "Converged": job.converged,
            "FannedOutCount": 0,
            **_ids(job.action_ids),
        }
        try:
            self._io(lambda: self._table.create_entity(entity))
            return job
        except ResourceExistsError:
            stored = self.get(job.key)
            assert stored is not None  # it exists: the insert said so
            return stored

    def get(self, key: str) -> Job | None:
        try:
            return _job(key, self._io(lambda: self._table.get_entity(key, JOB_ROW)))
        except ResourceNotFoundError:
            return None

    def mark_fanned_out(self, key: str, count: int) -> None:
        self._merge(key, {"FannedOutCount": count})

    def extend(self, job: Job, found: tuple[str, ...]) -> Job | None:
        """A later listing's new actions appended (one round more), if the job row is still the
        version `job` was read at; the job as it now is, or None when another copy of the same
        continuation appended first (its sender was redelivered after a crash)."""
        ids = job.action_ids + found
        entity = {"PartitionKey": job.key, "RowKey": JOB_ROW, "Rounds": job.rounds + 1, **_ids(ids)}
        try:
            meta = self._io(
                lambda: self._table.update_entity(
                    entity, mode=UpdateMode.MERGE, etag=job.etag, match_condition=MatchConditions.IfNotModified
                )
            )
        except ResourceModifiedError:
            return None
        return replace(job, action_ids=ids, rounds=job.rounds + 1, etag=str(meta["etag"]))

    def mark_converged(self, key: str) -> None:
        self._merge(key, {"Converged": True})

    def record(self, key: str, action_id: str, outcome: dict[str, Any]) -> None:
        """An action's outcome (the last word wins: a redelivered child writes the same answer)."""
        entity = {"PartitionKey": key, "RowKey": action_id, "Outcome": json.dumps(outcome)}
        self._io(lambda: self._table.upsert_entity(entity, mode=UpdateMode.REPLACE))

    def state(self, key: str) -> JobState:
        """The job, every action's outcome so far and whether it is concluded, in one partition query."""
        rows = self._io(lambda: list(self._table.query_entities("PartitionKey eq @pk", parameters={"pk": key})))
        job = next((_job(key, r) for r in rows if r["RowKey"] == JOB_ROW), None)
        outcomes = {r["RowKey"]: json.loads(r["Outcome"]) for r in rows if "Outcome" in r}
        return JobState(job, outcomes=outcomes, concluded=any(r["RowKey"] == SUMMARY_ROW for r in rows))

    def claim_summary(self, key: str, owner: str) -> bool:
        """Whether `owner` sends the summary: the first to claim it, or that same owner again (its
        earlier run died between the claim and the send)."""
        return self._claim(key, SUMMARY_ROW, owner)

    def claim_relist(self, key: str, rounds: int, owner: str) -> bool:
        """Whether `owner` starts the listing after round `rounds` (once per round, as the summary)."""
        return self._claim(key, RELIST_ROW.format(rounds), owner)

    def _claim(self, key: str, row: str, owner: str) -> bool:
        try:
            self._io(lambda: self._table.create_entity({"PartitionKey": key, "RowKey": row, "Owner": owner}))
            return True
        except ResourceExistsError:
            return str(self._io(lambda: self._table.get_entity(key, row)).get("Owner")) == owner

    def _merge(self, key: str, fields: Mapping[str, Any]) -> None:
        entity = {"PartitionKey": key, "RowKey": JOB_ROW, **fields}
        self._io(lambda: self._table.update_entity(entity, mode=UpdateMode.MERGE))

    def _io(self, call: Callable[[], T]) -> T:
        with translated("the bulk job state"):
            return recreating_table(self._table, call)


def _ids(ids: tuple[str, ...]) -> dict[str, Any]:
    starts = range(0, len(ids), IDS_PER_PROPERTY)
    chunks = {f"Actions{i // IDS_PER_PROPERTY}": ",".join(ids[i : i + IDS_PER_PROPERTY]) for i in starts}
    return {"Total": len(ids), **chunks}


def _job(key: str, entity: Mapping[str, Any]) -> Job:
    properties = (f"Actions{i}" for i in range(int(entity["Total"]) // IDS_PER_PROPERTY + 1))
    chunks = [entity[name] for name in properties if entity.get(name)]
    ids = tuple(i for chunk in chunks for i in chunk.split(","))
    return Job(
        key,
        entity["CorrelationId"],
        entity["MachineId"],
        entity["TenantId"],
        entity["Comment"],
        bool(entity["Verify"]),
        ids,
        fanned_out=int(entity.get("FannedOutCount", len(ids) if entity.get("FannedOut") else 0)),
        types=tuple(t for t in str(entity.get("Types", "")).split(",") if t),
        rounds=int(entity.get("Rounds", 1)),
        converged=bool(entity.get("Converged", False)),
        origin=str(entity.get("Origin", "queue")),
        caller=str(entity.get("Caller", "queue")),
        owner=str(entity.get("Owner", "")),
        etag=str(getattr(entity, "metadata", {}).get("etag", "")),
    )
