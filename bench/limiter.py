"""The shared limiter under load, against a naive fixed-window counter and no limiter at all.

Each run starts N app instances (processes, `bench.hammer`) that call the HTTP function as fast
as they can through the same Azurite table, behind a counting proxy, against the Defender
simulator enforcing the same windows (it answers 429 like Defender). Time is compressed with
RATE_LIMITS=10/2,30/8. Per run: upstream 429s and calls over a rolling window, utilization of
what the windows allow over the span, Table requests per admitted call, admission latency.

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
from shared.settings import DEFAULT_AUDIT_TABLE, DEFAULT_RATE_LIMIT_TABLE

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


def run(
    azurite: Azurite, identity: IdentityEndpoint, strategy: str, processes: int, seconds: float, limits: str
) -> dict[str, Any]:
    windows = tuple((int(c), float(s)) for c, s in (w.split("/") for w in limits.split(",")))
    sim = DefenderSimulator(windows=windows, token_secret=tokens.DEFAULT_SECRET).start()
    proxy = CountingProxy("127.0.0.1", azurite.table_port).start()
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
    command = [sys.executable, "-m", "bench.hammer", "--start-at", str(start), "--until", str(until),
               "--strategy", strategy]  # fmt: skip
    try:
        procs = [
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)
        ]
        outputs = [json.loads(p.communicate(timeout=seconds + 120)[0].strip().splitlines()[-1]) for p in procs]
        # The limiter's own table; the audit trail (one insert per call) is counted apart.
        table_requests = proxy.count_since(start, DEFAULT_RATE_LIMIT_TABLE)
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
        "strategy": strategy,
        "processes": processes,
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
        # Uncontended admission: a quota far above demand, so no caller ever waits for a slot.
        light = [run(azurite, identity, "shared", n, 5.0, "5000/2") for n in (1, 6)]
    finally:
        identity.stop()
        azurite.stop()
    result = {"saturated": saturated, "uncontended": light, "safety_ms": int(SAFETY_MS), "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limiter.json").write_text(json.dumps(result, indent=2))
    header = (
        f"{'strategy':8} {'proc':>4} {'calls':>6} {'429s':>5} {'over':>5} {'util':>6} {'tbl/adm':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    print(f"saturated, RATE_LIMITS={RATE_LIMITS}, RATE_LIMIT_SAFETY_MS={SAFETY_MS}, span {seconds:g} s")
    print(header)
    for r in saturated:
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
        f"{r['strategy']:8} {r['processes']:>4} {r['upstream_calls']:>6} {r['upstream_429']:>5} "
        f"{r['calls_over_a_window']:>5} {r['utilization']:>6.1%} {r['table_requests_per_admitted']:>7.2f} "
        f"{p50:>8} {p99:>8}"
    )


if __name__ == "__main__":
    main()
