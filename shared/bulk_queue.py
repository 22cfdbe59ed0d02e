"""The queue form of a bulk cancel, durable across host restarts.

A job message `{"machineId", "comment", "types"?, "verify"?, "dryRun"?, "correlationId"?,
"tenantId"?}` lists the machine's open actions once (the list quota), stores them (shared.jobs),
and sends one child message per action. Each child is an ordinary queue cancel (limiter,
idempotency keyed by job and action, audit) that records its outcome instead of sending a result;
the child that completes the job sends the one summary result. A host killed anywhere in between
redelivers what it held: the job is not listed again, children are sent again only if they were not
all sent, a child replays its key instead of cancelling twice, and the summary is claimed once.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from shared import bulk
from shared.app import get_app, get_settings
from shared.jobs import Job, JobStore
from shared.settings import QUEUE, QUEUE_INLINE_WAIT_SECONDS, RESULTS_QUEUE
from shared.storage import queue_client
from shared.tenants import Tenant

LIST_PAGES_SECONDS = 120.0  # later pages of a job's listing may wait this long for the list quota
MAX_SUMMARY_ACTIONS = 300  # a queue message holds 64 KiB: past this, the summary counts but lists no more


def start(request: bulk.BulkRequest, job_id: str, tenant: Tenant, owner: str) -> dict[str, Any] | None:
    """Run a job message: the dry-run summary at once, else list (first time only) and fan out.
    Raises QuotaExceeded when the list quota has no slot for the first page (the caller defers)."""
    store = jobs()
    key = f"{tenant.id}|{job_id}"
    job = None if request.dry_run else store.get(key)
    if job is None:
        path = get_app().of(tenant)
        until = time.monotonic() + LIST_PAGES_SECONDS
        listing = bulk.list_pending(path.service, path.quotas["list"], request, QUEUE_INLINE_WAIT_SECONDS, until)
        if listing.status != 200:
            return _listing_failed(job_id, request, tenant, listing)
        if request.dry_run:
            return _final(job_id, tenant, bulk.summary(request, listing.actions, None))
        ids = tuple(str(a["id"]) for a in listing.actions)
        job = store.open(Job(key, job_id, request.machine_id, tenant.id, request.comment, request.verify, ids))
    if not job.fanned_out:
        _fan_out(job)
        store.mark_fanned_out(key)
    if not job.action_ids:
        summarize(key, owner)
    return None


def _fan_out(job: Job) -> None:
    client = queue_client(get_settings().queue_storage, QUEUE)
    for action_id in job.action_ids:
        child: dict[str, Any] = {"machineActionId": action_id, "comment": job.comment,
                                 "correlationId": job.correlation_id, "tenantId": job.tenant_id,
                                 "bulkJob": job.key}  # fmt: skip
        if job.verify:
            child["verify"] = True
        client.send_message(json.dumps(child))


def finish(job_key: str, result: dict[str, Any], owner: str) -> None:
    """A child's last word: record its outcome; if it completes the job, send the summary."""
    body = result.get("body")
    entry: dict[str, Any] = {
        "machineActionId": result.get("machineActionId"),
        "outcome": "cancelled" if result.get("outcome") == "cancelled" else bulk.outcome_of(result.get("status"), body),
        "status": result.get("status"),
    }
    if isinstance(body, dict) and "status" in body:
        entry["actionStatus"] = body["status"]
    if isinstance(body, dict) and "error" in body:
        entry["error"] = body["error"]
    if "verifiedStatus" in result:
        entry["verifiedStatus"] = result["verifiedStatus"]
    jobs().record(job_key, str(entry["machineActionId"]), entry)
    summarize(job_key, owner)


def summarize(job_key: str, owner: str) -> None:
    """Send the summary if every action has its outcome and `owner` holds the claim to send it."""
    store = jobs()
    job, outcomes = store.state(job_key)
    if job is None:
        return
    if any(a not in outcomes for a in job.action_ids) or not store.claim_summary(job_key, owner):
        return
    entries = [outcomes[a] for a in job.action_ids]
    counts = {
        name: sum(1 for e in entries if e["outcome"] == name) for name in ("cancelled", "already_final", "failed")
    }
    summary: dict[str, Any] = {
        "machineId": job.machine_id,
        "found": len(entries),
        "cancelled": counts["cancelled"],
        "alreadyFinal": counts["already_final"],
        "failed": counts["failed"],
        "actions": entries[:MAX_SUMMARY_ACTIONS],
    }
    if len(entries) > MAX_SUMMARY_ACTIONS:
        summary["actionsTruncated"] = True  # each outcome stays in the job's rows (BULK_TABLE)
    message = _final(job.correlation_id, Tenant(job.tenant_id, job.tenant_id), summary)
    queue_client(get_settings().queue_storage, RESULTS_QUEUE).send_message(json.dumps(message))


def _final(job_id: str, tenant: Tenant, summary: dict[str, Any]) -> dict[str, Any]:
    return {"correlationId": job_id, "tenantId": tenant.id, "outcome": "completed", **summary,
            "completedAt": datetime.now(UTC).isoformat(timespec="milliseconds")}  # fmt: skip


def _listing_failed(job_id: str, request: bulk.BulkRequest, tenant: Tenant, listing: bulk.Listing) -> dict[str, Any]:
    outcome = "failed" if listing.status >= 500 else "upstream_rejected"
    return {"correlationId": job_id, "machineId": request.machine_id, "tenantId": tenant.id, "status": listing.status,
            "body": listing.body, "outcome": outcome,
            "completedAt": datetime.now(UTC).isoformat(timespec="milliseconds")}  # fmt: skip


def jobs() -> JobStore:
    return get_app().jobs
