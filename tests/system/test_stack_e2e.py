"""`make run`'s script end to end: the stack as a subprocess, spoken to over real sockets only."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from localdev.azurite import ACCOUNT, ACCOUNT_KEY, free_port
from localdev.queuehost import open_queue

ROOT = Path(__file__).resolve().parents[2]
KEY = "local-function-key"  # local.settings.sample.json's LOCAL_FUNCTION_KEY


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    azurite_ports = [free_port() for _ in range(3)]
    command = [
        sys.executable, "-m", "localdev.stack", "--local-host", "--seed", "4",
        "--port", str(free_port()), "--defender-port", str(free_port()), "--identity-port", str(free_port()),
        "--entra-port", str(free_port()), "--azurite-ports", ",".join(map(str, azurite_ports)),
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    info: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        if line.startswith("STACK "):
            info = json.loads(line[6:])
            break
        assert time.monotonic() < deadline, "the stack did not start in time"
    assert info, "the stack exited before it started"
    info["proc"] = proc
    info["queue_conn"] = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"QueueEndpoint=http://127.0.0.1:{azurite_ports[1]}/{ACCOUNT};"
    )
    yield info
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def cancel(stack: dict[str, Any], action_id: str, key: str | None = KEY) -> requests.Response:
    headers = {"x-functions-key": key} if key else {}
    url = f"{stack['app']}/api/machineactions/{action_id}/cancel"
    return requests.post(url, json={"Comment": "from the e2e test"}, headers=headers, timeout=30)


def test_cancel_of_a_seeded_pending_action_gives_200_cancelled(stack: dict[str, Any]) -> None:
    response = cancel(stack, stack["actions"][0])

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["status"] == "Cancelled"
    assert response.headers["x-correlation-id"]


def test_a_second_cancel_gives_defenders_400(stack: dict[str, Any]) -> None:
    cancel(stack, stack["actions"][1])

    response = cancel(stack, stack["actions"][1])

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "BadRequest"


def test_a_random_guid_gives_404(stack: dict[str, Any]) -> None:
    response = cancel(stack, str(uuid.uuid4()))

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "ResourceNotFound"


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_a_wrong_or_missing_key_gives_401(stack: dict[str, Any], key: str | None) -> None:
    assert cancel(stack, stack["actions"][2], key=key).status_code == 401


def test_the_key_is_accepted_as_code_query_and_quota_answers(stack: dict[str, Any]) -> None:
    response = requests.get(f"{stack['app']}/api/quota", params={"code": KEY}, timeout=30)

    assert response.status_code == 200
    assert [w["limit"] for w in response.json()["windows"]] == [100, 1500]


def test_the_quick_start_cancels_in_both_seeded_tenants_with_a_quota_each(stack: dict[str, Any]) -> None:
    answers = {}
    for name, ids in stack["tenantActions"].items():
        url = f"{stack['app']}/api/tenants/{name}/machineactions/{ids[0]}/cancel"
        headers = {"x-functions-key": KEY}
        answers[name] = requests.post(url, json={"Comment": "quick start"}, headers=headers, timeout=30)
    quota = requests.get(f"{stack['app']}/api/tenants/contoso/quota", params={"code": KEY}, timeout=30).json()

    assert {name: (r.status_code, r.json()["status"]) for name, r in answers.items()} == {
        "contoso": (200, "Cancelled"),
        "fabrikam": (200, "Cancelled"),
    }
    assert quota["tenant"] == {"name": "contoso", "id": stack["tenants"]["contoso"]}
    assert quota["windows"][0]["used"] == 1 and stack["tenants"]["contoso"] in quota["key"]


def test_the_quick_start_bulk_cancel_lists_then_cancels_what_is_pending_on_the_seeded_machine(
    stack: dict[str, Any],
) -> None:
    url = f"{stack['app']}/api/machines/{stack['machine']['id']}/cancelPendingActions"
    headers = {"x-functions-key": KEY}
    listed = requests.post(url, json={"Comment": "look", "dryRun": True}, headers=headers, timeout=60).json()
    done = requests.post(url, json={"Comment": "reimaged", "verify": True}, headers=headers, timeout=60).json()

    assert (listed["found"], done["found"], done["cancelled"]) == (3, 3, 3)
    assert {a["verifiedStatus"] for a in done["actions"]} == {"Cancelled"}
    assert {a["id"] for a in done["actions"]} == set(stack["machine"]["actions"][:3])  # not the Succeeded one


def test_a_queue_message_produces_its_result_message(stack: dict[str, Any]) -> None:
    trigger = open_queue(stack["queue_conn"], "cancel-machine-action")
    results = open_queue(stack["queue_conn"], "cancel-machine-action-results")
    message = {"machineActionId": stack["actions"][3], "comment": "via the queue", "correlationId": "e2e-queue-1"}
    trigger.send_message(base64.b64encode(json.dumps(message).encode()).decode())

    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while not found and time.monotonic() < deadline:
        for received in results.receive_messages(max_messages=32):
            found.append(json.loads(base64.b64decode(received.content)))
        if not found:
            time.sleep(0.2)  # polling the result queue, bounded by the deadline

    assert [(r["correlationId"], r["status"], r["outcome"]) for r in found] == [("e2e-queue-1", 200, "cancelled")]


def test_the_openapi_document_holds_against_the_running_app(stack: dict[str, Any], tmp_path: Path) -> None:
    """schemathesis generates requests from openapi.json (every declared constraint, bounded) and
    checks each answer: no server error, documented status codes, content types, headers and bodies,
    schema-valid requests accepted and invalid ones refused, the key enforced."""
    report = tmp_path / "schemathesis.json"
    config = str(ROOT / "tests/support/schemathesis.toml")
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", config, "run",
         str(ROOT / "openapi.json"), "--url", f"{stack['app']}/api", "-H", f"x-functions-key: {KEY}",
         "--checks", "all",
         "--exclude-checks", "use_after_free,ensure_resource_availability,object_level_authorization",
         "--max-examples", "100", "--generation-deterministic", "--no-shrink", "--workers", "1",
         "--request-timeout", "30", "--report", "json", "--report-json-path", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert run.returncode == 0, run.stdout[-6000:]
    assert "Tested: 8" in run.stdout  # every operation: the tenants', the bulk cancels and their job status too
    assert int(re.search(r"(\d+) generated", run.stdout).group(1)) >= 100  # type: ignore[union-attr]


def test_ctrl_c_stops_everything_and_leaves_no_process(stack: dict[str, Any]) -> None:
    proc: subprocess.Popen[str] = stack["proc"]

    proc.send_signal(signal.SIGINT)

    assert proc.wait(30) == 0
    assert not _alive(stack["pids"]["azurite"])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{stack['app']}/api/quota", timeout=5)
