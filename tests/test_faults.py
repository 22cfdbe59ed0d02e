"""Fault injection with real processes on loopback: the state store dies and returns, the identity
endpoint stalls, instances' clocks disagree, a queue host is killed mid-batch."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.identity import IdentityEndpoint
from localdev.queuehost import open_queue
from localdev.windows import violations
from shared import queue_api
from shared.ratelimit import RateLimiter
from shared.ratelimit_table import TableSlidingLog
from shared.settings import RateWindow, StorageConnection
from shared.storage import table_client
from shared.token import TokenProvider
from tests.conftest import TOKEN_SECRET, body_of, http_cancel

ROOT = Path(__file__).resolve().parent.parent


def test_state_store_killed_mid_run_fails_closed_then_resumes_by_itself(
    app_env: dict[str, str], sim: DefenderSimulator, own_azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", own_azurite.connection_string)
    assert http_cancel(sim.add_action(), headers={"Idempotency-Key": "before"}).status_code == 200
    own_azurite.kill()

    down = [http_cancel(sim.add_action(), headers={"Idempotency-Key": f"down-{i}"}) for i in range(3)]
    assert [r.status_code for r in down] == [503, 503, 503]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in down)
    assert len(sim.calls()) == 1  # nothing reached Defender while the quota could not be checked

    # The same store comes back (empty: Azurite keeps it in memory); the app recreates its tables.
    revived = Azurite((own_azurite.blob_port, own_azurite.queue_port, own_azurite.table_port)).start()
    try:
        after = http_cancel(sim.add_action(), headers={"Idempotency-Key": "after"})
        plain = http_cancel(sim.add_action())
    finally:
        revived.stop()
    assert (after.status_code, plain.status_code) == (200, 200)
    assert len(sim.calls()) == 3


def test_a_stalled_identity_endpoint_gives_504_within_the_budget(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFENDER_TIMEOUT_SECONDS", "2")
    identity.stall(5.0)
    try:
        started = time.monotonic()
        response = http_cancel(sim.add_action())
        elapsed = time.monotonic() - started
    finally:
        identity.heal()

    assert response.status_code == 504
    assert body_of(response)["error"]["code"] == "TokenUnavailable"
    assert "did not answer in time" in body_of(response)["error"]["message"]
    assert elapsed < 2 + 1.5  # the budget, plus the identity client's short backoff
    assert sim.calls("") == []


def test_a_failing_identity_endpoint_recovers_without_a_restart(
    app_env: dict[str, str], sim: DefenderSimulator, identity: IdentityEndpoint
) -> None:
    identity.fail(500, count=3)  # every attempt of the first cancel fails
    first = http_cancel(sim.add_action())
    asked = len(identity.requests)

    # MSAL then spares the endpoint for a few seconds (its throttle after a 5xx); after that the
    # same process gets a token again, with no restart.
    deadline = time.monotonic() + 15
    statuses: list[int] = []
    while time.monotonic() < deadline and (not statuses or statuses[-1] != 200):
        statuses.append(http_cancel(sim.add_action()).status_code)
        if statuses[-1] != 200:
            time.sleep(0.5)  # a caller retrying, bounded by the deadline

    assert first.status_code == 502 and asked == 3
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {502}
    assert len(identity.requests) == asked + 1  # throttled attempts did not hit the endpoint


def test_skewed_clocks_within_the_margin_never_exceed_a_window(
    azurite: Azurite, identity: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    windows = ((5, 1.0), (12, 4.0))
    sim = DefenderSimulator(windows=windows, token_secret=TOKEN_SECRET).start()
    key = f"skew-{secrets.token_hex(4)}"
    margin, skew_ms = 200, 100  # instance B's clock runs 100 ms ahead of A's: half the margin
    identity.heal()
    for name, value in identity.env().items():
        monkeypatch.setenv(name, value)
    tokens = TokenProvider("https://api.securitycenter.microsoft.com/.default")
    token = tokens.token()
    stop = time.monotonic() + 9
    errors: list[BaseException] = []

    def instance(offset_ms: int) -> None:
        def clock() -> int:
            return int(time.time() * 1000) + offset_ms

        store = TableSlidingLog(table_client(StorageConnection(azurite.connection_string), "SkewTest"), key)
        limiter = RateLimiter(store, [RateWindow(c, s) for c, s in windows], margin, clock=clock)
        session = requests.Session()
        try:
            while time.monotonic() < stop:
                limiter.acquire(max_wait=5)
                url = f"{sim.base_url}/api/machineactions/{sim.add_action()}/cancel"
                session.post(url, json={"Comment": "skew"}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=instance, args=(offset,)) for offset in (0, skew_ms, 0, skew_ms)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    sim.stop()

    calls = sim.calls()
    assert not errors, errors
    assert len(calls) >= 25  # the run used the quota, not a trickle
    assert violations([c.at for c in calls], windows) == 0
    assert all(c.status == 200 for c in calls)


@pytest.mark.slow
def test_a_queue_host_killed_mid_batch_loses_no_message(
    azurite: Azurite, identity: IdentityEndpoint, tmp_path: Path
) -> None:
    sim = DefenderSimulator(windows=((5000, 60.0),), token_secret=TOKEN_SECRET).start()
    sim.inject(Fault("slow", count=0, seconds=0.15))  # every call takes a while: the kill lands mid-call
    names = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")
    queues = {name: open_queue(azurite.connection_string, name) for name in names}
    for client in queues.values():
        client.clear_messages()
    ids = [f"kill-{i}" for i in range(40)]
    for correlation in ids:
        message = {"machineActionId": sim.add_action(), "comment": "kill test", "correlationId": correlation}
        queues[queue_api.QUEUE].send_message(base64.b64encode(json.dumps(message).encode()).decode())
    env = {**os.environ, **identity.env(), "AzureWebJobsStorage": azurite.connection_string,
           "DEFENDER_API_BASE_URL": sim.base_url, "RATE_LIMIT_KEY": f"kill-{secrets.token_hex(4)}",
           "IDEMPOTENCY_LEASE_SECONDS": "3"}  # fmt: skip
    command = [sys.executable, "-m", "localdev.queuehost", "CancelMachineActionQueue", "--lease", "3",
               "--visibility-timeout", "1"]  # fmt: skip

    first = subprocess.Popen([*command, "--until", str(time.time() + 60)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while len(sim.calls()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the simulator's record, bounded
    first.send_signal(signal.SIGKILL)  # mid-batch: some messages received, one call in flight
    first.wait(10)
    calls_at_kill = len(sim.calls())
    assert 5 <= calls_at_kill < len(ids)

    second = subprocess.run([*command, "--until", str(time.time() + 90)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    sim.stop()
    assert second.returncode == 0, second.stderr[-2000:]

    results = []
    while batch := list(queues[queue_api.RESULTS_QUEUE].receive_messages(max_messages=32)):
        for received in batch:
            results.append(json.loads(base64.b64decode(received.content)))
            queues[queue_api.RESULTS_QUEUE].delete_message(received)
    poison = queues[names[2]].peek_messages(max_messages=32)
    poisoned = [json.loads(base64.b64decode(m.content)) for m in poison]
    ended = [r["correlationId"] for r in results] + [p["correlationId"] for p in poisoned]
    assert sorted(set(ended)) == sorted(ids)  # every message ended as a result or in poison
    assert all(r["status"] in (200, 400) for r in results)  # 400: cancelled before the kill, again after
