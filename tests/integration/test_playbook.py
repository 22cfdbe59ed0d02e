"""The Sentinel playbook's expressions evaluated, not pattern-matched: the ARM template deployed
(both authentication modes), then the workflow run on a sample incident, gives the exact requests
the Http action sends; the app then cancels with them."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest

from localdev.defender import DefenderSimulator
from shared.cancel.commands import parse_action_id
from tests.support.expressions import arm, wdl
from tests.support.rig import body_of

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = json.loads((ROOT / "examples/sentinel-playbook.json").read_text())
HOST = "func-abc123.azurewebsites.net"
KEY = "k3y-from-the-deployment"
FIRST, SECOND = "988cc94e-7a8f-4b28-ab65-54970c5d5018", "5b3f0c8e-1d2a-4c6b-9e7f-0a1b2c3d4e5f"
INCIDENT: dict[str, Any] = {
    "object": {
        "name": "4f2b7c1e-9d8a-4e3f-b2a1-0c9d8e7f6a5b",
        "id": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.OperationalInsights/workspaces/w/providers/"
        "Microsoft.SecurityInsights/Incidents/4f2b7c1e-9d8a-4e3f-b2a1-0c9d8e7f6a5b",
        "properties": {
            "incidentNumber": 4711,
            "labels": [
                {"labelName": f"mde-action:{FIRST}", "labelType": "User"},
                {"labelName": "false-positive", "labelType": "User"},
                {"labelName": f"MDE-Action: {SECOND.upper()} ", "labelType": "User"},
            ],
        },
    }
}


def deployed(auth_client_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workflow definition and its parameter values, as ARM leaves them after deployment."""
    parameters = {"PlaybookName": "Cancel-MDE-MachineAction", "FunctionAppName": "func-abc123",
                  "FunctionAppResourceGroup": "rg", "FunctionKey": KEY, "AuthClientId": auth_client_id,
                  "Comment": "Cancelled by Sentinel playbook"}  # fmt: skip
    workflow = next(r for r in TEMPLATE["resources"] if r["type"] == "Microsoft.Logic/workflows")
    definition = workflow["properties"]["definition"]
    loop = definition["actions"]["For_each_machine_action"]["actions"]
    loop = {**loop, "Cancel_machine_action": arm(loop["Cancel_machine_action"], parameters, TEMPLATE["variables"])}
    values = {"functionAppHost": HOST, "functionKey": parameters["FunctionKey"], "comment": parameters["Comment"]}
    wired = workflow["properties"]["parameters"]
    assert wired["functionKey"]["value"] == "[parameters('FunctionKey')]"  # not inlined: from the secure parameter
    return {**definition, "actions": {**definition["actions"], "For_each_machine_action": {
        **definition["actions"]["For_each_machine_action"], "actions": loop}}}, values  # fmt: skip


def run(definition: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs of every Http action the run sends, in order."""
    context: dict[str, Any] = {"parameters": values, "triggerBody": INCIDENT, "workflow": {"run": {"name": "run-1"}}}
    query = definition["actions"]["Machine_action_tags"]["inputs"]
    labels = [item for item in wdl(query["from"], context) if wdl(query["where"], {**context, "item": item})]
    loop = definition["actions"]["For_each_machine_action"]
    assert wdl(loop["foreach"], {**context, "body": {"Machine_action_tags": labels}}) == labels
    sent = []
    for label in labels:
        action = loop["actions"]["Cancel_machine_action"]
        assert action["type"] == "Http" and action["runtimeConfiguration"]["secureData"]["properties"] == ["inputs"]
        sent.append(wdl(action["inputs"], {**context, "items": {"For_each_machine_action": label}}))
    return sent


@pytest.mark.parametrize("auth_client_id", ["", "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"])
def test_the_playbook_sends_the_exact_cancel_requests(auth_client_id: str) -> None:
    sent = run(*deployed(auth_client_id))

    assert [r["uri"] for r in sent] == [
        f"https://{HOST}/api/machineactions/{FIRST}/cancel",
        f"https://{HOST}/api/machineactions/{SECOND.upper()}/cancel",
    ]
    for request, action_id in zip(sent, (FIRST, SECOND.upper()), strict=True):
        assert request["method"] == "POST"
        assert request["headers"] == {
            "Content-Type": "application/json",
            "x-functions-key": KEY,
            "x-correlation-id": "run-1",
            "Idempotency-Key": f"{INCIDENT['object']['name']}-{action_id}",
        }
        assert request["body"] == {"Comment": "Cancelled by Sentinel playbook (incident 4711)"}
        expected = {"type": "ManagedServiceIdentity", "audience": f"api://{auth_client_id}"}
        assert request.get("authentication") == (expected if auth_client_id else None)


def test_the_function_key_is_a_secure_parameter_with_no_default() -> None:
    assert TEMPLATE["parameters"]["FunctionKey"] == {
        "type": "securestring",
        "metadata": TEMPLATE["parameters"]["FunctionKey"]["metadata"],
    }
    workflow = next(r for r in TEMPLATE["resources"] if r["type"] == "Microsoft.Logic/workflows")
    assert workflow["properties"]["definition"]["parameters"]["functionKey"]["type"] == "SecureString"


def test_the_app_cancels_what_the_playbook_sends(app_env: dict[str, str], sim: DefenderSimulator) -> None:
    from CancelMachineAction import main

    for action_id in (FIRST, SECOND):
        sim.add_action(action_id=action_id)
    for request in run(*deployed("")):
        path = urllib.parse.urlsplit(request["uri"]).path
        action_id = urllib.parse.unquote(path.split("/")[3])
        parse_action_id(action_id)  # the id the expression computes is one the app accepts
        response = main(func.HttpRequest(method=request["method"], url=request["uri"], headers=request["headers"],
                                         route_params={"actionId": action_id},
                                         body=json.dumps(request["body"]).encode()))  # fmt: skip

        assert response.status_code == 200 and body_of(response)["status"] == "Cancelled"
    assert len(sim.calls()) == 2


DEVICES = ("7b1f4967d9728e5aa3c06a9e617a22a4a5a17378", "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567")
HOSTS_INCIDENT: dict[str, Any] = {
    "object": {
        **INCIDENT["object"],
        "properties": {
            **INCIDENT["object"]["properties"],
            "relatedEntities": [
                {"kind": "Host", "properties": {"hostName": "pc-1", "additionalData": {"MdatpDeviceId": DEVICES[0]}}},
                {"kind": "Account", "properties": {"accountName": "alice"}},
                {"kind": "Host", "properties": {"hostName": "pc-2", "additionalData": {"MdatpDeviceId": DEVICES[1]}}},
                {"kind": "Host", "properties": {"hostName": "not-onboarded", "additionalData": {}}},
            ],
        },
    }
}


def host_requests(enabled: bool, auth_client_id: str = "") -> list[dict[str, Any]]:
    """The Http inputs the host loop sends for HOSTS_INCIDENT, with CancelPendingOnHosts = `enabled`."""
    definition, values = deployed(auth_client_id)
    values = {**values, "cancelPendingOnHosts": enabled}
    context: dict[str, Any] = {
        "parameters": values,
        "triggerBody": HOSTS_INCIDENT,
        "workflow": {"run": {"name": "run-2"}},
    }
    query = definition["actions"]["Host_entities"]["inputs"]
    hosts = [item for item in wdl(query["from"], context) if wdl(query["where"], {**context, "item": item})]
    loop = definition["actions"]["For_each_host"]
    action = loop["actions"]["Cancel_pending_actions_on_host"]
    assert action["type"] == "Http" and action["runtimeConfiguration"]["secureData"]["properties"] == ["inputs"]
    inputs = arm(action["inputs"], {"AuthClientId": auth_client_id}, TEMPLATE["variables"])
    return [wdl(inputs, {**context, "items": {"For_each_host": host}}) for host in hosts]


def test_the_playbook_cancels_what_is_pending_on_the_incidents_hosts_only_when_asked() -> None:
    assert host_requests(False) == []
    sent = host_requests(True, "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f")

    # the key also in the query: a large batch answers 202, and its Location (polled by the Logic App
    # with no headers of the action's own) carries the request's `code`
    key = urllib.parse.quote(KEY, safe="")
    assert [r["uri"] for r in sent] == [
        f"https://{HOST}/api/machines/{d}/cancelPendingActions?code={key}" for d in DEVICES
    ]
    assert sent[0]["headers"]["Idempotency-Key"] == f"{INCIDENT['object']['name']}-{DEVICES[0]}"
    assert sent[0]["body"] == {"Comment": "Cancelled by Sentinel playbook (incident 4711)", "verify": True}
    assert sent[0]["authentication"]["audience"] == "api://3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
    assert TEMPLATE["parameters"]["CancelPendingOnHosts"]["defaultValue"] is False


def test_the_app_cancels_what_is_pending_on_the_hosts_the_playbook_names(
    app_env: dict[str, str], sim: DefenderSimulator
) -> None:
    from CancelPendingActions import main

    pending = [sim.add_action(machine_id=d) for d in DEVICES for _ in range(2)]
    for request in host_requests(True):
        machine = urllib.parse.urlsplit(request["uri"]).path.split("/")[3]
        response = main(func.HttpRequest(method=request["method"], url=request["uri"], headers=request["headers"],
                                         route_params={"machineId": machine},
                                         body=json.dumps(request["body"]).encode()))  # fmt: skip

        assert response.status_code == 200 and body_of(response)["cancelled"] == 2
    assert sorted(c.path.split("/")[-2] for c in sim.calls(api="cancel")) == sorted(pending)
