"""A queue bulk job on a real queue host process, killed mid-way and started again: Defender's
record is the judge (every pending action cancelled once), and the results queue holds one summary."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.identity import IdentityEndpoint
from localdev.queuehost import open_queue
from shared.faces import queue_api
from tests.support.queues import read_all
from tests.support.rig import TOKEN_SECRET

ROOT = Path(__file__).resolve().parents[2]
MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
ACTIONS = 40


@pytest.mark.slow
def test_a_bulk_job_killed_mid_way_and_restarted_cancels_each_action_once_with_one_summary(
    azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path
) -> None:
    sim = DefenderSimulator(windows=((5000, 60.0),), token_secret=TOKEN_SECRET, page_size=25).start()
    sim.inject(Fault("slow", count=0, seconds=0.15))  # every call takes a while: the kill lands mid-call
    names = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")
    queues = {name: open_queue(azurite.connection_string, name) for name in names}
    for client in queues.values():
        client.clear_messages()
    pending = {sim.add_action(("Pending", "InProgress")[i % 2], machine_id=MACHINE) for i in range(ACTIONS)}
    sim.add_action("Succeeded", machine_id=MACHINE)
    job = {"machineId": MACHINE, "comment": "kill test", "correlationId": "INC-kill"}
    queues[queue_api.QUEUE].send_message(base64.b64encode(json.dumps(job).encode()).decode())
    env = {**os.environ, **identity.env(), "AzureWebJobsStorage": azurite.connection_string,
           "DEFENDER_API_BASE_URL": sim.base_url, "RATE_LIMIT_KEY": f"bulk-kill-{secrets.token_hex(4)}",
           "BULK_TABLE": f"BulkKill{secrets.token_hex(4)}", "DEFENDER_TIMEOUT_SECONDS": "2",
           "IDEMPOTENCY_LEASE_SECONDS": "8"}  # fmt: skip
    command = [sys.executable, "-m", "localdev.queuehost", "CancelMachineActionQueue", "--lease", "3",
               "--visibility-timeout", "1"]  # fmt: skip

    logs = {host: tmp_path / f"{host}-host.log" for host in ("first", "restarted")}  # files: a full pipe stalls
    with logs["first"].open("w") as sink:
        first = subprocess.Popen([*command, "--until", str(time.time() + 60), "--log-level", "INFO"], cwd=ROOT,
                                 env=env, stdout=subprocess.DEVNULL, stderr=sink)  # fmt: skip
    deadline = time.monotonic() + 30
    while len(sim.calls(api="cancel")) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the simulator's record, bounded
    first.send_signal(signal.SIGKILL)  # children received, some calls in flight, more queued
    killed_at = time.time()
    first.wait(10)
    at_kill = len(sim.calls(api="cancel"))
    assert 8 <= at_kill < ACTIONS

    with logs["restarted"].open("w") as sink:
        second = subprocess.Popen([*command, "--until", str(time.time() + 90), "--log-level", "INFO"], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=sink, text=True)  # fmt: skip
    summaries: list[dict[str, Any]] = []
    deadline = time.monotonic() + 80
    while not summaries and time.monotonic() < deadline:
        summaries += read_all(queues[queue_api.RESULTS_QUEUE])
        time.sleep(0.2)  # polling the results queue, bounded
    time.sleep(2)  # a grace for any second summary to show itself
    second.send_signal(signal.SIGTERM)
    second.wait(30)
    summaries += read_all(queues[queue_api.RESULTS_QUEUE])
    poisoned = read_all(queues[names[2]])
    sim.stop()

    assert len(summaries) == 1 and poisoned == [], (summaries, poisoned)
    [summary] = summaries
    sent = Counter(c.path.split("/")[-2] for c in sim.calls(api="cancel"))
    twice = {a for a, n in sent.items() if n > 1}
    assert set(sent) == pending and not twice, timeline(sim, twice, killed_at, logs)  # each once
    assert all(sim.status_of(a) == "Cancelled" for a in pending)
    assert (summary["found"], summary["cancelled"], summary["failed"]) == (ACTIONS, ACTIONS, 0), summary


def timeline(sim: DefenderSimulator, actions: set[str], killed_at: float, logs: dict[str, Path]) -> str:
    """What Defender saw of `actions` (seconds from the kill), and what each host logged of them and
    every warning: what to read when an action was sent twice."""
    lines = [f"sent more than once: {sorted(actions)}"]
    lines += [f"{c.at - killed_at:+.3f} s {c.method} {c.path} {c.status}" for c in sim.state.calls
              if any(a in c.path for a in actions)]  # fmt: skip
    for host, path in logs.items():
        said = [ln for ln in path.read_text().splitlines() if " WARNING " in ln or any(a in ln for a in actions)]
        lines += [f"the {host} host said:", *said[-40:]]
    return "\n".join(lines)
