"""Cancel what is pending on one machine: list its open actions (the list quota, page by page),
cancel each through the cancel path (the cancel quota, idempotency, audit), optionally read each
back (the get quota), and sum up what Defender answered.

Listing needs `Machine.Read.All` (or `Machine.ReadWrite.All`); cancelling needs one `Machine.*`
action role, as a single cancel does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shared.cancel.commands import BulkRequest, CancelCommand
from shared.cancel.service import VERIFIED_ANSWERS, CancelResult, CancelService
from shared.defender.client import DefenderClient, error_message
from shared.defender.retry import DEFAULT_RETRY_AFTER_SECONDS
from shared.errors import AppError, QuotaExceeded, error_body
from shared.formats import OPEN_STATUSES
from shared.outcomes import Outcome

CONCURRENCY = 8  # cancels in flight at once (the Defender connection pool holds 16)
MAX_LISTINGS = 4  # a first listing and up to three more, each after cancelling what was new
READ_ROLES_HINT = "listing a machine's actions needs the app role Machine.Read.All (or Machine.ReadWrite.All)"


@dataclass(frozen=True, kw_only=True)
class Listing:
    """The open actions, or Defender's refusal (status and body) when the list failed."""

    actions: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: Any = None
    pages: int = 0


def list_pending(defender: DefenderClient, request: BulkRequest, first_wait: float, until: float) -> Listing:
    """Every page of the machine's open actions. The first page waits for the list quota as long as
    a single call would (`first_wait`, QuotaExceeded past it); the next ones, needed to finish what
    was started, until `until` (monotonic). Defender's 429 is QuotaExceeded too (the client held
    the list quota for every instance); a page of the wrong shape is InvalidUpstreamResponse."""
    url: str | None = defender.list_url(request.odata_filter())
    actions: list[dict[str, Any]] = []
    pages = 0
    while url:
        reply = defender.list_page(url, max_wait=first_wait if pages == 0 else max(0.0, until - time.monotonic()))
        pages += 1
        if reply.status == 429:
            wait = reply.retry_after or DEFAULT_RETRY_AFTER_SECONDS
            raise QuotaExceeded("Defender throttled the list of machine actions", wait_seconds=wait)
        if reply.status != 200:
            return Listing(status=reply.status, body=_list_failure(reply.status, reply.body), pages=pages)
        actions += [a for a in reply.body["value"] if a["status"] in OPEN_STATUSES]  # shape checked by the client
        url = reply.body.get("@odata.nextLink")
    return Listing(actions=actions, pages=pages)


def _list_failure(status: int, body: Any) -> Any:
    if status == 403:  # name the role the app is missing, keeping Defender's own words
        said = error_message(body)
        return error_body("Forbidden", f"Defender refused to list: {READ_ROLES_HINT}. Defender said: {said}")
    return body


def item(action: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": action.get("id"), "type": action.get("type"), "statusBefore": action.get("status")}


def outcome_of(status: int | None, body: Any) -> Outcome:
    """cancelled (2xx), already_final (Defender's 400 for an action that ended meanwhile), failed."""
    if status is not None and 200 <= status < 300:
        return Outcome.CANCELLED
    if status == 400 and "already" in error_message(body):
        return Outcome.ALREADY_FINAL
    return Outcome.FAILED


def cancel_each(
    service: CancelService,
    actions: list[dict[str, Any]],
    request: BulkRequest,
    correlation: str,
    key: Callable[[str], str | None],
    cancel_until: float,
    verify_until: float,
    *,
    caller: str = "queue",
    monotonic: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Cancel every listed action, CONCURRENCY at a time, each waiting for the cancel quota until
    `cancel_until` (monotonic); the ones the quota cannot serve in time are `not_attempted` (a repeat
    cancels them: the others are no longer pending). Then, with verify, read each back on the get
    quota until `verify_until`. Sending a window's burst in parallel keeps the batch within a few
    milliseconds of the least time the quota allows: the next window opens one window after the
    first send, and the burst's last send is what delays it."""

    def one(action: dict[str, Any]) -> tuple[dict[str, Any], CancelResult | None]:
        entry, action_id = item(action), str(action.get("id"))
        command = CancelCommand(
            action_id, request.comment, correlation, "bulk", idempotency_key=key(action_id), caller=caller
        )
        try:
            result = service.cancel(command, max_wait=max(0.0, cancel_until - monotonic()))
        except QuotaExceeded as exc:
            entry.update(outcome=Outcome.NOT_ATTEMPTED, status=429, body=error_body(exc.code, exc.message))
            return entry, None
        except AppError as exc:
            entry.update(outcome=Outcome.FAILED, status=exc.status, body=error_body(exc.code, exc.message))
            return entry, None
        entry.update(outcome=outcome_of(result.status, result.body), status=result.status, body=result.body)
        return entry, result

    def read_back(done: tuple[dict[str, Any], CancelResult | None]) -> None:
        entry, answered = done
        if answered is not None and answered.status in VERIFIED_ANSWERS:
            entry["verifiedStatus"] = service.verify(str(entry["id"]), answered, verify_until).verified_status

    with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="bulk") as pool:
        done = list(pool.map(one, actions))
        if request.verify:  # read back side by side too: one after another would outlast the deadline
            list(pool.map(read_back, done))
    return [entry for entry, _ in done]


def cancel_converging(
    defender: DefenderClient,
    request: BulkRequest,
    first: Listing,
    cancel: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    first_wait: float,
    until: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cancel what `first` found, then list again until a listing finds nothing new (at most
    MAX_LISTINGS in all): Defender pages by `$skip`, so an action that ends between two pages shifts
    the next page by one and hides an open action from that listing. Each listing waits for the list
    quota as the first did (`first_wait`). Every action found, and the items `cancel` made of them."""
    actions, items = list(first.actions), cancel(list(first.actions))
    seen = {a["id"] for a in actions}
    for _ in range(MAX_LISTINGS - 1):
        try:
            again = list_pending(defender, request, first_wait, until)
        except AppError:  # no list slot in time, or no answer: what was found stands
            break
        new = [a for a in again.actions if a["id"] not in seen]
        if again.status != 200 or not new:
            break
        seen.update(a["id"] for a in new)
        actions += new
        items += cancel(new)
    return actions, items


def summary(request: BulkRequest, actions: list[dict[str, Any]], items: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The answer: what was found, and for each what Defender answered (with dryRun: only listed)."""
    if items is None:
        items = [{**item(a), "outcome": Outcome.LISTED} for a in actions]
    counted = (Outcome.CANCELLED, Outcome.ALREADY_FINAL, Outcome.FAILED, Outcome.NOT_ATTEMPTED)
    counts = {name: sum(1 for i in items if i["outcome"] == name) for name in counted}
    return {
        "machineId": request.machine_id,
        "dryRun": request.dry_run,
        "found": len(actions),
        "cancelled": counts[Outcome.CANCELLED],
        "alreadyFinal": counts[Outcome.ALREADY_FINAL],
        "failed": counts[Outcome.FAILED],
        "notAttempted": counts[Outcome.NOT_ATTEMPTED],
        "actions": items,
    }
