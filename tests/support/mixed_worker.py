"""One app instance for the mixed-load test: runs the queue trigger host and sends HTTP cancels.

    python -m tests.support.mixed_worker JOBS.json   (app settings in the environment)

JOBS.json: {"http": [{"actionId", "key"}...], "until": epoch seconds}. Prints one JSON line with the
HTTP answers. Stops when its HTTP jobs are done and the trigger queue holds no message, visible or deferred.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import azure.functions as func

from localdev.queuehost import QueueFunction, run_until_empty

ROOT = Path(__file__).resolve().parents[2]


def send_http(jobs: list[dict[str, str]], answers: list[dict[str, object]], until: float) -> None:
    from CancelMachineAction import main

    for job in jobs:
        while time.time() < until:
            request = func.HttpRequest(
                method="POST",
                url=f"/api/machineactions/{job['actionId']}/cancel",
                route_params={"actionId": job["actionId"]},
                headers={"Idempotency-Key": job["key"]},
                body=b'{"Comment": "mixed load"}',
            )
            response = main(request)
            if response.status_code != 409:  # in flight elsewhere: a real client tries again shortly
                answers.append({"key": job["key"], "status": response.status_code,
                                "replayed": response.headers.get("Idempotent-Replayed") == "true"})  # fmt: skip
                break
            time.sleep(0.1)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    until = float(spec["until"])
    conn = os.environ["AzureWebJobsStorage"]
    host = QueueFunction(ROOT / "CancelMachineActionQueue", conn, visibility_timeout=1)
    answers: list[dict[str, object]] = []
    sender = threading.Thread(target=send_http, args=(spec["http"], answers, until))
    sender.start()
    run_until_empty(host, until, busy=sender.is_alive)
    sender.join()
    print(json.dumps({"http": answers, "invocations": host.invocations}))


if __name__ == "__main__":
    main()
