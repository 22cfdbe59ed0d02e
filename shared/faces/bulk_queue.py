"""Durable bulk jobs on the queue, across host restarts: the queue form of a bulk cancel, and the
HTTP form when a batch is too large to answer inside a caller's limit.

A job message `{"machineId", "comment", "types"?, "verify"?, "dryRun"?, "correlationId"?,
"tenantId"?}` lists the machine's open actions once (the list quota), stores them (shared.storage.jobs),
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
from dataclasses import replace
from typing import Any

from shared.app import TenantApp, get_app, get_settings
from shared.cancel import bulk
from shared.cancel.commands import BulkRequest
from shared.config.settings import QUEUE, QUEUE_INLINE_WAIT_SECONDS, RESULTS_QUEUE
from shared.config.tenants import Tenant
from shared.faces.messages import BulkJobMessage, ListingResult, Message, QueueCancel, Result, Summary
from shared.outcomes import Outcome
from shared.storage.clients import queue_client
from shared.storage.jobs import Job, JobState, JobStore, job_key

LIST_PAGES_SECONDS = 120.0  # later pages of a job's listing may wait this long for the list quota
# A queue message holds 64 KiB after base64 (4/3): a summary part's JSON stays under 45,000 bytes.
MAX_PART_BYTES = 45_000
MAX_ERROR_CHARS = 1024  # an entry keeps Defender's error code and this much of its message
OUTCOMES = (Outcome.CANCELLED, Outcome.ALREADY_FINAL, Outcome.FAILED)


def start(
    request: BulkRequest, job_id: str, tenant: Tenant, owner: str, bulk_round: int | None = None
) -> Message | None:
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
            return Summary(
                correlation_id=job_id, tenant_id=tenant.id, counts=bulk.summary(request, listing.actions, None)
            )
        ids = tuple(str(a["id"]) for a in listing.actions)
        job = store.open(_job(key, job_id, tenant, request, ids, owner=owner))
    elif bulk_round is not None:
        if bulk_round == job.rounds and state.complete and not job.converged and job.rounds < bulk.MAX_LISTINGS:
            _relist(store, path, request, job, owner)
        return None  # a continuation redelivered after its round: nothing left to do
    elif state.concluded and owner != job.owner:
        _send_summary(job, state.outcomes, replayed=True)  # the same job asked again: its summary again
        return None
    advance(store, job, owner)
    return None


def open_http(request: BulkRequest, job_id: str, tenant: Tenant, caller: str, listing: bulk.Listing) -> Job:
    """Continue an HTTP bulk request as a durable job from what its first listing found; its summary
    is read from the status route (http_api.pending_job)."""
    ids = tuple(str(a["id"]) for a in listing.actions)
    key = job_key(tenant.id, job_id, request.machine_id, ())  # the id is the request's own: types need not key it
    store = jobs()
    job = store.open(_job(key, job_id, tenant, request, ids, owner=job_id, origin="http", caller=caller))
    advance(store, job, job_id)
    return job


def _job(key: str, job_id: str, tenant: Tenant, request: BulkRequest, ids: tuple[str, ...], **fields: Any) -> Job:
    return Job(
        key, job_id, request.machine_id, tenant.id, request.comment, request.verify, ids, types=request.types, **fields
    )


def advance(store: JobStore, job: Job, owner: str) -> None:
    """Send the children not sent yet; a job with nothing left to wait for concludes."""
    if job.fanned_out < len(job.action_ids):
        _fan_out(job, job.action_ids[job.fanned_out :])
        store.mark_fanned_out(job.key, len(job.action_ids))
    else:  # every child was sent before (or there is none): the job may be complete already
        conclude(job.key, owner)


def _list(path: TenantApp, request: BulkRequest) -> bulk.Listing:
    until = time.monotonic() + LIST_PAGES_SECONDS
    return bulk.list_pending(path.defender, request, QUEUE_INLINE_WAIT_SECONDS, until)


def _relist(store: JobStore, path: TenantApp, request: BulkRequest, job: Job, owner: str) -> None:
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
        child = QueueCancel(
            action_id=action_id,
            comment=job.comment,
            correlation_id=job.correlation_id,
            message_id="",  # a child always has the job's correlation id
            tenant_ref=job.tenant_id,
            verify=job.verify,
            bulk_job=job.key,
        )
        client.send_message(child.to_json())


def finish(job_key: str, result: Result, owner: str) -> None:
    """A child's last word: record its outcome; if it completes the job, conclude it."""
    body = result.body
    cancelled = result.outcome is Outcome.CANCELLED
    entry: dict[str, Any] = {
        "machineActionId": result.action_id,
        "outcome": Outcome.CANCELLED if cancelled else bulk.outcome_of(result.status, body),
        "status": result.status,
    }
    if isinstance(body, dict) and "status" in body:
        entry["actionStatus"] = body["status"]
    if isinstance(body, dict) and "error" in body:
        entry["error"] = _short_error(body["error"])
    if result.verified_status is not None:
        entry["verifiedStatus"] = result.verified_status
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
    request = BulkRequest(job.machine_id, job.comment, types=job.types, verify=job.verify)
    again = BulkJobMessage(
        request=request, correlation_id=job.correlation_id, tenant_ref=job.tenant_id, bulk_round=job.rounds
    )
    queue_client(get_settings().queue_storage, QUEUE).send_message(again.to_json())


def summary_of(job: Job, outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The job's summary: counts, and each action's entry in the order the job found them."""
    entries = [outcomes[a] for a in job.action_ids if a in outcomes]
    counts = {name: sum(1 for e in entries if e["outcome"] == name) for name in OUTCOMES}
    return {
        "machineId": job.machine_id,
        "found": len(job.action_ids),
        "cancelled": counts[Outcome.CANCELLED],
        "alreadyFinal": counts[Outcome.ALREADY_FINAL],
        "failed": counts[Outcome.FAILED],
        "actions": entries,
    }


def summary_messages(job: Job, outcomes: dict[str, dict[str, Any]], replayed: bool = False) -> list[Summary]:
    """The summary as result messages that each fit a queue message: the counts in every part, the
    entries split across parts in order (`part` of `parts`)."""
    whole = summary_of(job, outcomes)
    empty = {**whole, "actions": []}
    head = Summary(
        correlation_id=job.correlation_id, tenant_id=job.tenant_id, counts=empty, replayed=replayed, part=1, parts=1
    )
    # the room left for entries once the head is written (part numbers as wide as they may get)
    room = MAX_PART_BYTES - len(replace(head, part=999_999, parts=999_999).to_json())
    parts: list[list[dict[str, Any]]] = [[]]
    used = 0
    for entry in whole["actions"]:
        size = len(json.dumps(entry)) + 2
        if parts[-1] and used + size > room:
            parts.append([])
            used = 0
        parts[-1].append(entry)
        used += size
    return [replace(head, counts={**whole, "actions": p}, part=i, parts=len(parts)) for i, p in enumerate(parts, 1)]


def _send_summary(job: Job, outcomes: dict[str, dict[str, Any]], replayed: bool = False) -> None:
    client = queue_client(get_settings().queue_storage, RESULTS_QUEUE)
    for message in summary_messages(job, outcomes, replayed):
        client.send_message(message.to_json())


def _short_error(error: Any) -> Any:
    """Defender's error, its message capped: an entry must fit a part however long the message."""
    if not isinstance(error, dict):
        return str(error)[:MAX_ERROR_CHARS]
    return {"code": str(error.get("code", ""))[:100], "message": str(error.get("message", ""))[:MAX_ERROR_CHARS]}


def _listing_failed(job_id: str, request: BulkRequest, tenant: Tenant, listing: bulk.Listing) -> ListingResult:
    return ListingResult(
        correlation_id=job_id,
        machine_id=request.machine_id,
        tenant_id=tenant.id,
        status=listing.status,
        body=listing.body,
        outcome=Outcome.FAILED if listing.status >= 500 else Outcome.UPSTREAM_REJECTED,  # a list is no cancel
    )


def jobs() -> JobStore:
    return get_app().jobs
