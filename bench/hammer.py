"""One "instance" of the app under load: calls the HTTP function in a loop for a while.

Run as a separate process (`python -m bench.hammer --start-at T --until U`), with the app settings in the
environment, so several of them are several function instances sharing one quota. Prints one JSON
line: the statuses it got and how long each admission took.

Strategies: `shared` is the app as deployed; `fixed` swaps in a naive fixed-window counter kept in
the same table; `none` has no limiter and, like a naive client, retries after Defender's 429;
`one-key` gives every tenant the home tenant's limiter, as one deployment with one quota key for
all its tenants would. `--tenant NAME` calls the tenant route (TENANTS) instead of the home one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any

import azure.functions as func

from bench.strategies import FixedWindowLimiter

ACTION_IDS = 2000


def request(action_id: str, tenant: str | None = None) -> func.HttpRequest:
    prefix = f"/api/tenants/{tenant}" if tenant else "/api"
    return func.HttpRequest(
        method="POST",
        url=f"{prefix}/machineactions/{action_id}/cancel",
        route_params={"actionId": action_id, **({"tenant": tenant} if tenant else {})},
        headers={},
        body=b'{"Comment": "load"}',
    )


def instrument(strategy: str, acquire_ms: list[float], tenant: str | None = None) -> None:
    """Time every admission (and swap the limiter for the comparison strategies). The token is not
    fetched ahead: each instance's first call pays for it, as a cold instance on Azure does."""
    from shared.app import get_app
    from shared.formats import Api

    app = get_app()
    quotas: Any = app.of(app.settings.tenants.resolve(tenant)).defender._quotas  # the client owns its quotas
    if strategy == "one-key":
        quotas[Api.CANCEL] = app.home.limiter
    if strategy == "fixed":
        quotas[Api.CANCEL] = FixedWindowLimiter.from_settings(app.settings)
    elif strategy == "none":
        del quotas[Api.CANCEL]
        return
    gate = quotas[Api.CANCEL]
    original = gate.acquire

    def timed(max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Any:
        start = time.perf_counter()
        try:
            return original(max_wait, spent, share)
        finally:
            acquire_ms.append((time.perf_counter() - start) * 1000)

    gate.acquire = timed


def warm(tenant: str | None) -> None:
    """The instance's app built (settings, tables) and its token fetched, no call made: the span
    then measures the quota, not a cold start."""
    from shared.app import get_app

    app = get_app()
    app.of(app.settings.tenants.resolve(tenant)).defender._tokens.token()


def skew_clock(seconds: float) -> None:
    """This process's wall clock runs `seconds` off, as a VM's clock may (the limiter reads time.time)."""
    real = time.time
    time.time = lambda: real() + seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start-at", type=float, required=True, help="epoch seconds: first call")
    parser.add_argument("--until", type=float, required=True, help="epoch seconds: no new call after")
    parser.add_argument("--strategy", choices=["shared", "fixed", "none", "one-key"], default="shared")
    parser.add_argument("--tenant", default=None, help="a TENANTS name: call its route")
    parser.add_argument("--clock-skew-ms", type=float, default=0.0, help="run this instance's clock ahead (or behind)")
    parser.add_argument("--warm", action="store_true", help="build the app and fetch its token before the span")
    args = parser.parse_args()
    if args.clock_skew_ms:
        skew_clock(args.clock_skew_ms / 1000)
    from CancelMachineAction import main as home_cancel
    from CancelTenantMachineAction import main as tenant_cancel

    cancel = tenant_cancel if args.tenant else home_cancel
    acquire_ms: list[float] = []
    instrument(args.strategy, acquire_ms, args.tenant)
    if args.warm:
        warm(args.tenant)
    statuses: Counter[int] = Counter()
    # Every instance starts at the same moment, warmed up (settings, token, tables), so the run
    # measures the limiter and not interpreter start-up.
    time.sleep(max(0.0, args.start_at - time.time() + args.clock_skew_ms / 1000))
    while time.time() - args.clock_skew_ms / 1000 < args.until:
        response = cancel(request(str(uuid.uuid4()), args.tenant))
        statuses[response.status_code] += 1
        if args.strategy == "none" and response.status_code == 429:
            # a naive client: believe Retry-After, but do not outlive the run
            pause = float(response.headers.get("Retry-After", "1"))
            time.sleep(min(pause, max(0.0, args.until - time.time())))
    json.dump({"statuses": dict(statuses), "acquire_ms": acquire_ms}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
