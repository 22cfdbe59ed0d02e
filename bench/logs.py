"""What the app logs per cancel, with logging set up the way the Functions Python worker does it.

The worker puts one handler on the root logger at INFO and forwards every record it gets to the
host (and, on Azure, to Application Insights as a trace). This runs one cold cancel, then N warm
ones through the HTTP function against Azurite, the identity endpoint and the simulator, with such
a handler, and counts the records and their bytes (message text, as forwarded), by logger.

    python -m bench.logs [--cancels 50]

Prints the counts and writes bench/results/logs.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import azure.functions as func

from localdev import tokens
from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


class Recorder(logging.Handler):
    """The worker's handler, reduced to what matters here: every record, formatted as forwarded."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def worker_logging() -> Iterator[Recorder]:
    root = logging.getLogger()
    recorder, level = Recorder(), root.level
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        root.removeHandler(recorder)
        root.setLevel(level)


def cancel(action_id: str) -> func.HttpResponse:
    from CancelMachineAction import main

    return main(func.HttpRequest(method="POST", url=f"/api/machineactions/{action_id}/cancel",
                                 route_params={"actionId": action_id}, headers={"x-correlation-id": "bench-logs"},
                                 body=b'{"Comment": "counting log records"}'))  # fmt: skip


def measure(sim: DefenderSimulator, cancels: int) -> dict[str, Any]:
    """Records and bytes of the cold first cancel and of `cancels` warm ones, with the app as built
    from the environment (the caller sets it up)."""
    from shared.app import reset_app

    reset_app()
    with worker_logging() as recorder:
        assert cancel(sim.add_action()).status_code == 200
        cold = list(recorder.records)
        recorder.records.clear()
        for _ in range(cancels):
            assert cancel(sim.add_action()).status_code == 200
        warm = list(recorder.records)
    return {
        "cold_records": len(cold),
        "cold_bytes": sum(len(r.getMessage()) for r in cold),
        "warm_cancels": cancels,
        "warm_records": len(warm),
        "warm_bytes": sum(len(r.getMessage()) for r in warm),
        "records_per_warm_cancel": round(len(warm) / cancels, 3),
        "warm_by_logger": dict(Counter(r.name for r in warm)),
        "cold_by_logger": dict(Counter(r.name for r in cold)),
        "records": [r.getMessage() for r in warm[:3]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cancels", type=int, default=50)
    args = parser.parse_args()
    azurite = Azurite().start()
    identity = IdentityEndpoint(token_secret=tokens.DEFAULT_SECRET).start()
    sim = DefenderSimulator(windows=((10_000, 60.0),), token_secret=tokens.DEFAULT_SECRET).start()
    key = f"bench-logs-{secrets.token_hex(4)}"
    os.environ.update({**identity.env(), "AzureWebJobsStorage": azurite.connection_string,
                       "DEFENDER_API_BASE_URL": sim.base_url, "RATE_LIMIT_KEY": key})  # fmt: skip
    try:
        result = measure(sim, args.cancels)
    finally:
        sim.stop()
        identity.stop()
        azurite.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs.json").write_text(json.dumps(result, indent=2))
    print(f"cold first cancel: {result['cold_records']} records, {result['cold_bytes']} bytes "
          f"{result['cold_by_logger']}")  # fmt: skip
    print(f"{args.cancels} warm cancels: {result['warm_records']} records ({result['records_per_warm_cancel']} per "
          f"cancel), {result['warm_bytes']} bytes {result['warm_by_logger']}")  # fmt: skip
    print(f"written to {RESULTS / 'logs.json'}")


if __name__ == "__main__":
    main()
