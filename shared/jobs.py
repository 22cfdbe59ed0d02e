"""Bulk jobs from the queue, in Table Storage: the actions a job found, each action's outcome, and
the claim of the one message that sends the job's summary.

One partition per job: row `job` (the action ids, as first listed: a redelivered job message never
lists again, so a crash cannot change what the job is about), one row per action's outcome, and
row `summary`, inserted once by whoever completes the job (its owner may send again after a crash).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.errors import StateStoreUnavailable
from shared.storage import recreating_table

if TYPE_CHECKING:
    from azure.data.tables import TableClient

JOB_ROW = "job"
SUMMARY_ROW = "summary"
IDS_PER_PROPERTY = 800  # 37 characters each: a string property holds 32 K characters
RETRY_AFTER_DOWN = 5
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    key: str  # the partition: tenant and the job's correlation id
    correlation_id: str
    machine_id: str
    tenant_id: str
    comment: str
    verify: bool
    action_ids: tuple[str, ...]
    fanned_out: bool = False


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
            "Total": len(job.action_ids),
            "FannedOut": False,
        }
        for i in range(0, len(job.action_ids), IDS_PER_PROPERTY):
            entity[f"Actions{i // IDS_PER_PROPERTY}"] = ",".join(job.action_ids[i : i + IDS_PER_PROPERTY])
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

    def mark_fanned_out(self, key: str) -> None:
        entity = {"PartitionKey": key, "RowKey": JOB_ROW, "FannedOut": True}
        self._io(lambda: self._table.update_entity(entity, mode=UpdateMode.MERGE))

    def record(self, key: str, action_id: str, outcome: dict[str, Any]) -> None:
        """An action's outcome (the last word wins: a redelivered child writes the same answer)."""
        entity = {"PartitionKey": key, "RowKey": action_id, "Outcome": json.dumps(outcome)}
        self._io(lambda: self._table.upsert_entity(entity, mode=UpdateMode.REPLACE))

    def state(self, key: str) -> tuple[Job | None, dict[str, dict[str, Any]]]:
        """The job and every action's outcome so far, in one partition query."""
        rows = self._io(lambda: list(self._table.query_entities("PartitionKey eq @pk", parameters={"pk": key})))
        job = next((_job(key, r) for r in rows if r["RowKey"] == JOB_ROW), None)
        return job, {r["RowKey"]: json.loads(r["Outcome"]) for r in rows if r["RowKey"] not in (JOB_ROW, SUMMARY_ROW)}

    def claim_summary(self, key: str, owner: str) -> bool:
        """Whether `owner` sends the summary: the first to claim it, or that same owner again (its
        earlier run died between the claim and the send)."""
        try:
            self._io(lambda: self._table.create_entity({"PartitionKey": key, "RowKey": SUMMARY_ROW, "Owner": owner}))
            return True
        except ResourceExistsError:
            return str(self._io(lambda: self._table.get_entity(key, SUMMARY_ROW)).get("Owner")) == owner

    def _io(self, call: Callable[[], T]) -> T:
        try:
            return recreating_table(self._table, call)
        except (ResourceExistsError, ResourceNotFoundError):
            raise
        except AzureError as exc:
            raise StateStoreUnavailable(
                f"The bulk job state cannot be reached: {type(exc).__name__}", retry_after=RETRY_AFTER_DOWN
            ) from None


def _job(key: str, entity: Mapping[str, Any]) -> Job:
    chunks = [entity[f"Actions{i}"] for i in range(int(entity["Total"]) // IDS_PER_PROPERTY + 1)
              if entity.get(f"Actions{i}")]  # fmt: skip
    ids = tuple(i for chunk in chunks for i in chunk.split(","))
    return Job(key, entity["CorrelationId"], entity["MachineId"], entity["TenantId"], entity["Comment"],
               bool(entity["Verify"]), ids, bool(entity["FannedOut"]))  # fmt: skip
