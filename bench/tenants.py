"""Two tenants saturated at once from one deployment, each with its own quota, beside one shared key.

Each run starts `--processes` app instances per tenant (`bench.hammer --tenant`), all through one
Azurite, with tokens from the real azure-identity credentials: the identity endpoint, and the
loopback Entra endpoint doing the federated-credential exchange over TLS. The Defender simulator
counts its windows per app and tenant, as Defender does, and is the judge. Time is compressed with
RATE_LIMITS=10/2,30/8. Each instance builds its app and fetches its token before the span (a cold
first call on a loaded machine would otherwise cost the span a burst). Per tenant: upstream 429s,
calls over a window, utilization of what its windows allow over the span, and tokens issued by
Entra (one per process per token lifetime).

Runs: `per-tenant` (the app as deployed: a quota key per app + tenant) and `one-key` (every tenant
drawing on one key, as a deployment with a single limiter would: each tenant gets about half).

    python -m bench.tenants [--seconds 31] [--processes 3]

Prints a table and writes bench/results/tenants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.limiter import RATE_LIMITS, RESULTS, SAFETY_MS, STARTUP, WINDOWS
from localdev import tokens
from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.entra import EntraEndpoint
from localdev.identity import IdentityEndpoint
from localdev.stack import LOCAL_TENANTS, federate
from localdev.windows import max_allowed, violations

ROOT = Path(__file__).resolve().parent.parent  # the same compressed windows and margin as bench.limiter


def run(
    azurite: Azurite,
    identity: IdentityEndpoint,
    entra: EntraEndpoint,
    strategy: str,
    per_tenant: int,
    seconds: float,
    secret: str = tokens.DEFAULT_SECRET,
) -> dict[str, Any]:
    sim = DefenderSimulator(windows=WINDOWS, token_secret=secret).start()
    for tenant_id in LOCAL_TENANTS.values():
        sim.add_tenant(tenant_id)
    entra.requests.clear()
    env = {
        **os.environ,
        **identity.env(),
        **federate(entra, identity, LOCAL_TENANTS),
        "AzureWebJobsStorage": azurite.connection_string,
        "DEFENDER_API_BASE_URL": sim.base_url,
        "RATE_LIMITS": RATE_LIMITS,
        "RATE_LIMIT_SAFETY_MS": SAFETY_MS,
        "RATE_LIMIT_TABLE": f"BenchTenants{secrets.token_hex(4)}",  # fresh logs for every run
        "RATE_LIMIT_KEY": f"bench-home-{secrets.token_hex(4)}",
        "HTTP_MAX_WAIT_SECONDS": "10",
    }
    start = time.time() + STARTUP
    until = start + seconds
    try:
        commands = [_hammer(start, until, strategy, name) for name in LOCAL_TENANTS for _ in range(per_tenant)]
        procs = [
            subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in commands
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"an instance failed: {err[-2000:]}")
    finally:
        sim.stop()
    allowed = max_allowed(seconds, WINDOWS)
    tenants = {}
    for name, tenant_id in LOCAL_TENANTS.items():
        calls = sim.calls(tenant=tenant_id)
        in_span = [c.at for c in calls if c.status != 429 and start <= c.at <= until]
        tenants[name] = {
            "upstream_calls": len(calls),
            "upstream_429": sum(1 for c in calls if c.status == 429),
            "calls_over_a_window": violations([c.at for c in calls], WINDOWS),
            "admitted_in_span": len(in_span),
            "allowed_in_span": allowed,
            "utilization": round(len(in_span) / allowed, 4),
            "tokens_issued": entra.issued(tenant_id),
            "processes": per_tenant,
        }
    return {"strategy": strategy, "seconds": seconds, "rate_limits": RATE_LIMITS, "tenants": tenants}


def _hammer(start: float, until: float, strategy: str, tenant: str) -> list[str]:
    return [sys.executable, "-m", "bench.hammer", "--start-at", str(start), "--until", str(until),
            "--strategy", strategy, "--tenant", tenant, "--warm"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=31.0, help="span of each saturated run")
    parser.add_argument("--processes", type=int, default=3, help="instances per tenant")
    args = parser.parse_args()
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    entra = EntraEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    try:
        runs = [run(azurite, identity, entra, s, args.processes, args.seconds) for s in ("shared", "one-key")]
    finally:
        entra.stop()
        identity.stop()
        azurite.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tenants.json").write_text(json.dumps({"runs": runs, "cpus": os.cpu_count()}, indent=2))
    print(f"two tenants saturated, {args.processes} processes each, RATE_LIMITS={RATE_LIMITS}, span {args.seconds:g} s")
    print(f"{'quota keys':12} {'tenant':9} {'calls':>6} {'429s':>5} {'over':>5} {'util':>7} {'tokens':>7}")
    for r in runs:
        label = "per tenant" if r["strategy"] == "shared" else "one shared"
        for name, t in r["tenants"].items():
            print(f"{label:12} {name:9} {t['upstream_calls']:>6} {t['upstream_429']:>5} {t['calls_over_a_window']:>5} "
                  f"{t['utilization']:>7.1%} {t['tokens_issued']:>7}")  # fmt: skip
    print(f"written to {RESULTS / 'tenants.json'}")


if __name__ == "__main__":
    main()
