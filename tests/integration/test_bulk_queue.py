"""The queue form of a bulk cancel: one job message, one durable child per action, one summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator
from localdev.queuehost import QueueFunction
from shared.faces import queue_api
from tests.support.queues import Queues, run_until_results

ROOT = Path(__file__).resolve().parents[2]
MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"


@pytest.fixture
def queues(app_env: dict[str, str], azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Queues:
    import secrets

    monkeypatch.setenv("BULK_TABLE", f"Bulk{secrets.token_hex(6)}")
    return Queues(azurite.connection_string)


def host(azurite: Azurite) -> QueueFunction:
    return QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)


def test_a_bulk_job_cancels_each_pending_action_once_and_sends_one_summary(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    pending = {sim.add_action(("Pending", "InProgress")[i % 2], machine_id=MACHINE) for i in range(12)}
    final = sim.add_action("Succeeded", machine_id=MACHINE)
    queues.put({"machineId": MACHINE, "comment": "reimaged", "correlationId": "INC-77"})

    [summary] = run_until_results(host(azurite), queues, 1)

    assert (summary["correlationId"], summary["machineId"], summary["outcome"]) == ("INC-77", MACHINE, "completed")
    assert (summary["found"], summary["cancelled"], summary["failed"]) == (12, 12, 0)
    assert {a["machineActionId"] for a in summary["actions"]} == pending
    sent = Counter(c.path.split("/")[-2] for c in sim.calls(api="cancel"))
    assert set(sent) == pending and set(sent.values()) == {1} and final not in sent
    assert queues.take(queue_api.RESULTS_QUEUE) == []  # one summary, no per-action results


def test_a_dry_run_job_lists_and_an_empty_machine_completes_at_once(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    sim.add_action("Pending", machine_id=MACHINE)
    queues.put({"machineId": MACHINE, "comment": "look", "dryRun": True, "correlationId": "dry"})
    queues.put({"machineId": "0" * 40, "comment": "nothing there", "correlationId": "empty"})

    results = {r["correlationId"]: r for r in run_until_results(host(azurite), queues, 2)}

    assert results["dry"]["found"] == 1 and results["dry"]["actions"][0]["outcome"] == "listed"
    assert (results["empty"]["found"], results["empty"]["outcome"]) == (0, "completed")
    assert sim.calls(api="cancel") == []


def test_a_bad_job_message_is_rejected_quoting_it(queues: Queues, azurite: Azurite, sim: DefenderSimulator) -> None:
    queues.put({"machineId": "not-40-hex", "comment": "x", "correlationId": "bad-1"})
    queues.put({"machineId": MACHINE, "comment": "x", "correlationId": "bad-2", "types": ["Nope"]})

    results = {r["correlationId"]: r for r in run_until_results(host(azurite), queues, 2)}

    assert {r["outcome"] for r in results.values()} == {"rejected"}
    assert sim.calls("") == []


def test_verify_on_a_queue_message_reports_the_status_read_back(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    won = sim.add_action("InProgress", finish_after=0.0)
    queues.put({"machineActionId": won, "comment": "x", "correlationId": "v-1", "verify": True})

    [result] = run_until_results(host(azurite), queues, 1)

    assert (result["status"], result["verifiedStatus"]) == (400, "Succeeded")


def test_a_job_is_stored_once_and_its_summary_claimed_once(azurite: Azurite) -> None:
    import secrets

    from shared.config.settings import StorageConnection
    from shared.storage.clients import table_client
    from shared.storage.jobs import Job, JobStore

    store = JobStore(
        table_client(StorageConnection(connection_string=azurite.connection_string), f"Jobs{secrets.token_hex(6)}")
    )
    ids = tuple(f"{i:08d}-0000-4000-8000-000000000000" for i in range(1700))  # three chunks of ids
    first = store.open(Job("t|job-1", "job-1", MACHINE, "t", "c", False, ids))
    again = store.open(Job("t|job-1", "job-1", MACHINE, "t", "c", False, ids[:3]))  # a redelivery lists anew

    assert first.action_ids == ids and again.action_ids == ids  # the first listing stands
    assert store.claim_summary("t|job-1", "child-a") and not store.claim_summary("t|job-1", "child-b")
    assert store.claim_summary("t|job-1", "child-a")  # the claimer, redelivered after a crash, sends


def test_a_single_cancel_that_names_its_machine_stays_a_single_cancel(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    action = sim.add_action(machine_id=MACHINE)
    sim.add_action(machine_id=MACHINE)  # another pending action on that machine: not to be touched
    queues.put({"machineActionId": action, "machineId": MACHINE, "comment": "one", "correlationId": "one-1"})

    [result] = run_until_results(host(azurite), queues, 1)

    assert (result["machineActionId"], result["outcome"]) == (action, "cancelled")
    assert [c.path.split("/")[-2] for c in sim.calls(api="cancel")] == [action]


def test_two_copies_of_one_continuation_append_what_they_found_once(azurite: Azurite) -> None:
    import secrets

    from shared.config.settings import StorageConnection
    from shared.storage.clients import table_client
    from shared.storage.jobs import Job, JobStore

    store = JobStore(
        table_client(StorageConnection(connection_string=azurite.connection_string), f"Jobs{secrets.token_hex(6)}")
    )
    first_ids = ("00000000-0000-4000-8000-000000000001",)
    found = ("00000000-0000-4000-8000-000000000002",)
    store.open(Job("t|job-2|" + MACHINE + "|all", "job-2", MACHINE, "t", "c", False, first_ids))
    read = store.state("t|job-2|" + MACHINE + "|all").job
    assert read is not None and read.etag

    first, second = store.extend(read, found), store.extend(read, found)  # both read the same version

    stored = store.get(read.key)
    assert first is not None and second is None
    assert stored is not None and stored.action_ids == first_ids + found and stored.rounds == 2
