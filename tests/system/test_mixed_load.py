"""200 queue messages and 200 HTTP requests, 50 keys duplicated, over 4 processes:
Defender sees exactly one call per distinct key, and every message gets exactly one result."""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.identity import IdentityEndpoint
from localdev.queuehost import open_queue
from shared.faces import queue_api
from tests.support.rig import TOKEN_SECRET

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
DISTINCT, DUPLICATED = 150, 50  # per path: 150 distinct keys, 50 of them sent twice


def keys(prefix: str) -> list[str]:
    distinct = [f"{prefix}-{i}" for i in range(DISTINCT)]
    return distinct + distinct[:DUPLICATED]


@pytest.mark.slow
def test_mixed_load_calls_defender_once_per_key_and_answers_every_message(
    azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path
) -> None:
    sim = DefenderSimulator(windows=((100_000, 60.0),), token_secret=TOKEN_SECRET).start()
    rng = random.Random(7)
    queue_keys, http_keys = keys("q"), keys("h")
    action_of = {key: sim.add_action() for key in set(queue_keys) | set(http_keys)}
    names = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")
    clients = {name: open_queue(azurite.connection_string, name) for name in names}
    for client in clients.values():
        client.clear_messages()
    rng.shuffle(queue_keys)
    for key in queue_keys:
        message = {"machineActionId": action_of[key], "comment": "mixed", "correlationId": key}
        clients[queue_api.QUEUE].send_message(base64.b64encode(json.dumps(message).encode()).decode())
    rng.shuffle(http_keys)
    env = {
        **os.environ,
        **identity.env(),
        "AzureWebJobsStorage": azurite.connection_string,
        "DEFENDER_API_BASE_URL": sim.base_url,
        "RATE_LIMITS": "5000/60",
        "RATE_LIMIT_KEY": f"mixed-{secrets.token_hex(4)}",
    }
    until = time.time() + 150
    procs = []
    for i in range(PROCESSES):
        jobs = tmp_path / f"jobs-{i}.json"
        share = [{"actionId": action_of[k], "key": k} for k in http_keys[i::PROCESSES]]
        jobs.write_text(json.dumps({"http": share, "until": until}))
        worker = [sys.executable, "-m", "tests.support.mixed_worker", str(jobs)]
        procs.append(
            subprocess.Popen(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=200)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    sim.stop()

    results: list[dict[str, object]] = []
    while batch := list(clients[queue_api.RESULTS_QUEUE].receive_messages(max_messages=32, messages_per_page=32)):
        for received in batch:
            results.append(json.loads(base64.b64decode(received.content)))
            clients[queue_api.RESULTS_QUEUE].delete_message(received)
    called = Counter(c.path.split("/")[3] for c in sim.calls())
    answers = [a for o in outputs for a in o["http"]]

    assert len(called) == DISTINCT * 2 and max(called.values()) == 1  # one call per distinct key
    assert Counter(r["correlationId"] for r in results) == Counter(queue_keys)  # one result per message
    assert all(r["status"] == 200 for r in results)
    assert sum(1 for r in results if r.get("replayed")) == DUPLICATED
    assert len(answers) == len(http_keys) and all(a["status"] == 200 for a in answers)
    assert sum(1 for a in answers if a["replayed"]) == DUPLICATED
    assert clients[queue_api.QUEUE + "-poison"].get_queue_properties().approximate_message_count == 0
