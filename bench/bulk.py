"""Cancel everything pending on a machine: how close to the least time the quotas allow.

A machine with 120 pending actions (listed in pages of 50) and a few final ones; one call of
`POST /api/machines/{id}/cancelPendingActions` through the function, against the simulator
enforcing the cancel and list windows per API. Measured from the first list call's arrival at
Defender to the last cancel's: that time, the least the cancel windows allow for 120 calls, the
ratio, calls over a window and 429s per API, and cancels per action; and how long the caller waited
for its first answer. Runs: compressed windows (`100/24`, margin 100 ms: answered at once) and
Defender's real windows (`100/60,1500/3600`, the default 1000 ms margin; about a minute: more than
a Logic App waits, so it answers 202 and runs as a queue job, drained here by the local queue host,
until its status route answers 200).

    python -m bench.bulk [--quick]

Prints a table and writes bench/results/bulk.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import azure.functions as func

from localdev import tokens
from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint
from localdev.queuehost import QueueFunction
from localdev.windows import earliest, violations

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
PENDING = 120


def run(azurite: Azurite, identity: IdentityEndpoint, limits: str, margin_ms: int) -> dict[str, Any]:
    windows = tuple((int(c), float(s)) for c, s in (w.split("/") for w in limits.split(",")))
    sim = DefenderSimulator(windows=windows, token_secret=tokens.DEFAULT_SECRET, page_size=50).start()
    for i in range(PENDING):
        sim.add_action(("Pending", "InProgress")[i % 2], machine_id=MACHINE)
    for status in ("Succeeded", "Cancelled", "Failed"):
        sim.add_action(status, machine_id=MACHINE)
    key = f"bench-bulk-{secrets.token_hex(4)}"
    os.environ.update({**identity.env(), "AzureWebJobsStorage": azurite.connection_string,
                       "DEFENDER_API_BASE_URL": sim.base_url, "RATE_LIMITS": limits, "LIST_RATE_LIMITS": limits,
                       "RATE_LIMIT_SAFETY_MS": str(margin_ms), "RATE_LIMIT_KEY": key})  # fmt: skip
    from shared.app import reset_app

    os.environ["BULK_TABLE"] = f"BenchBulk{secrets.token_hex(4)}"
    reset_app()
    from CancelPendingActions import main

    started = time.monotonic()
    try:
        response = main(func.HttpRequest(method="POST", url=f"/api/machines/{MACHINE}/cancelPendingActions",
                                         route_params={"machineId": MACHINE}, headers={},
                                         body=json.dumps({"Comment": "bench"}).encode()))  # fmt: skip
        first_answer = time.monotonic() - started
        answered = response.status_code
        if answered == 202:
            response = finish_job(azurite, json.loads(response.get_body())["jobId"])
    finally:
        sim.stop()
    summary = json.loads(response.get_body())
    cancels, lists = sim.calls(api="cancel"), sim.calls("", api="list")
    took = cancels[-1].at - lists[0].at
    least = earliest(PENDING, windows)
    per_action = Counter(c.path.split("/")[-2] for c in cancels)
    return {
        "rate_limits": limits,
        "margin_ms": margin_ms,
        "first_answer": answered,
        "first_answer_seconds": round(first_answer, 3),
        "status": response.status_code,
        "found": summary.get("found"),
        "cancelled": summary.get("cancelled"),
        "list_calls": len(lists),
        "cancel_calls": len(cancels),
        "max_cancels_per_action": max(per_action.values()),
        "upstream_429": sum(1 for c in cancels + lists if c.status == 429),
        "over_a_window_cancel": violations([c.at for c in cancels], windows),
        "over_a_window_list": violations([c.at for c in lists], windows),
        "seconds": round(took, 3),
        "least_seconds": least,
        "over_least": round(took / least - 1, 4),
    }


def finish_job(azurite: Azurite, job_id: str) -> func.HttpResponse:
    """Run the job's children on the local queue host until its status route answers 200."""
    from GetPendingActionsJob import main as status

    def ask() -> func.HttpResponse:
        return status(func.HttpRequest(method="GET", url=f"/api/machines/{MACHINE}/cancelPendingActions/{job_id}",
                                       route_params={"machineId": MACHINE, "jobId": job_id}, headers={},
                                       body=b""))  # fmt: skip

    host = QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)
    host.drain(lambda: ask().status_code == 200, timeout=600)
    host.close()
    return ask()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the compressed run only")
    args = parser.parse_args()
    plan = [("100/24", 100)] + ([] if args.quick else [("100/60,1500/3600", 1000)])
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    try:
        runs = [run(azurite, identity, limits, margin) for limits, margin in plan]
    finally:
        identity.stop()
        azurite.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bulk.json").write_text(json.dumps({"runs": runs, "cpus": os.cpu_count()}, indent=2))
    print(f"cancelPendingActions: {PENDING} pending actions (pages of 50) and 3 final ones, one call")
    print(f"{'windows':18} {'margin':>6} {'answer':>6} {'after s':>7} {'found':>5} {'cancelled':>9} {'lists':>5} "
          f"{'429s':>5} {'over':>5} {'seconds':>8} {'least':>6} {'over least':>10}")  # fmt: skip
    for r in runs:
        over = r["over_a_window_cancel"] + r["over_a_window_list"]
        print(f"{r['rate_limits']:18} {r['margin_ms']:>6} {r['first_answer']:>6} {r['first_answer_seconds']:>7.2f} "
              f"{r['found']:>5} {r['cancelled']:>9} {r['list_calls']:>5} {r['upstream_429']:>5} {over:>5} "
              f"{r['seconds']:>8.3f} {r['least_seconds']:>6g} {r['over_least']:>10.2%}")  # fmt: skip
    print(f"written to {RESULTS / 'bulk.json'}")


if __name__ == "__main__":
    main()
