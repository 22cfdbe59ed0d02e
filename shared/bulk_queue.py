"""Durable bulk jobs on the queue, across host restarts: the queue form of a bulk cancel, and the
HTTP form when a batch is too large to answer inside a caller's limit.

A job message `{"machineId", "comment", "types"?, "verify"?, "dryRun"?, "correlationId"?,
"tenantId"?}` lists the machine's open actions once (the list quota), stores them (shared.jobs),
and sends one child message per action. Each child is an ordinary queue cancel (limiter,
idempotency keyed by job and action, audit) that records its outcome instead of sending a result.
The child that completes the job lists once more (a continuation of the job message,
`bulkRound` set), because `$skip` paging can hide an action that another one's end shifted; what
that listing newly finds gets children of its own, until a listing finds nothing new
(bulk.MAX_LISTINGS in all). Then the one summary is sent, in parts that each fit a queue message
(`part` of `parts`). A host killed anywhere in between redelivers what it held: the job is not
listed again, children are sent again only if they were not all sent, a child replays its key
instead of cancelling twice, and each round's listing and the summary are claimed once. A job
message repeated later (a new message for the same job) gets the summary again, `replayed`.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from shared import bulk
from shared.app import TenantApp, get_app, get_settings
from shared.jobs import Job, JobState, JobStore, job_key
from shared.settings import QUEUE, QUEUE_INLINE_WAIT_SECONDS, RESULTS_QUEUE
from shared.storage import queue_client
from shared.tenants import Tenant

LIST_PAGES_SECONDS = 120.0  # later pages of a job's listing may wait this long for the list quota
# A queue message holds 64 KiB after base64 (4/3): a summary part's JSON stays under 45,000 bytes.
MAX_PART_BYTES = 45_000
MAX_ERROR_CHARS = 1024  # an entry keeps Defender's error code and this much of its message
OUTCOMES = ("cancelled", "already_final", "failed")


def start(
    request: bulk.BulkRequest, job_id: str, tenant: Tenant, owner: str, bulk_round: int | None = None
) -> dict[str, Any] | None:
    """Run a job message: the dry-run summary at once; else list (the first time only) and fan out,
    or, for a continuation (`bulk_round`), list again. Raises QuotaExceeded when the list quota has
    no slot for the first page (the caller defers)."""
    store = jobs()
    path = get_app().of(tenant)
    key = job_key(tenant.id, job_id, request.machine_id, request.types)
    state = JobState(None) if request.dry_run else store.state(key)
    job = state.job
    if job is None:
        listing = _list(path, request)
        if listing.status != 200:
            return _listing_failed(job_id, request, tenant, listing)
        if request.dry_run:
            return _final(job_id, tenant, bulk.summary(request, listing.actions, None))
        ids = tuple(str(a["id"]) for a in listing.actions)
        job = store.open(Job(key, job_id, request.machine_id, tenant.id, request.comment, request.verify, ids,
                             types=request.types, owner=owner))  # fmt: skip
    elif bulk_round is not None:
        if bulk_round == job.rounds and state.complete and not job.converged and job.rounds < bulk.MAX_LISTINGS:
            _relist(store, path, request, job, owner)
        return None  # a continuation redelivered after its round: nothing left to do
    elif state.concluded and owner != job.owner:
        _send_summary(job, state.outcomes, replayed=True)  # the same job asked again: its summary again
        return None
    advance(store, job, owner)
    return None


def open_http(request: bulk.BulkRequest, job_id: str, tenant: Tenant, caller: str, listing: bulk.Listing) -> Job:
    """Continue an HTTP bulk request as a durable job from what its first listing found; its summary
    is read from the status route (http_api.pending_job)."""
    ids = tuple(str(a["id"]) for a in listing.actions)
    key = job_key(tenant.id, job_id, request.machine_id, ())  # the id is the request's own: types need not key it
    store = jobs()
    job = store.open(Job(key, job_id, request.machine_id, tenant.id, request.comment, request.verify, ids,
                         types=request.types, origin="http", caller=caller, owner=job_id))  # fmt: skip
    advance(store, job, job_id)
    return job


def advance(store: JobStore, job: Job, owner: str) -> None:
    """Send the children not sent yet; a job with nothing left to wait for concludes."""
    if job.fanned_out < len(job.action_ids):
        _fan_out(job, job.action_ids[job.fanned_out :])
        store.mark_fanned_out(job.key, len(job.action_ids))
    else:  # every child was sent before (or there is none): the job may be complete already
        conclude(job.key, owner)


def _list(path: TenantApp, request: bulk.BulkRequest) -> bulk.Listing:
    until = time.monotonic() + LIST_PAGES_SECONDS
    return bulk.list_pending(path.service, path.quotas["list"], request, QUEUE_INLINE_WAIT_SECONDS, until)


def _relist(store: JobStore, path: TenantApp, request: bulk.BulkRequest, job: Job, owner: str) -> None:
    """List once more: what is new gets children (one round more); nothing new, the job concludes."""
    listing = _list(path, request)
    known = set(job.action_ids)
    found = tuple(str(a["id"]) for a in listing.actions if a["id"] not in known)
    if listing.status != 200 or not found:
        store.mark_converged(job.key)
        conclude(job.key, owner)
        return
    extended = store.extend(job, found)
    if extended is not None:  # None: a copy of this continuation appended them already
        advance(store, extended, owner)


def _fan_out(job: Job, action_ids: tuple[str, ...]) -> None:
    client = queue_client(get_settings().queue_storage, QUEUE)
    for action_id in action_ids:
        child: dict[str, Any] = {"machineActionId": action_id, "comment": job.comment,
                                 "correlationId": job.correlation_id, "tenantId": job.tenant_id,
                                 "bulkJob": job.key}  # fmt: skip
        if job.verify:
            child["verify"] = True
        client.send_message(json.dumps(child))


def finish(job_key: str, result: dict[str, Any], owner: str) -> None:
    """A child's last word: record its outcome; if it completes the job, conclude it."""
    body = result.get("body")
    entry: dict[str, Any] = {
        "machineActionId": result.get("machineActionId"),
        "outcome": "cancelled" if result.get("outcome") == "cancelled" else bulk.outcome_of(result.get("status"), body),
        "status": result.get("status"),
    }
    if isinstance(body, dict) and "status" in body:
        entry["actionStatus"] = body["status"]
    if isinstance(body, dict) and "error" in body:
        entry["error"] = _short_error(body["error"])
    if "verifiedStatus" in result:
        entry["verifiedStatus"] = result["verifiedStatus"]
    jobs().record(job_key, str(entry["machineActionId"]), entry)
    conclude(job_key, owner)


def conclude(job_key: str, owner: str) -> None:
    """Once every action has its outcome: list again (a continuation message, claimed once per
    round) until a listing finds nothing new; then send the summary, if `owner` holds its claim."""
    store = jobs()
    state = store.state(job_key)
    job = state.job
    if job is None or not state.complete:
        return
    # A tenant removed from TENANTS mid-job can no longer be listed: what was found stands.
    relist = get_settings().tenants.find(job.tenant_id) is not None and job.rounds < bulk.MAX_LISTINGS
    if not job.converged and relist:
        if store.claim_relist(job_key, job.rounds, owner):
            _continue(job)
        return
    if not store.claim_summary(job_key, owner) or job.origin == "http":
        return  # an HTTP job's summary is read from its status route
    _send_summary(job, state.outcomes)


def _continue(job: Job) -> None:
    again: dict[str, Any] = {"machineId": job.machine_id, "comment": job.comment, "correlationId": job.correlation_id,
                             "tenantId": job.tenant_id, "bulkRound": job.rounds}  # fmt: skip
    if job.types:
        again["types"] = list(job.types)
    if job.verify:
        again["verify"] = True
    queue_client(get_settings().queue_storage, QUEUE).send_message(json.dumps(again))


def summary_of(job: Job, outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The job's summary: counts, and each action's entry in the order the job found them."""
    entries = [outcomes[a] for a in job.action_ids if a in outcomes]
    counts = {name: sum(1 for e in entries if e["outcome"] == name) for name in OUTCOMES}
    return {"machineId": job.machine_id, "found": len(job.action_ids), "cancelled": counts["cancelled"],
            "alreadyFinal": counts["already_final"], "failed": counts["failed"], "actions": entries}  # fmt: skip


def summary_messages(job: Job, outcomes: dict[str, dict[str, Any]], replayed: bool = False) -> list[dict[str, Any]]:
    """The summary as result messages that each fit a queue message: the counts in every part, the
    entries split across parts in order (`part` of `parts`)."""
    whole = summary_of(job, outcomes)
    head = _final(job.correlation_id, Tenant(job.tenant_id, job.tenant_id), {**whole, "actions": []})
    if replayed:
        head["replayed"] = True
    room = MAX_PART_BYTES - len(json.dumps({**head, "part": 999_999, "parts": 999_999}))
    parts: list[list[dict[str, Any]]] = [[]]
    used = 0
    for entry in whole["actions"]:
        size = len(json.dumps(entry)) + 2
        if parts[-1] and used + size > room:
            parts.append([])
            used = 0
        parts[-1].append(entry)
        used += size
    return [{**head, "actions": p, "part": i, "parts": len(parts)} for i, p in enumerate(parts, 1)]


def _send_summary(job: Job, outcomes: dict[str, dict[str, Any]], replayed: bool = False) -> None:
    client = queue_client(get_settings().queue_storage, RESULTS_QUEUE)
    for message in summary_messages(job, outcomes, replayed):
        client.send_message(json.dumps(message))


def _short_error(error: Any) -> Any:
    """Defender's error, its message capped: an entry must fit a part however long the message."""
    if not isinstance(error, dict):
        return str(error)[:MAX_ERROR_CHARS]
    return {"code": str(error.get("code", ""))[:100], "message": str(error.get("message", ""))[:MAX_ERROR_CHARS]}


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
