"""Fault injection with real processes on loopback, each judged by Defender's own record: the state
store dies and returns, slows down, or loses the limiter's table; the identity endpoint stalls or is
slow for cold instances; clocks disagree; a gateway fails after Defender acted; a queue host is
killed mid-batch; one ticket number names several actions on both triggers."""

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
from azure.data.tables import TableServiceClient

from localdev.azurite import Azurite
from localdev.countingproxy import CountingProxy
from localdev.defender import DefenderSimulator, Fault
from localdev.identity import IdentityEndpoint
from localdev.queuehost import open_queue
from localdev.windows import violations
from shared.config.settings import DEFAULT_RATE_LIMIT_TABLE, StorageConnection
from shared.faces import queue_api
from shared.ratelimit.table import TableSlidingLog
from shared.storage.clients import table_client
from tests.support.instances import finish, run_instances, start_instances
from tests.support.queues import read_all
from tests.support.rig import TOKEN_SECRET, body_of, http_cancel

ROOT = Path(__file__).resolve().parents[2]


def test_state_store_killed_mid_run_fails_closed_then_resumes_by_itself(
    app_env: dict[str, str], sim: DefenderSimulator, own_azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", own_azurite.connection_string)
    monkeypatch.setenv("RATE_LIMITS", "3/600")
    assert http_cancel(sim.add_action(), headers={"Idempotency-Key": "before"}).status_code == 200
    assert http_cancel(sim.add_action()).status_code == 200
    own_azurite.kill()

    down = [http_cancel(sim.add_action(), headers={"Idempotency-Key": f"down-{i}"}) for i in range(3)]
    assert [r.status_code for r in down] == [503, 503, 503]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in down)
    assert len(sim.calls()) == 2  # nothing reached Defender while the quota could not be checked

    # The same store comes back empty (Azurite keeps it in memory); the app recreates its tables and
    # rebuilds the quota from what it knows: the two calls before the kill still count.
    revived = Azurite((own_azurite.blob_port, own_azurite.queue_port, own_azurite.table_port)).start()
    try:
        after = http_cancel(sim.add_action(), headers={"Idempotency-Key": "after"})
        over = http_cancel(sim.add_action())
    finally:
        revived.stop()
    assert after.status_code == 200
    assert over.status_code == 429 and body_of(over)["error"]["code"] == "TooManyRequests"
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


SKEW_WINDOWS = ((10, 2.0), (30, 8.0))


def saturating_env(sim: DefenderSimulator, identity: IdentityEndpoint, storage: str, **extra: str) -> dict[str, str]:
    return {**os.environ, **identity.env(), "AzureWebJobsStorage": storage, "DEFENDER_API_BASE_URL": sim.base_url,
            "RATE_LIMITS": "10/2,30/8", "RATE_LIMIT_SAFETY_MS": "150", "RATE_LIMIT_KEY": f"f-{secrets.token_hex(4)}",
            "HTTP_MAX_WAIT_SECONDS": "10", **extra}  # fmt: skip


def judge(sim: DefenderSimulator, results: list[dict[str, Any]], windows: tuple[tuple[int, float], ...]) -> int:
    """Defender's record is the judge: no call over a window, no 429 anywhere. The calls seen."""
    calls = sim.calls()
    statuses: Counter[int] = sum((Counter({int(k): v for k, v in r["statuses"].items()}) for r in results), Counter())
    assert violations([c.at for c in calls], windows) == 0
    assert all(c.status != 429 for c in calls) and statuses[429] == 0
    assert statuses[404] == len(calls)  # every call the instances made was answered by Defender
    return len(calls)


@pytest.mark.slow
def test_skewed_clocks_within_the_margin_never_exceed_a_window(azurite: Azurite, identity: IdentityEndpoint) -> None:
    """Four instances (processes, the whole app), two of them with clocks 100 ms ahead: within the
    margin's budget for skew plus network (3/4 of 400 ms)."""
    sim = DefenderSimulator(windows=SKEW_WINDOWS, token_secret=TOKEN_SECRET).start()
    try:
        env = saturating_env(sim, identity, azurite.connection_string, RATE_LIMIT_SAFETY_MS="400")
        start = time.time() + 4
        results = run_instances(env, 2, start, start + 10) + run_instances(env, 2, start, start + 10, skew_ms=100)
    finally:
        sim.stop()

    assert judge(sim, results, SKEW_WINDOWS) >= 40  # the run used the quota, not a trickle


@pytest.mark.slow
def test_a_slow_store_burns_no_quota(azurite: Azurite, identity: IdentityEndpoint) -> None:
    """Every write to the limiter's table takes 600 ms (a throttled account and one SDK retry): the
    instances still keep every window, and log at most 2 entries per call sent."""
    windows = ((10, 2.0), (40, 60.0))  # the long window outlives the run: the log is never pruned
    sim = DefenderSimulator(windows=windows, token_secret=TOKEN_SECRET).start()
    proxy = CountingProxy("127.0.0.1", azurite.table_port, write_delay=0.6, slow_path=DEFAULT_RATE_LIMIT_TABLE).start()
    storage = azurite.connection_string.replace(f":{azurite.table_port}/", f":{proxy.port}/")
    key = f"slow-{secrets.token_hex(4)}"
    try:
        env = saturating_env(sim, identity, storage, RATE_LIMITS="10/2,40/60", RATE_LIMIT_KEY=key)
        start = time.time() + 4
        results = run_instances(env, 3, start, start + 10)
    finally:
        proxy.stop()
        sim.stop()

    sent = judge(sim, results, windows)
    store = TableSlidingLog(
        table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_RATE_LIMIT_TABLE), key
    )
    assert sent >= 10
    assert len(store.read().log) <= 2 * sent


@pytest.mark.slow
def test_cold_instances_with_a_slow_identity_endpoint_beside_a_busy_one(azurite: Azurite) -> None:
    """The identity endpoint takes 800 ms: instances that start cold while another fills the windows
    get their token before they take a slot, so their first calls are not late."""
    slow = IdentityEndpoint(token_secret=TOKEN_SECRET).start()
    slow.stall(0.8)
    sim = DefenderSimulator(windows=SKEW_WINDOWS, token_secret=TOKEN_SECRET).start()
    try:
        env = saturating_env(sim, slow, azurite.connection_string)
        start = time.time() + 4
        busy = start_instances(env, 1, start, start + 12)
        cold = [start_instances(env, 1, start + offset, start + 12) for offset in (2.1, 4.3, 6.2, 8.05)]
        results = [*finish(busy), *(r for group in cold for r in finish(group))]
    finally:
        sim.stop()
        slow.stop()

    assert judge(sim, results, SKEW_WINDOWS) >= 40
    assert len(slow.requests) == 5  # one token per instance: each cold one paid for its own


@pytest.mark.slow
def test_the_limiter_table_deleted_while_a_window_is_full(azurite: Azurite, identity: IdentityEndpoint) -> None:
    """The limiter's table is deleted twice while an instance keeps the windows full: the instance
    rebuilds the record from the log it holds, and admits no window's worth again."""
    sim = DefenderSimulator(windows=SKEW_WINDOWS, token_secret=TOKEN_SECRET).start()
    table = f"Lost{secrets.token_hex(4)}"
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    try:
        env = saturating_env(sim, identity, azurite.connection_string, RATE_LIMIT_TABLE=table)
        start = time.time() + 4
        procs = start_instances(env, 1, start, start + 14)
        for at in (start + 3.1, start + 8.6):  # each time just after a burst filled the short window
            time.sleep(max(0.0, at - time.time()))  # the schedule of the fault itself, not a wait for a result
            service.delete_table(table)
        results = finish(procs)
    finally:
        sim.stop()

    assert judge(sim, results, SKEW_WINDOWS) >= 40


def test_a_gateway_error_after_the_cancel_is_answered_and_never_sent_again(
    app_env: dict[str, str], sim: DefenderSimulator
) -> None:
    action_id = sim.add_action()
    sim.inject(Fault("acted", count=1, status=502))  # Defender cancelled; the gateway lost its answer

    first = http_cancel(action_id, headers={"Idempotency-Key": "gw-1"})
    again = http_cancel(action_id, headers={"Idempotency-Key": "gw-1"})

    assert first.status_code == 502  # that attempt's answer, not a retry's 400 "already cancelled"
    assert again.status_code == 502 and again.headers["Idempotent-Replayed"] == "true"
    assert len(sim.calls()) == 1 and sim.state.actions[action_id]["status"] == "Cancelled"


@pytest.mark.slow
def test_a_queue_host_killed_mid_batch_loses_no_message_and_cancels_none_twice(
    azurite: Azurite, identity: IdentityEndpoint
) -> None:
    sim = DefenderSimulator(windows=((5000, 60.0),), token_secret=TOKEN_SECRET).start()
    sim.inject(Fault("slow", count=0, seconds=0.15))  # every call takes a while: the kill lands mid-call
    names = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")
    queues = {name: open_queue(azurite.connection_string, name) for name in names}
    for client in queues.values():
        client.clear_messages()
    actions = [sim.add_action() for _ in range(40)]
    for i, action_id in enumerate(actions):
        message: dict[str, Any] = {"machineActionId": action_id, "comment": "kill test"}
        if i % 2:  # half have a ticket number; the rest are known by their queue message id alone
            message["correlationId"] = f"kill-{i}"
        queues[queue_api.QUEUE].send_message(base64.b64encode(json.dumps(message).encode()).decode())
    env = {**os.environ, **identity.env(), "AzureWebJobsStorage": azurite.connection_string,
           "DEFENDER_API_BASE_URL": sim.base_url, "RATE_LIMIT_KEY": f"kill-{secrets.token_hex(4)}",
           "DEFENDER_TIMEOUT_SECONDS": "2", "IDEMPOTENCY_LEASE_SECONDS": "8"}  # fmt: skip
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
    assert 5 <= calls_at_kill < len(actions)

    second = subprocess.run([*command, "--until", str(time.time() + 40)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    sim.stop()
    assert second.returncode == 0, second.stderr[-2000:]

    results = read_all(queues[queue_api.RESULTS_QUEUE])
    poisoned = read_all(queues[names[2]])
    ended = [r["machineActionId"] for r in results] + [p["machineActionId"] for p in poisoned]
    assert sorted(ended) == sorted(actions)  # every message ended once, as a result or in poison
    sent = Counter(c.path.split("/")[-2] for c in sim.calls())
    assert max(sent.values()) == 1  # no action was sent twice: the kill and the redeliveries replayed
    # A message the killed host had claimed ends "outcome unknown" (its cancel may have been sent);
    # every other one was cancelled by its one call.
    unknown = [r for r in results if r["status"] == 502]
    assert all(r["body"]["error"]["code"] == "OutcomeUnknown" and r["outcome"] == "failed" for r in unknown)
    assert len(unknown) <= queue_api_batch_size()
    assert all(r["status"] == 200 and r["outcome"] == "cancelled" for r in results if r not in unknown)
    assert sum(sent.values()) >= len(actions) - len(unknown)


def queue_api_batch_size() -> int:
    return int(json.loads((ROOT / "host.json").read_text())["extensions"]["queues"]["batchSize"])


def test_one_ticket_number_on_two_actions_and_on_both_triggers(
    app_env: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    """A ticket number is a correlation id, not an action: it may name many actions, and the HTTP
    trigger's Idempotency-Key of the same text is another namespace."""
    from localdev.queuehost import QueueFunction

    names = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")
    queues = {name: open_queue(azurite.connection_string, name) for name in names}
    for client in queues.values():
        client.clear_messages()
    first, second, third = sim.add_action(), sim.add_action(), sim.add_action()
    assert http_cancel(third, headers={"Idempotency-Key": "INC-4711"}).status_code == 200
    for action_id in (first, second, third):
        message = {"machineActionId": action_id, "comment": "ticket", "correlationId": "INC-4711"}
        queues[queue_api.QUEUE].send_message(base64.b64encode(json.dumps(message).encode()).decode())
    host = QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)
    results: list[dict[str, Any]] = []

    def three_results() -> bool:
        results.extend(read_all(queues[queue_api.RESULTS_QUEUE]))
        return len(results) >= 3

    assert host.drain(three_results, 20)

    by_action = {r["machineActionId"]: r for r in results}
    assert by_action[first]["outcome"] == by_action[second]["outcome"] == "cancelled"
    # The queue message for `third` is its own request: it reached Defender (which says it is done)
    # instead of replaying or rejecting the HTTP key's answer.
    assert by_action[third]["status"] == 400 and "replayed" not in by_action[third]
    assert len(sim.calls()) == 4
