"""The queue trigger against Azurite's real queues, run with the host's semantics (localdev.queuehost)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.queuehost import QueueFunction
from shared.defender.retry import RetryPolicy
from shared.faces import queue_api
from tests.support.queues import QUEUES, Queues, run_until_results
from tests.support.rig import GUID

ROOT = Path(__file__).resolve().parents[2]
RESULT_FIELDS = {"correlationId", "machineActionId", "status", "body", "outcome", "attempts", "completedAt"}


@pytest.fixture
def queues(app_env: dict[str, str], azurite: Azurite) -> Queues:
    return Queues(azurite.connection_string)


@pytest.fixture
def host(app_env: dict[str, str], azurite: Azurite) -> Iterator[QueueFunction]:
    yield QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)


def test_a_message_yields_one_result_with_the_contract_fields(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator
) -> None:
    action_id = sim.add_action("InProgress")
    queues.put({"machineActionId": action_id, "comment": "from a playbook", "correlationId": "playbook-run-1"})

    [result] = run_until_results(host, queues, 1)

    assert set(result) >= RESULT_FIELDS
    assert (result["correlationId"], result["machineActionId"]) == ("playbook-run-1", action_id)
    assert (result["status"], result["outcome"], result["attempts"]) == (200, "cancelled", 1)
    assert result["body"] == json.loads(sim.calls()[0].response)
    assert queues.count(queue_api.QUEUE) == 0 and queues.count(QUEUES[2]) == 0


def test_an_upstream_4xx_is_a_final_result(host: QueueFunction, queues: Queues, sim: DefenderSimulator) -> None:
    queues.put({"machineActionId": GUID, "comment": "unknown id"})

    [result] = run_until_results(host, queues, 1)

    assert (result["status"], result["outcome"]) == (404, "upstream_rejected")
    assert result["correlationId"]  # one was made for it


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        json.dumps({"machineActionId": "../machines", "comment": "x"}),
        json.dumps({"machineActionId": GUID}),
        json.dumps({"machineActionId": GUID, "comment": ""}),
        json.dumps({"machineActionId": GUID, "comment": "x", "correlationId": "bad id with spaces"}),
    ],
)
def test_an_invalid_message_yields_one_rejected_result_quoting_it(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator, raw: str
) -> None:
    queues.put(raw)

    [result] = run_until_results(host, queues, 1)

    assert result["outcome"] == "rejected" and result["status"] is None
    assert result["body"]["message"] == raw and result["body"]["error"]["code"]
    assert sim.calls("") == []
    assert host.invocations == 1  # never retried
    assert queues.count(QUEUES[2]) == 0


def test_a_rate_limited_message_reappears_after_its_delay_and_succeeds(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "1/2")
    monkeypatch.setenv("RATE_LIMIT_SAFETY_MS", "50")
    monkeypatch.setattr(queue_api, "QUEUE_INLINE_WAIT_SECONDS", 0.0)  # defer rather than sleep in place
    first, second = sim.add_action(), sim.add_action()
    queues.put({"machineActionId": first, "comment": "one", "correlationId": "c-1"})
    queues.put({"machineActionId": second, "comment": "two", "correlationId": "c-2"})

    results = {r["correlationId"]: r for r in run_until_results(host, queues, 2)}

    assert results["c-1"]["status"] == results["c-2"]["status"] == 200
    deferred = max(results.values(), key=lambda r: r["attempts"])
    assert deferred["attempts"] == 2  # one deferral, then the run that succeeded
    arrivals = sorted(c.at for c in sim.calls())
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 2.0
    assert queues.count(QUEUES[2]) == 0


def test_a_message_that_keeps_failing_gets_a_failed_result_and_lands_in_poison(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator
) -> None:
    sim.inject(Fault("status", count=0, status=503))  # Defender refuses every time, without acting
    action_id = sim.add_action()
    queues.put({"machineActionId": action_id, "comment": "flaky", "correlationId": "c-poison"})

    [result] = run_until_results(host, queues, 1)
    assert host.drain(lambda: queues.count(QUEUES[2]) == 1, 10)

    assert (result["outcome"], result["status"], result["attempts"]) == ("failed", 503, host.max_dequeue_count)
    assert len(sim.calls()) == host.max_dequeue_count * RetryPolicy().max_attempts
    assert host.invocations == host.max_dequeue_count
    [poisoned] = queues.take(QUEUES[2])
    assert json.loads(poisoned)["correlationId"] == "c-poison"


@pytest.mark.parametrize("status", [500, 502, 504])
def test_an_answer_after_which_defender_may_have_acted_ends_the_message_at_once(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator, status: int
) -> None:
    sim.inject(Fault("acted", count=1, status=status))  # Defender cancelled; the gateway lost the answer
    action_id = sim.add_action()
    queues.put({"machineActionId": action_id, "comment": "gateway", "correlationId": f"c-{status}"})

    [result] = run_until_results(host, queues, 1)

    assert (result["outcome"], result["status"], result["attempts"]) == ("failed", status, 1)
    assert len(sim.calls()) == 1 and host.invocations == 1  # not retried: it could only cancel twice
    assert sim.state.actions[action_id]["status"] == "Cancelled"
    assert queues.count(QUEUES[2]) == 0


def test_a_duplicate_correlation_id_calls_defender_once_and_replays(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_api, "IN_FLIGHT_DEFER_SECONDS", 1)  # the copies run in parallel: one waits
    action_id = sim.add_action()
    message = {"machineActionId": action_id, "comment": "dup", "correlationId": "c-dup"}
    queues.put(message)
    queues.put(message)

    results = run_until_results(host, queues, 2)

    assert len(sim.calls()) == 1
    assert [r["status"] for r in results] == [200, 200]
    assert sorted(r.get("replayed", False) for r in results) == [False, True]


def test_a_message_whose_key_is_in_flight_is_deferred_not_failed(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.config.settings import DEFAULT_IDEMPOTENCY_TABLE, StorageConnection
    from shared.idempotency.keys import queue_key
    from shared.idempotency.record import Claim
    from shared.idempotency.table import IdempotencyStore
    from shared.storage.clients import table_client

    monkeypatch.setattr(queue_api, "IN_FLIGHT_DEFER_SECONDS", 1)
    action_id = sim.add_action()
    store = IdempotencyStore(
        table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    )
    held = store.claim(queue_key("c-busy", action_id, None) or "", action_id)
    assert isinstance(held, Claim)  # another instance is calling Defender
    queues.put({"machineActionId": action_id, "comment": "busy", "correlationId": "c-busy"})
    assert host.poll_once() == 1 and queues.take(queue_api.RESULTS_QUEUE) == []
    store.release(held)  # the other instance gave up without an answer

    [result] = run_until_results(host, queues, 1)

    assert (result["status"], result["attempts"]) == (200, 2)
    assert len(sim.calls()) == 1


def test_crafted_deep_nesting_is_rejected_not_retried(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator
) -> None:
    queues.put("[" * (30 * 1024))  # thirty thousand deep; a queue message holds 64 KiB after base64

    [result] = run_until_results(host, queues, 1)

    assert result["outcome"] == "rejected" and result["body"]["error"]["code"] == "InvalidRequestBody"
    assert host.invocations == 1 and sim.calls("") == []


def test_a_redelivered_message_without_correlation_id_replays_its_answer(
    host: QueueFunction, queues: Queues, sim: DefenderSimulator
) -> None:
    action_id = sim.add_action()
    body = json.dumps({"machineActionId": action_id, "comment": "no ticket"}).encode()

    first = queue_api.handle(body, 1, "message-1")
    again = queue_api.handle(body, 2, "message-1")  # the host crashed before deleting it: delivered again

    assert first is not None and again is not None
    one, two = first.to_dict(), again.to_dict()
    assert (one["status"], one["correlationId"]) == (200, "message-1")
    assert (two["status"], two["body"], two.get("replayed")) == (200, one["body"], True)
    assert len(sim.calls()) == 1


def test_a_deferred_copy_keeps_the_key_and_counts_every_delivery() -> None:
    message = queue_api.parse_message(
        json.dumps({"machineActionId": GUID, "comment": "c", "attempts": 2}).encode(), "m-7"
    )

    again = queue_api.parse_message(message.again(deliveries=3).to_json().encode(), "m-8")

    assert again.attempts == 5
    assert again.command().idempotency_key == message.command().idempotency_key
