"""The queue path at the quota limit: how fast a backlog drains, and what it adds to the wait.

Puts a backlog of messages on `cancel-machine-action` in Azurite and lets two queue-host processes
(localdev.queuehost, the host's semantics) drain it through the app, against the Defender
simulator. The default windows are compressed tenfold in time (RATE_LIMITS=100/6,1500/360, margin
100 ms): 6 s stand for a minute. Reports messages drained per (compressed) minute against the quota
of 100, and the delay each call had beyond the quota's own wait (its upstream arrival minus the
earliest moment the windows allowed it), which is what deferral and polling cost.

    python -m bench.queue [--messages 400]

Prints the figures and writes bench/results/queue.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from localdev import tokens
from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint
from localdev.queuehost import open_queue
from localdev.windows import violations
from shared import queue_api

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
COMPRESSION = 10
WINDOWS = ((100, 60.0 / COMPRESSION), (1500, 3600.0 / COMPRESSION))
SAFETY_MS = 1000 // COMPRESSION
HOSTS = 2


def ideal_schedule(start: float, count: int) -> list[float]:
    """The earliest moments the windows (with the margin) allow `count` calls from `start`."""
    times: list[float] = []
    for _ in range(count):
        t = start
        for limit, seconds in WINDOWS:
            if len(times) >= limit:
                t = max(t, times[-limit] + seconds + SAFETY_MS / 1000)
        times.append(t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    args = parser.parse_args()
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    sim = DefenderSimulator(windows=WINDOWS, token_secret=tokens.DEFAULT_SECRET).start()
    try:
        trigger = open_queue(azurite.connection_string, queue_api.QUEUE)
        for i in range(args.messages):
            message = {"machineActionId": sim.add_action(), "comment": "backlog", "correlationId": f"bench-{i}"}
            trigger.send_message(base64.b64encode(json.dumps(message).encode()).decode())
        env = {
            **os.environ,
            **identity.env(),
            "AzureWebJobsStorage": azurite.connection_string,
            "DEFENDER_API_BASE_URL": sim.base_url,
            "RATE_LIMITS": ",".join(f"{c}/{s:g}" for c, s in WINDOWS),
            "RATE_LIMIT_SAFETY_MS": str(SAFETY_MS),
        }
        started = time.time()
        command = [sys.executable, "-m", "localdev.queuehost", "CancelMachineActionQueue",
                   "--until", str(started + 600), "--visibility-timeout", "5"]  # fmt: skip
        hosts = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(HOSTS)]
        for host in hosts:
            host.communicate(timeout=660)
        results = open_queue(azurite.connection_string, queue_api.RESULTS_QUEUE)
        outcomes = [json.loads(base64.b64decode(m.content)) for m in results.peek_messages(max_messages=32)]
        result_count = results.get_queue_properties().approximate_message_count
    finally:
        sim.stop()
        identity.stop()
        azurite.stop()
    arrivals = sorted(c.at for c in sim.calls() if c.status == 200)
    ideal = ideal_schedule(arrivals[0], len(arrivals))
    extra = [a - i for a, i in zip(arrivals, ideal, strict=True)]
    span = arrivals[-1] - arrivals[0]
    minute = 60.0 / COMPRESSION
    # The quota lets a backlog's first minute through at once; the drain rate is what follows it:
    # the calls after the first minute's, per minute from the first call to the last.
    first_minute = sum(1 for a in arrivals if a < arrivals[0] + minute)
    per_minute = (len(arrivals) - first_minute) / (span / minute) if span > 0 else 0.0
    result = {
        "messages": args.messages,
        "results": result_count,
        "upstream_calls": len(sim.calls()),
        "upstream_429": sum(1 for c in sim.calls() if c.status == 429),
        "calls_over_a_window": violations([c.at for c in sim.calls()], WINDOWS),
        "compression": COMPRESSION,
        "drain_seconds": span,
        "drained_per_minute": round(per_minute, 1),
        "quota_per_minute": WINDOWS[0][0],
        "extra_delay_ms_median": round(statistics.median(extra) * 1000, 1),
        "extra_delay_ms_p95": round(sorted(extra)[int(0.95 * (len(extra) - 1))] * 1000, 1),
        "extra_delay_ms_max": round(max(extra) * 1000, 1),
        "sample_outcomes": sorted({o["outcome"] for o in outcomes}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "queue.json").write_text(json.dumps(result, indent=2))
    print(f"{args.messages} messages, {HOSTS} queue hosts, windows {WINDOWS} (time compressed {COMPRESSION}x)")
    print(f"drained at {per_minute:.1f} per minute (quota {WINDOWS[0][0]}); {result['results']} results; "
          f"upstream 429s {result['upstream_429']}, calls over a window {result['calls_over_a_window']}")  # fmt: skip
    print(f"delay beyond the quota's own wait: median {result['extra_delay_ms_median']} ms, "
          f"p95 {result['extra_delay_ms_p95']} ms, max {result['extra_delay_ms_max']} ms")  # fmt: skip
    print(f"written to {RESULTS / 'queue.json'}")


if __name__ == "__main__":
    main()
