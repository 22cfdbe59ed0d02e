"""The bulk promises under the faults a review reproduced: nothing lost (every job listed, cancelled
and summarised, a summary of any size arrives whole, a listing that pages past an action finds it
again), at most once (a read-back that tells nothing never sends), an answer inside the caller's
limit (a large HTTP batch answers 202 and a status route), and every Defender answer checked for the
shape we rely on."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.queuehost import QueueFunction
from shared.app import reset_app
from shared.config.settings import DEFAULT_IDEMPOTENCY_TABLE, StorageConnection
from shared.faces import queue_api
from shared.idempotency.keys import http_key
from shared.idempotency.record import Claim
from shared.idempotency.table import IdempotencyStore
from shared.storage.clients import table_client
from tests.support.queues import Queues, run_until_results
from tests.support.rig import TOKEN_SECRET, body_of, call, http_cancel

ROOT = Path(__file__).resolve().parents[2]
MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
OTHER = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
ERROR_STRING = json.dumps({"error": "already gone"})  # an error that is a string, not Defender's object


@pytest.fixture
def jobs_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("BULK_TABLE", f"Bulk{secrets.token_hex(6)}")
    return app_env


@pytest.fixture
def queues(jobs_env: dict[str, str], azurite: Azurite) -> Queues:
    return Queues(azurite.connection_string)


def host(azurite: Azurite) -> QueueFunction:
    return QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)


def cancels(sim: DefenderSimulator) -> Counter[str]:
    return Counter(c.path.split("/")[-2] for c in sim.calls(api="cancel"))


def bulk(machine: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return call("CancelPendingActions", json.dumps(body).encode(), headers, machineId=machine)


# --- nothing lost --------------------------------------------------------------------------------
def test_one_ticket_on_two_machines_is_two_jobs_each_listed_cancelled_and_summarised(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    first = {sim.add_action(machine_id=MACHINE) for _ in range(3)}
    second = {sim.add_action(machine_id=OTHER) for _ in range(2)}
    queues.put({"machineId": MACHINE, "comment": "INC-9 host a", "correlationId": "INC-9"})
    queues.put({"machineId": OTHER, "comment": "INC-9 host b", "correlationId": "INC-9"})

    summaries = {s["machineId"]: s for s in run_until_results(host(azurite), queues, 2)}

    assert {m: (s["found"], s["cancelled"]) for m, s in summaries.items()} == {MACHINE: (3, 3), OTHER: (2, 2)}
    assert set(cancels(sim)) == first | second and set(cancels(sim).values()) == {1}


def test_the_same_job_asked_again_replays_its_summary_without_cancelling_again(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    sim.add_action(machine_id=MACHINE)
    job = {"machineId": MACHINE, "comment": "INC-10", "correlationId": "INC-10"}
    queues.put(job)
    [first] = run_until_results(host(azurite), queues, 1)
    queues.put(job)

    [again] = run_until_results(host(azurite), queues, 1)

    assert again["replayed"] is True and again["actions"] == first["actions"] and len(sim.calls(api="cancel")) == 1


def test_a_summary_of_300_actions_with_error_bodies_arrives_whole_in_parts(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "1000/60")  # the simulator's windows are wide: no deferral here
    ids = [sim.add_action(machine_id=MACHINE) for _ in range(300)]
    long_error = json.dumps({"error": {"code": "BadRequest", "message": "refused: " + "x" * 3000}})
    queues.put({"machineId": MACHINE, "comment": "big", "correlationId": "INC-300"})
    function = host(azurite)
    function.poll_once()  # the job message: listed, 300 children sent
    sim.inject(Fault("body", count=0, status=400, body=long_error))  # every cancel refused, at length

    parts = run_until_results(function, queues, 1, timeout=120)
    while len(parts) < parts[0]["parts"]:  # the parts are sent one after another
        parts += run_until_results(function, queues, 1, timeout=30)

    assert sorted(p["part"] for p in parts) == list(range(1, parts[0]["parts"] + 1)) and parts[0]["parts"] > 1
    entries = [e for p in sorted(parts, key=lambda p: p["part"]) for e in p["actions"]]
    assert [e["machineActionId"] for e in entries] == ids and {p["failed"] for p in parts} == {300}
    assert all(len(json.dumps(p)) * 4 / 3 < 64 * 1024 for p in parts)
    assert queues.take(queue_api.QUEUE + "-poison") == []


def test_a_child_naming_no_job_or_another_tenants_job_is_rejected_and_cancels_nothing(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    action = sim.add_action(machine_id=MACHINE)
    forged = f"home|INC-x|{MACHINE}|all"
    queues.put({"machineActionId": action, "comment": "x", "correlationId": "INC-x", "bulkJob": forged})

    [result] = run_until_results(host(azurite), queues, 1)

    assert result["outcome"] == "rejected" and "bulkJob" in result["body"]["error"]["message"]
    assert sim.calls(api="cancel") == []


def test_an_action_hidden_by_skip_paging_is_found_by_the_next_listing(
    jobs_env: dict[str, str], sim: DefenderSimulator
) -> None:
    sim.page_size = 5
    ids = [sim.add_action(machine_id=MACHINE) for _ in range(10)]

    def end_one(page: int) -> None:
        if page == 1:  # between the first two pages an action of the first ends: page 2 starts one late
            sim.state.actions[ids[0]]["status"] = "Succeeded"

    sim.after_list = end_one
    body = body_of(bulk(MACHINE, {"Comment": "skip"}))

    assert body["found"] == 9 and set(cancels(sim)) == set(ids[1:]) and set(cancels(sim).values()) == {1}


def test_a_queue_job_lists_again_until_nothing_new(queues: Queues, azurite: Azurite, sim: DefenderSimulator) -> None:
    sim.page_size = 5
    ids = [sim.add_action(machine_id=MACHINE) for _ in range(10)]
    sim.after_list = lambda page: sim.state.actions[ids[0]].update(status="Succeeded") if page == 1 else None

    queues.put({"machineId": MACHINE, "comment": "skip", "correlationId": "INC-skip"})

    [summary] = run_until_results(host(azurite), queues, 1)

    assert summary["found"] == 9 and set(cancels(sim)) == set(ids[1:]) and set(cancels(sim).values()) == {1}


# --- an answer inside the caller's limit --------------------------------------------------------
@pytest.fixture
def slow_sim() -> Iterator[DefenderSimulator]:
    """Defender's 100 a window compressed to 4 s, pages of 50, and every call slow."""
    simulator = DefenderSimulator(windows=((100, 4.0),), token_secret=TOKEN_SECRET, page_size=50,
                                  api_windows={"get": ((1000, 4.0),)}, cancel_takes=0.3).start()  # fmt: skip
    yield simulator
    simulator.stop()


def test_a_large_http_batch_with_verify_answers_202_then_its_status_route_answers_every_action(
    jobs_env: dict[str, str], azurite: Azurite, slow_sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.faces import http_api

    monkeypatch.setenv("DEFENDER_API_BASE_URL", slow_sim.base_url)
    monkeypatch.setenv("RATE_LIMITS", "100/4")
    monkeypatch.setenv("GET_RATE_LIMITS", "1000/4")
    monkeypatch.setenv("RATE_LIMIT_SAFETY_MS", "100")
    monkeypatch.setattr(http_api, "INLINE_ANSWER_SECONDS", 8.0)  # the caller's limit, compressed
    pending = {slow_sim.add_action(machine_id=MACHINE) for _ in range(120)}
    slow_sim.inject(Fault("slow", count=0, seconds=0.05))

    response = bulk(MACHINE, {"Comment": "reimaged", "verify": True})

    assert response.status_code == 202 and int(response.headers["Retry-After"]) >= 2
    location = response.headers["Location"]
    job_id = location.rsplit("/", 1)[-1]
    assert location.endswith(f"/api/machines/{MACHINE}/cancelPendingActions/{job_id}")
    status = call("GetPendingActionsJob", machineId=MACHINE, jobId=job_id)
    assert status.status_code == 202 and status.headers["Location"] == location
    assert host(azurite).drain(lambda: call("GetPendingActionsJob", machineId=MACHINE, jobId=job_id).status_code
                               == 200, timeout=90)  # fmt: skip
    done = body_of(call("GetPendingActionsJob", machineId=MACHINE, jobId=job_id))
    assert (done["found"], done["cancelled"]) == (120, 120)
    assert {e["machineActionId"] for e in done["actions"]} == pending
    assert {e["verifiedStatus"] for e in done["actions"]} == {"Cancelled"}
    assert set(cancels(slow_sim)) == pending and set(cancels(slow_sim).values()) == {1}


def test_a_small_http_batch_still_answers_at_once(jobs_env: dict[str, str], sim: DefenderSimulator) -> None:
    pending = {sim.add_action(machine_id=MACHINE) for _ in range(5)}

    response = bulk(MACHINE, {"Comment": "small"})

    assert response.status_code == 200 and body_of(response)["cancelled"] == 5 and set(cancels(sim)) == pending


# --- every Defender answer checked for its shape ---------------------------------------------------
@pytest.mark.parametrize(
    "page", ["<html>proxy</html>", '{"value": 5}', '["a", "b"]', '{"value": ["x"]}', "[]",
             '{"value": [{"id": "../../machines", "status": "Pending"}]}',
             '{"value": [{"id": "988cc94e-7a8f-4b28-ab65-54970c5d5018", "status": 7}]}'],
)  # fmt: skip
def test_a_list_page_of_the_wrong_shape_is_an_error_never_zero_pending(
    jobs_env: dict[str, str], sim: DefenderSimulator, page: str
) -> None:
    sim.add_action(machine_id=MACHINE)
    sim.inject(Fault("body", status=200, body=page))

    response = bulk(MACHINE, {"Comment": "x"})

    assert response.status_code == 502 and body_of(response)["error"]["code"] == "InvalidUpstreamResponse"
    assert sim.calls(api="cancel") == []


def test_a_queue_job_whose_list_is_of_the_wrong_shape_is_retried_not_stored_empty(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    action = sim.add_action(machine_id=MACHINE)
    sim.inject(Fault("body", status=200, body='{"value": 5}'))
    queues.put({"machineId": MACHINE, "comment": "x", "correlationId": "INC-shape"})

    [summary] = run_until_results(host(azurite), queues, 1)  # the retry lists for real

    assert (summary["found"], summary["cancelled"]) == (1, 1) and set(cancels(sim)) == {action}


def test_error_bodies_of_another_shape_are_passed_on_not_crashed_on(
    jobs_env: dict[str, str], sim: DefenderSimulator
) -> None:
    sim.inject(Fault("body", status=403, body='{"error": "no roles"}'))
    refused = bulk(MACHINE, {"Comment": "x"})
    action = sim.add_action(machine_id=MACHINE)
    sim.inject(None)
    listed = len(sim.calls("", api="list"))
    sim.after_list = lambda page: setattr(sim.state, "fault", Fault("body", status=400, body=ERROR_STRING))

    cancelled = body_of(bulk(MACHINE, {"Comment": "x"}))

    assert refused.status_code == 403 and "Machine.Read.All" in body_of(refused)["error"]["message"]
    assert len(sim.calls("", api="list")) > listed
    assert [(a["id"], a["outcome"], a["status"]) for a in cancelled["actions"]] == [(action, "already_final", 400)]


def test_a_retry_after_of_a_trillion_seconds_is_held_as_an_hour(
    app_env: dict[str, str], sim: DefenderSimulator
) -> None:
    from tests.support.rig import get_quota

    sim.inject(Fault("status", status=429, retry_after=10**12))
    upstream = http_cancel(sim.add_action())

    quota = get_quota()
    held = http_cancel(sim.add_action())

    assert upstream.status_code == 429 and int(upstream.headers["Retry-After"]) == 3600
    assert quota.status_code == 200 and body_of(quota)["blockedUntil"] is not None
    assert held.status_code == 429 and len(sim.calls()) == 1


def test_a_defender_429_on_a_list_holds_the_list_quota_for_everyone(
    jobs_env: dict[str, str], sim: DefenderSimulator
) -> None:
    sim.api_windows["list"] = ((2, 60.0),)  # Defender's list quota is smaller than ours
    answers = [bulk(MACHINE, {"Comment": "x", "dryRun": True}).status_code for _ in range(4)]

    assert answers == [200, 200, 429, 429] and len(sim.calls("", api="list")) == 3


def test_a_queue_job_whose_list_is_throttled_is_deferred_not_ended(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    sim.inject(Fault("status", status=429, retry_after=1))
    action = sim.add_action(machine_id=MACHINE)
    queues.put({"machineId": MACHINE, "comment": "x", "correlationId": "INC-429"})

    [summary] = run_until_results(host(azurite), queues, 1)

    assert (summary["outcome"], summary["cancelled"]) == ("completed", 1) and set(cancels(sim)) == {action}


# --- at most once: a read-back that tells nothing never sends --------------------------------------
@pytest.fixture
def handed_back(app_env: dict[str, str], azurite: Azurite, sim: DefenderSimulator) -> str:
    """An action whose key was taken over and handed back unread: the next request must read first."""
    action = sim.add_action()
    store = IdempotencyStore(
        table_client(StorageConnection(connection_string=azurite.connection_string), DEFAULT_IDEMPOTENCY_TABLE)
    )
    held = store.claim(http_key("function-key", f"k-{action}"), action)
    assert isinstance(held, Claim)
    store.abandon(held)
    return action


@pytest.mark.parametrize(
    "answer",
    [Fault("garbage", status=200), Fault("body", status=200, body='{"id": 1}'), Fault("status", status=503),
     Fault("status", status=429, retry_after=1)],
)  # fmt: skip
def test_a_read_back_that_proves_nothing_never_sends_and_a_retry_reads_again(
    handed_back: str, sim: DefenderSimulator, answer: Fault, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.inject(Fault(answer.mode, count=3, status=answer.status, body=answer.body, retry_after=answer.retry_after))
    key = {"Idempotency-Key": f"k-{handed_back}"}

    first = http_cancel(handed_back, headers=key)
    sent_first = sim.calls(api="cancel")
    sim.inject(None)
    monkeypatch.setenv("HTTP_MAX_WAIT_SECONDS", "3")  # the retry may wait out Defender's Retry-After
    reset_app()
    retry = http_cancel(handed_back, headers=key)

    assert first.status_code in (429, 502, 503) and sent_first == []
    assert retry.status_code == 200 and len(sim.calls(api="cancel")) == 1


def test_verify_reads_leave_the_read_back_its_slot(
    handed_back: str, sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GET_RATE_LIMITS", "5/60")
    monkeypatch.setenv("VERIFY_SECONDS", "1")
    for _ in range(5):  # each verify reads once (the action ends at once), until verify's 4 of 5 are used
        http_cancel(sim.add_action("InProgress", finish_after=0.0), {"Comment": "v", "verify": True})

    taken_over = http_cancel(handed_back, headers={"Idempotency-Key": f"k-{handed_back}"})

    assert len(sim.calls("", api="get")) == 5  # 4 verify reads, then the read-back
    assert taken_over.status_code == 200 and sim.status_of(handed_back) == "Cancelled"


# --- the local queue host renews a running message, as Azure's host does --------------------------
def test_a_message_running_longer_than_its_lease_is_not_handed_to_another_worker(
    azurite: Azurite, tmp_path: Path
) -> None:
    import base64
    import time

    name = f"renew{secrets.token_hex(4)}"
    folder = tmp_path / name
    folder.mkdir()
    trigger = {"type": "queueTrigger", "direction": "in", "name": "msg", "queueName": name,
               "connection": "AzureWebJobsStorage"}  # fmt: skip
    (folder / "function.json").write_text(json.dumps({"bindings": [trigger]}))
    (folder / "__init__.py").write_text("import time\n\ndef main(msg):\n    time.sleep(2.5)  # a run longer than 1 s\n")
    first = QueueFunction(folder, azurite.connection_string, lease_seconds=1)
    second = QueueFunction(folder, azurite.connection_string, lease_seconds=1)
    first.client(name).send_message(base64.b64encode(b"{}").decode())

    assert first.pump() == 1  # running in the background now
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        second.poll_once()  # another worker polls all along (bounded)
        time.sleep(0.1)
    first.close()
    second.close()

    assert (first.invocations, second.invocations) == (1, 0)
    assert first.client(name).peek_messages() == []


def test_a_bulk_listing_draws_on_the_list_quota_not_the_cancel_quota(
    jobs_env: dict[str, str], sim: DefenderSimulator
) -> None:
    from tests.support.rig import get_quota

    sim.add_action(machine_id=MACHINE)
    assert bulk(MACHINE, {"Comment": "look", "dryRun": True}).status_code == 200

    used = {api: q["windows"][0]["used"] for api, q in body_of(get_quota())["quotas"].items()}

    assert used == {"cancel": 0, "list": 1, "get": 0}


def test_bulk_cancels_the_quota_cannot_serve_by_the_deadline_come_back_not_attempted(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from shared.app import get_app
    from shared.cancel import bulk as bulk_module
    from shared.cancel.commands import BulkRequest

    monkeypatch.setenv("RATE_LIMITS", "2/5")
    actions = [{"id": sim.add_action(machine_id=MACHINE), "status": "Pending"} for _ in range(4)]
    request = BulkRequest(MACHINE, "deadline")
    until = time.monotonic() + 1.0  # the quota frees its next slot only after 5 s

    items = bulk_module.cancel_each(get_app().service, actions, request, "c", lambda a: None, until, until)

    assert sorted(i["outcome"] for i in items) == ["cancelled", "cancelled", "not_attempted", "not_attempted"]
    assert len(sim.calls(api="cancel")) == 2


def test_the_status_route_carries_the_requests_code_and_a_bounded_retry_after() -> None:
    from shared.faces.http_api import _poll_headers

    posted = _poll_headers(f"https://h/api/machines/{MACHINE}/cancelPendingActions?code=k%2B1", "j" * 32, 400.0)
    polled = _poll_headers(
        f"https://h/api/machines/{MACHINE}/cancelPendingActions/{'j' * 32}", "j" * 32, 0.0, here=True
    )

    assert posted == {"Location": f"https://h/api/machines/{MACHINE}/cancelPendingActions/{'j' * 32}?code=k%2B1",
                      "Retry-After": "30"}  # fmt: skip
    assert polled == {
        "Location": f"https://h/api/machines/{MACHINE}/cancelPendingActions/{'j' * 32}",
        "Retry-After": "2",
    }


def test_a_keyed_bulk_cancel_that_would_outwait_its_lease_is_not_attempted_not_failed(
    app_env: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "2/30")
    monkeypatch.setenv("IDEMPOTENCY_LEASE_SECONDS", "11")  # legal: more than the queue's 5 s wait plus the 5 s budget
    for _ in range(3):
        sim.add_action(machine_id=MACHINE)

    body = body_of(bulk(MACHINE, {"Comment": "keyed"}, {"Idempotency-Key": "ticket-lease"}))

    assert sorted(a["outcome"] for a in body["actions"]) == ["cancelled", "cancelled", "not_attempted"]
    assert len(sim.calls(api="cancel")) == 2


def test_a_job_whose_tenant_was_removed_still_sends_its_summary(
    queues: Queues, azurite: Azurite, sim: DefenderSimulator
) -> None:
    from shared.app import get_app
    from shared.storage.jobs import Job, job_key

    gone = "0f0f0f0f-0000-4000-8000-000000000001"  # a tenant no longer in TENANTS
    action = sim.add_action(machine_id=MACHINE)
    key = job_key(gone, "INC-gone", MACHINE, ())
    get_app().jobs.open(Job(key, "INC-gone", MACHINE, gone, "x", False, (action,), fanned_out=1))
    queues.put({"machineActionId": action, "comment": "x", "correlationId": "INC-gone", "tenantId": gone,
                "bulkJob": key})  # fmt: skip

    [summary] = run_until_results(host(azurite), queues, 1)

    assert (summary["correlationId"], summary["found"], summary["failed"]) == ("INC-gone", 1, 1)
    assert summary["actions"][0]["error"]["code"] == "TenantNotFound" and sim.calls(api="cancel") == []
