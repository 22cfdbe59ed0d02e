"""The shared limiter under load, against a naive fixed-window counter and no limiter at all.

Each run starts N app instances (processes, `bench.hammer`) that call the HTTP function as fast
as they can through the same Azurite table, behind a counting proxy, against the Defender
simulator enforcing the same windows (it answers 429 like Defender). Time is compressed with
RATE_LIMITS=10/2,30/8. Per run: upstream 429s and calls over a rolling window, utilization of
what the windows allow over the span, Table requests and log entries per admitted call, admission
latency. Fault rows: every write to the limiter's table slowed by 300 or 600 ms (a throttled
account plus an SDK retry), and instances that start cold beside a busy one while the identity
endpoint takes 800 ms per token.

    python -m bench.limiter [--seconds 31] [--quick]

Prints a table and writes bench/results/limiter.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from localdev import tokens
from localdev.azurite import Azurite
from localdev.countingproxy import CountingProxy
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint
from localdev.windows import max_allowed, violations
from shared.config.settings import DEFAULT_AUDIT_TABLE, DEFAULT_RATE_LIMIT_TABLE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WINDOWS = ((10, 2.0), (30, 8.0))
RATE_LIMITS = "10/2,30/8"
SAFETY_MS = "150"
STARTUP = 5.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def hammer(start: float, until: float, strategy: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.hammer",
        "--start-at",
        str(start),
        "--until",
        str(until),
        "--strategy",
        strategy,
    ]


def run(
    azurite: Azurite,
    identity: IdentityEndpoint,
    strategy: str,
    processes: int,
    seconds: float,
    limits: str,
    write_delay: float = 0.0,
    cold_starts: tuple[float, ...] = (),
    label: str = "",
) -> dict[str, Any]:
    """`processes` instances from the start, plus one more at each of `cold_starts` (seconds in)."""
    windows = tuple((int(c), float(s)) for c, s in (w.split("/") for w in limits.split(",")))
    sim = DefenderSimulator(windows=windows, token_secret=tokens.DEFAULT_SECRET).start()
    proxy = CountingProxy("127.0.0.1", azurite.table_port, write_delay=write_delay,
                          slow_path=DEFAULT_RATE_LIMIT_TABLE).start()  # fmt: skip
    conn = azurite.connection_string.replace(f":{azurite.table_port}/", f":{proxy.port}/")
    env = {
        **os.environ,
        **identity.env(),
        "AzureWebJobsStorage": conn,
        "DEFENDER_API_BASE_URL": sim.base_url,
        "RATE_LIMITS": limits,
        "RATE_LIMIT_SAFETY_MS": SAFETY_MS,
        "RATE_LIMIT_KEY": f"bench-{strategy}-{processes}-{time.time_ns()}",
        "HTTP_MAX_WAIT_SECONDS": "10",
    }
    start = time.time() + STARTUP
    until = start + seconds
    starts = [start] * processes + [start + offset for offset in cold_starts]
    asked_before = len(identity.requests)
    try:
        procs = [
            subprocess.Popen(hammer(at, until, strategy), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            for at in starts
        ]
        outputs = [json.loads(p.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1]) for p in procs]
        # The limiter's own table; the audit trail (one insert per call) is counted apart.
        table_requests = proxy.count_since(start, DEFAULT_RATE_LIMIT_TABLE)
        log_entries = proxy.writes_applied_since(start, DEFAULT_RATE_LIMIT_TABLE)  # each adds one entry
        audit_requests = proxy.count_since(start, DEFAULT_AUDIT_TABLE)
    finally:
        proxy.stop()
        sim.stop()
    calls = sim.calls()
    accepted = [c.at for c in calls if c.status != 429 and c.at >= start]
    in_span = [a for a in accepted if a <= until]
    acquire = [ms for o in outputs for ms in o["acquire_ms"]]
    allowed = max_allowed(seconds, windows)
    return {
        "strategy": label or strategy,
        "processes": len(starts),
        "write_delay_ms": round(write_delay * 1000),
        "rate_limits": limits,
        "seconds": seconds,
        "upstream_calls": len(calls),
        "upstream_429": sum(1 for c in calls if c.status == 429),
        "calls_over_a_window": violations([c.at for c in calls], windows),
        "admitted": len(accepted),
        "allowed_in_span": allowed,
        "utilization": round(len(in_span) / allowed, 4),
        "table_requests": table_requests,
        "table_requests_per_admitted": round(table_requests / max(1, len(accepted)), 3),
        "log_entries": log_entries,
        "log_entries_per_admitted": round(log_entries / max(1, len(accepted)), 3),
        "identity_requests": len(identity.requests) - asked_before,
        "audit_requests": audit_requests,
        "admission_ms_p50": percentile(acquire, 0.5),
        "admission_ms_p99": percentile(acquire, 0.99),
        "admission_ms_mean": statistics.fmean(acquire) if acquire else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=31.0, help="span of each saturated run")
    parser.add_argument("--quick", action="store_true", help="shared limiter only, 15 s spans")
    args = parser.parse_args()
    seconds = 15.0 if args.quick else args.seconds
    plan = [("shared", 1), ("shared", 6)] + ([] if args.quick else [("fixed", 6), ("none", 6)])
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    try:
        saturated = [run(azurite, identity, s, n, seconds, RATE_LIMITS) for s, n in plan]
        faults = [
            run(azurite, identity, "shared", 3, seconds, RATE_LIMITS, write_delay=delay, label=f"slow+{delay * 1000:g}")
            for delay in (0.3, 0.6)
        ]
        slow_identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
        slow_identity.stall(0.8)
        try:
            cold = (2.1, 4.3, 6.2, 8.05, 12.3, 16.1)  # just after bursts, when windows are full
            faults.append(run(azurite, slow_identity, "shared", 1, seconds, RATE_LIMITS, cold_starts=cold,
                              label="cold+800"))  # fmt: skip
        finally:
            slow_identity.stop()
        # Uncontended admission: a quota far above demand, so no caller ever waits for a slot.
        light = [run(azurite, identity, "shared", n, 5.0, "5000/2") for n in (1, 6)]
    finally:
        identity.stop()
        azurite.stop()
    result = {"saturated": saturated, "faults": faults, "uncontended": light, "safety_ms": int(SAFETY_MS),
              "cpus": os.cpu_count()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limiter.json").write_text(json.dumps(result, indent=2))
    header = (
        f"{'strategy':10} {'proc':>4} {'calls':>6} {'429s':>5} {'over':>5} {'util':>6} {'tbl/adm':>7} "
        f"{'log/adm':>7} {'p50 ms':>8} {'p99 ms':>8}"
    )
    print(f"saturated, RATE_LIMITS={RATE_LIMITS}, RATE_LIMIT_SAFETY_MS={SAFETY_MS}, span {seconds:g} s")
    print(header)
    for r in saturated:
        print(_row(r))
    print("faults: limiter writes slowed 300/600 ms (3 processes); 6 cold instances beside a busy one, tokens 800 ms")
    print(header)
    for r in faults:
        print(_row(r))
    print("uncontended (quota far above demand): admission cost alone")
    print(header)
    for r in light:
        print(_row(r))
    print(f"written to {RESULTS / 'limiter.json'}")


def _row(r: dict[str, Any]) -> str:
    p50 = "-" if r["admission_ms_p50"] is None else f"{r['admission_ms_p50']:.1f}"
    p99 = "-" if r["admission_ms_p99"] is None else f"{r['admission_ms_p99']:.1f}"
    return (
        f"{r['strategy']:10} {r['processes']:>4} {r['upstream_calls']:>6} {r['upstream_429']:>5} "
        f"{r['calls_over_a_window']:>5} {r['utilization']:>6.1%} {r['table_requests_per_admitted']:>7.2f} "
        f"{r['log_entries_per_admitted']:>7.2f} {p50:>8} {p99:>8}"
    )


if __name__ == "__main__":
    main()
