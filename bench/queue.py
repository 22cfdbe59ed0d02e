"""The queue path at the quota limit: how fast a backlog drains, and what it adds to the wait.

Puts a backlog of messages on `cancel-machine-action` in Azurite and lets two queue-host processes
(localdev.queuehost, the host's semantics) drain it through the app, against the Defender
simulator. The default windows are compressed in time (`--compression 10`: RATE_LIMITS=100/6,1500/360,
margin 100 ms, so 6 s stand for a minute). Reports messages drained per (compressed) minute against
the quota of 100, and, for each call that had to wait for the quota, the delay beyond that wait:
its upstream arrival minus the earliest moment the windows allowed it given the calls before it
(what deferral, polling and visibility timing cost).

    python -m bench.queue [--messages 400] [--compression 10]

Prints the figures and writes bench/results/queue-x<compression>.json.
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
from shared.config.settings import StorageConnection
from shared.faces import queue_api
from shared.ratelimit.table import TableSlidingLog
from shared.storage.clients import table_client

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOSTS = int(os.environ.get("BENCH_QUEUE_HOSTS", "2"))


def windows_for(compression: int) -> tuple[tuple[tuple[int, float], ...], int]:
    """The default windows (100/60, 1500/3600) and margin (1000 ms), `compression` times faster."""
    return ((100, 60.0 / compression), (1500, 3600.0 / compression)), 1000 // compression


def quota_wait_until(arrivals: list[float], windows: tuple[tuple[int, float], ...], margin_ms: int) -> list[float]:
    """For each call, the earliest moment the windows (with the margin) allowed it, given the calls
    that actually went before it: the quota's own wait. What comes on top is ours."""
    allowed = []
    for n in range(len(arrivals)):
        t = arrivals[0]
        for limit, seconds in windows:
            if n >= limit:
                t = max(t, arrivals[n - limit] + seconds + margin_ms / 1000)
        allowed.append(t)
    return allowed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--compression", type=int, default=10, help="how many times faster than real windows")
    args = parser.parse_args()
    windows, safety_ms = windows_for(args.compression)
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    sim = DefenderSimulator(windows=windows, token_secret=tokens.DEFAULT_SECRET).start()
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
            "RATE_LIMITS": ",".join(f"{c}/{s:g}" for c, s in windows),
            "RATE_LIMIT_SAFETY_MS": str(safety_ms),
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
        # Slots the limiter logged: one per call, plus any given up (a write that came back late).
        connection = StorageConnection(connection_string=azurite.connection_string)
        store = TableSlidingLog(table_client(connection, "CancelRateLimit"), "Public-system")
        logged = store.read().log
        slots_logged = len(logged)
    finally:
        sim.stop()
        identity.stop()
        azurite.stop()
    arrivals = sorted(c.at for c in sim.calls() if c.status == 200)
    allowed = quota_wait_until(arrivals, windows, safety_ms)
    # Only calls that had to wait for the quota: the first minute's burst is the backlog's own.
    extra = [a - q for a, q in zip(arrivals, allowed, strict=True) if q > arrivals[0]]
    span = arrivals[-1] - arrivals[0]
    minute = 60.0 / args.compression
    # The quota lets a backlog's first minute through at once; the drain rate is what follows it:
    # the calls after the first minute's, per minute from the first call to the last.
    first_minute = sum(1 for a in arrivals if a < arrivals[0] + minute)
    per_minute = (len(arrivals) - first_minute) / (span / minute) if span > 0 else 0.0
    result = {
        "messages": args.messages,
        "results": result_count,
        "upstream_calls": len(sim.calls()),
        "slots_logged": slots_logged,
        "upstream_429": sum(1 for c in sim.calls() if c.status == 429),
        "calls_over_a_window": violations([c.at for c in sim.calls()], windows),
        "compression": args.compression,
        "drain_seconds": span,
        "drained_per_minute": round(per_minute, 1),
        "quota_per_minute": windows[0][0],
        "extra_delay_ms_median": round(statistics.median(extra) * 1000, 1),
        "extra_delay_ms_p95": round(sorted(extra)[int(0.95 * (len(extra) - 1))] * 1000, 1),
        "extra_delay_ms_max": round(max(extra) * 1000, 1),
        "sample_outcomes": sorted({o["outcome"] for o in outcomes}),
        "arrivals_s": [round(a - arrivals[0], 3) for a in arrivals],
        "allowed_s": [round(q - arrivals[0], 3) for q in allowed],
        "logged_minus_arrival_ms": [round(t - a * 1000) for t, a in zip(logged, arrivals, strict=False)],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"queue-x{args.compression}.json").write_text(json.dumps(result, indent=2))
    print(f"{args.messages} messages, {HOSTS} queue hosts, windows {windows} (time compressed {args.compression}x)")
    print(f"drained at {per_minute:.1f} per minute (quota {windows[0][0]}); {result['results']} results; "
          f"upstream 429s {result['upstream_429']}, calls over a window {result['calls_over_a_window']}")  # fmt: skip
    print(f"delay beyond the quota's own wait: median {result['extra_delay_ms_median']} ms, "
          f"p95 {result['extra_delay_ms_p95']} ms, max {result['extra_delay_ms_max']} ms")  # fmt: skip
    print(f"written to {RESULTS / f'queue-x{args.compression}.json'}")


if __name__ == "__main__":
    main()
