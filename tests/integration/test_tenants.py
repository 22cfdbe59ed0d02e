"""Many tenants from one deployment, through the real azure-identity credentials: the identity
endpoint, the loopback Entra token endpoint over TLS, and the simulator serving tenants by `tid`."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import azure.functions as func
import pytest
from azure.data.tables import TableClient

from localdev.azurite import Azurite
from localdev.defender import DefenderSimulator, Fault
from localdev.entra import EntraEndpoint, FederatedCredential
from localdev.identity import ISSUER_HOST, IdentityEndpoint, object_id
from localdev.queuehost import QueueFunction
from localdev.stack import LOCAL_IDENTITY, LOCAL_TENANT_APP, federate
from shared.faces import queue_api
from tests.support.queues import Queues, run_until_results
from tests.support.rig import body_of, call, http_cancel, principal

ROOT = Path(__file__).resolve().parents[2]
CONTOSO = "6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d"
FABRIKAM = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
TENANTS = {"contoso": CONTOSO, "fabrikam": FABRIKAM}
SOC_A = "aaaaaaaa-0000-4000-8000-00000000000a"  # a playbook of contoso's SOC
MSSP = "bbbbbbbb-0000-4000-8000-00000000000b"  # the provider's own automation: everywhere


@pytest.fixture
def tenants(
    app_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    entra: EntraEndpoint,
    identity: IdentityEndpoint,
    sim: DefenderSimulator,
) -> dict[str, str]:
    """The app set up as an MSSP's: two customers consented to the app registration, which trusts
    the app's user-assigned identity; Defender onboarded in both."""
    entra.requests.clear()
    for name, value in federate(entra, identity, TENANTS).items():
        monkeypatch.setenv(name, value)
    # A customer's quota key is fixed (app + tenant): each test keeps its logs in a table of its own.
    monkeypatch.setenv("RATE_LIMIT_TABLE", f"Tenants{secrets.token_hex(6)}")
    for tenant_id in TENANTS.values():
        sim.add_tenant(tenant_id)
    return TENANTS


def tenant_cancel(tenant: str, action_id: str, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return call("CancelTenantMachineAction", b'{"Comment": "cancelled for a customer"}', headers, tenant=tenant,
                actionId=action_id)  # fmt: skip


def tenant_quota(tenant: str, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return call("GetTenantQuota", b"", headers, tenant=tenant)


def exchange_requests(identity: IdentityEndpoint) -> int:
    return sum(1 for r in identity.requests if r.get("resource") == "api://AzureADTokenExchange")


def test_each_tenant_cancels_its_own_action_with_a_token_of_its_own(
    tenants: dict[str, str], sim: DefenderSimulator
) -> None:
    home = sim.add_action()
    contoso, fabrikam = sim.add_action(tenant=CONTOSO), sim.add_action(tenant=FABRIKAM)

    by_name = tenant_cancel("contoso", contoso)
    by_id = tenant_cancel(FABRIKAM.upper(), fabrikam)  # a tenant by its id, any case
    at_home = http_cancel(home)
    elsewhere = tenant_cancel("fabrikam", sim.add_action(tenant=CONTOSO))  # contoso's action, fabrikam's route

    assert [r.status_code for r in (by_name, by_id, at_home, elsewhere)] == [200, 200, 200, 404]
    assert body_of(by_name)["status"] == "Cancelled" and body_of(elsewhere)["error"]["code"] == "ResourceNotFound"
    calls = [(c.tenant, c.app) for c in sim.calls()]
    assert calls == [
        (CONTOSO, LOCAL_TENANT_APP),
        (FABRIKAM, LOCAL_TENANT_APP),
        (sim.home_tenant, LOCAL_IDENTITY),  # the home tenant: the identity itself, as before
        (FABRIKAM, LOCAL_TENANT_APP),
    ]


def test_one_token_request_per_tenant_per_lifetime_under_concurrency(
    tenants: dict[str, str], sim: DefenderSimulator, entra: EntraEndpoint, identity: IdentityEndpoint
) -> None:
    actions = [(name, sim.add_action(tenant=tenant_id)) for _ in range(15) for name, tenant_id in TENANTS.items()]
    statuses: list[int] = []
    start = threading.Barrier(6)

    def worker(share: list[tuple[str, str]]) -> None:
        start.wait()
        statuses.extend(tenant_cancel(name, action).status_code for name, action in share)

    threads = [threading.Thread(target=worker, args=(actions[i::6],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert statuses.count(200) == 30
    assert (entra.issued(CONTOSO), entra.issued(FABRIKAM)) == (1, 1)
    assert exchange_requests(identity) == 1  # one assertion from the identity serves both exchanges


def test_an_unknown_tenant_is_404_with_no_token_request_and_no_upstream_call(
    tenants: dict[str, str], sim: DefenderSimulator, entra: EntraEndpoint, identity: IdentityEndpoint
) -> None:
    response = tenant_cancel("northwind", sim.add_action(tenant=CONTOSO))
    quota = tenant_quota("northwind")

    assert (response.status_code, quota.status_code) == (404, 404)
    assert body_of(response)["error"]["code"] == "TenantNotFound"
    assert (len(entra.requests), len(identity.requests), sim.calls("")) == (0, 0, [])


@pytest.fixture
def limited_callers(tenants: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
    monkeypatch.setenv("ALLOWED_CALLERS", f"{SOC_A}=contoso, {MSSP}")


def caller(app_id: str) -> dict[str, str]:
    return {"X-MS-CLIENT-PRINCIPAL": principal(appid=app_id)}


def test_a_caller_limited_to_one_tenant_gets_403_elsewhere_before_any_token(
    limited_callers: None, sim: DefenderSimulator, entra: EntraEndpoint, identity: IdentityEndpoint
) -> None:
    other = sim.add_action(tenant=FABRIKAM)

    refused = [
        tenant_cancel("fabrikam", other, caller(SOC_A)),
        tenant_cancel(FABRIKAM, other, caller(SOC_A)),
        http_cancel(sim.add_action(), headers=caller(SOC_A)),  # the home tenant is not contoso either
        tenant_cancel("northwind", other, caller(SOC_A)),  # unknown: 403 too, no list of customers
        tenant_quota("fabrikam", caller(SOC_A)),
    ]

    assert [r.status_code for r in refused] == [403] * 5
    assert {body_of(r)["error"]["code"] for r in refused} == {"Forbidden"}
    assert (len(entra.requests), len(identity.requests), sim.calls("")) == (0, 0, [])
    assert tenant_cancel("contoso", sim.add_action(tenant=CONTOSO), caller(SOC_A)).status_code == 200
    assert tenant_cancel("northwind", other, caller(MSSP)).status_code == 404  # unlimited callers learn it
    assert tenant_cancel("fabrikam", other, caller(MSSP)).status_code == 200


@pytest.mark.parametrize(
    ("claim", "code"),
    [("issuer", "AADSTS700211"), ("subject", "AADSTS700213"), ("audience", "AADSTS700212")],
)
def test_a_wrong_federated_credential_is_502_naming_entras_code_and_nothing_is_sent(
    tenants: dict[str, str],
    sim: DefenderSimulator,
    entra: EntraEndpoint,
    identity: IdentityEndpoint,
    claim: str,
    code: str,
) -> None:
    right = {
        "issuer": f"{ISSUER_HOST}/{identity.home_tenant}/v2.0",
        "subject": object_id(LOCAL_IDENTITY),
        "audience": "api://AzureADTokenExchange",
    }
    wrong = {
        "issuer": f"{ISSUER_HOST}/{CONTOSO}/v2.0",
        "subject": LOCAL_IDENTITY,
        "audience": "api://AzureADTokenExchangeUSGov",
    }
    entra.register(LOCAL_TENANT_APP, FederatedCredential(**{**right, claim: wrong[claim]}))

    response = tenant_cancel("contoso", sim.add_action(tenant=CONTOSO))

    assert response.status_code == 502
    error = body_of(response)["error"]
    assert error["code"] == "TokenUnavailable" and code in error["message"] and "contoso" in error["message"]
    assert sim.calls("") == []


def test_each_tenant_has_its_own_quota_and_a_defender_429_holds_only_its_tenant(
    tenants: dict[str, str], sim: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMITS", "3/30")
    monkeypatch.setenv("RATE_LIMIT_SAFETY_MS", "0")
    contoso = [tenant_cancel("contoso", sim.add_action(tenant=CONTOSO)).status_code for _ in range(4)]
    fabrikam_first = tenant_cancel("fabrikam", sim.add_action(tenant=FABRIKAM)).status_code
    sim.inject(Fault("status", status=429, retry_after=30))
    fabrikam_throttled = tenant_cancel("fabrikam", sim.add_action(tenant=FABRIKAM))
    fabrikam_held = tenant_cancel("fabrikam", sim.add_action(tenant=FABRIKAM))
    home = http_cancel(sim.add_action())

    assert contoso == [200, 200, 200, 429]  # the 4th never left: contoso's own windows are full
    assert (fabrikam_first, fabrikam_throttled.status_code, fabrikam_held.status_code) == (200, 429, 429)
    assert body_of(fabrikam_held)["error"]["code"] == "TooManyRequests"  # held locally, not sent
    assert home.status_code == 200  # fabrikam's 429 holds fabrikam only
    assert len(sim.calls(tenant=FABRIKAM)) == 2 and len(sim.calls(tenant=CONTOSO)) == 3
    used = {name: body_of(tenant_quota(name))["windows"][0]["used"] for name in TENANTS}
    assert used == {"contoso": 3, "fabrikam": 2}
    assert body_of(tenant_quota("fabrikam"))["blockedUntil"] is not None
    assert body_of(tenant_quota("contoso"))["blockedUntil"] is None


def test_an_idempotency_key_is_scoped_by_tenant(tenants: dict[str, str], sim: DefenderSimulator) -> None:
    key = {"Idempotency-Key": "INC-4711"}
    contoso, fabrikam = sim.add_action(tenant=CONTOSO), sim.add_action(tenant=FABRIKAM)

    first = tenant_cancel("contoso", contoso, key)
    other_tenant = tenant_cancel("fabrikam", fabrikam, key)  # not "reused for another action" (422)
    again = tenant_cancel("contoso", contoso, key)

    assert (first.status_code, other_tenant.status_code, again.status_code) == (200, 200, 200)
    assert again.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in other_tenant.headers
    assert len(sim.calls()) == 2


def test_audit_rows_name_the_tenant(tenants: dict[str, str], sim: DefenderSimulator, azurite: Azurite) -> None:
    action = sim.add_action(tenant=FABRIKAM)
    tenant_cancel("fabrikam", action)

    table = TableClient.from_connection_string(azurite.connection_string, "CancelAudit")
    rows = list(table.query_entities("PartitionKey eq @pk", parameters={"pk": action}))
    assert [(r["TenantId"], r["UpstreamStatus"]) for r in rows] == [(FABRIKAM, 200)]


def test_queue_messages_name_their_tenant_and_results_carry_it(
    tenants: dict[str, str], sim: DefenderSimulator, azurite: Azurite
) -> None:
    queues = Queues(azurite.connection_string)
    host = QueueFunction(ROOT / "CancelMachineActionQueue", azurite.connection_string, visibility_timeout=0.2)
    fabrikam, home = sim.add_action(tenant=FABRIKAM), sim.add_action()
    queues.put({"machineActionId": fabrikam, "comment": "q", "correlationId": "t-1", "tenantId": "fabrikam"})
    queues.put({"machineActionId": home, "comment": "q", "correlationId": "t-2"})
    queues.put({"machineActionId": home, "comment": "q", "correlationId": "t-3", "tenantId": "northwind"})

    results = {r["correlationId"]: r for r in run_until_results(host, queues, 3)}

    assert (results["t-1"]["outcome"], results["t-1"]["tenantId"], results["t-1"]["status"]) == (
        "cancelled",
        FABRIKAM,
        200,
    )
    assert (results["t-2"]["outcome"], results["t-2"]["tenantId"]) == ("cancelled", sim.home_tenant)
    assert results["t-3"]["outcome"] == "rejected" and results["t-3"]["body"]["error"]["code"] == "TenantNotFound"
    assert sorted(c.tenant for c in sim.calls()) == sorted([FABRIKAM, sim.home_tenant])
    assert queues.count(queue_api.QUEUE + "-poison") == 0


def test_a_deferred_copy_keeps_its_tenant() -> None:
    message = queue_api.parse_message(
        json.dumps(
            {"machineActionId": "988cc94e-7a8f-4b28-ab65-54970c5d5018", "comment": "c", "tenantId": "contoso"}
        ).encode(),
        "msg-1",
    )

    again = queue_api.parse_message(message.again(1).to_json().encode(), "msg-2")

    assert (again.tenant_ref, again.message_id) == ("contoso", "msg-1")


ONBOARD = ROOT / "infra/onboard-tenant.sh"
KEY = "onboarding-test-key"


@pytest.fixture
def served(tenants: dict[str, str], azurite: Azurite) -> Iterator[str]:
    """The app behind the local Functions host on a free loopback port, as the script reaches it."""
    from localdev.funchost import FunctionHost

    host = FunctionHost(ROOT, azurite.connection_string, {KEY}, port=0).start()
    yield f"http://127.0.0.1:{host.port}"
    host.stop()


def onboard(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", **({"FUNCTION_KEY": key} if key else {})}
    return subprocess.run(["bash", str(ONBOARD), *args], capture_output=True, text=True, env=env, timeout=60)


def test_onboarding_prints_the_consent_url_then_finds_the_tenant_ready(served: str, sim: DefenderSimulator) -> None:
    run = onboard(
        "--tenant", CONTOSO, "--app-client-id", LOCAL_TENANT_APP, "--function-url", served, "--name", "contoso"
    )

    assert run.returncode == 0, run.stderr
    assert f"https://login.microsoftonline.com/{CONTOSO}/adminconsent?client_id={LOCAL_TENANT_APP}" in run.stdout
    assert "2. ok" in run.stdout and KEY not in run.stdout + run.stderr
    [probe] = sim.calls()
    assert probe.tenant == CONTOSO and probe.status == 404  # the nil action: Defender took the token


def test_onboarding_names_what_is_missing(
    served: str, entra: EntraEndpoint, identity: IdentityEndpoint, sim: DefenderSimulator
) -> None:
    entra.apps[LOCAL_TENANT_APP].consented.pop(FABRIKAM)
    not_consented = onboard("--tenant", FABRIKAM, "--app-client-id", LOCAL_TENANT_APP, "--function-url", served,
                            "--name", "fabrikam")  # fmt: skip
    not_configured = onboard("--tenant", CONTOSO, "--app-client-id", LOCAL_TENANT_APP, "--function-url", served,
                             "--name", "northwind")  # fmt: skip
    entra.register(LOCAL_TENANT_APP, FederatedCredential(f"{ISSUER_HOST}/{identity.home_tenant}/v2.0", LOCAL_IDENTITY))
    wrong_subject = onboard("--tenant", CONTOSO, "--app-client-id", LOCAL_TENANT_APP, "--function-url", served,
                            "--name", "contoso")  # fmt: skip

    assert [r.returncode for r in (not_consented, not_configured, wrong_subject)] == [2, 2, 2]
    assert "no consent in" in not_consented.stderr and "AADSTS700016" in not_consented.stderr
    assert "add northwind=" in not_configured.stderr
    assert "federated credential does not match" in wrong_subject.stderr and "AADSTS700213" in wrong_subject.stderr
    assert sim.calls("") == []


def test_onboarding_dry_run_prints_every_call_and_never_the_key() -> None:
    run = onboard("--tenant", CONTOSO, "--app-client-id", LOCAL_TENANT_APP, "--cloud", "GCCHigh", "--function-url",
                  "https://func-x.azurewebsites.us", "--name", "contoso", "--dry-run")  # fmt: skip

    assert run.returncode == 0
    assert run.stdout.splitlines() == [
        f"1. the customer's admin opens: https://login.microsoftonline.us/{CONTOSO}/adminconsent?client_id={LOCAL_TENANT_APP}",
        "2. POST https://func-x.azurewebsites.us/api/tenants/contoso/machineactions/00000000-0000-0000-0000-000000000000/cancel",
        "   x-functions-key: <FUNCTION_KEY>",
        '   {"Comment": "onboarding check"}',
    ]
    assert KEY not in run.stdout


def test_the_powershell_onboarding_script_makes_the_same_calls() -> None:
    """No PowerShell here: the .ps1 is held to the .sh by the calls and verdicts they share."""
    sh, ps1 = ONBOARD.read_text(), ONBOARD.with_suffix(".ps1").read_text()

    for shared in ("/adminconsent?client_id=", "/api/tenants/", "00000000-0000-0000-0000-000000000000",
                   '{"Comment": "onboarding check"}', "x-functions-key", "ResourceNotFound", "TenantNotFound",
                   "TokenUnavailable", "AADSTS700016", "AADSTS70021:", "https://login.microsoftonline.us",
                   "FUNCTION_KEY>"):  # fmt: skip
        assert shared in sh and shared in ps1, shared


def test_defender_refuses_a_tenant_it_does_not_serve_and_the_answer_passes_through(
    tenants: dict[str, str], sim: DefenderSimulator
) -> None:
    action = sim.add_action(tenant=FABRIKAM)
    sim.tenants.discard(FABRIKAM)  # consented in Entra, but Defender is not onboarded there

    response = tenant_cancel("fabrikam", action)

    assert response.status_code == 403 and body_of(response)["error"]["code"] == "Forbidden"
    assert [(c.tenant, c.status) for c in sim.calls()] == [(FABRIKAM, 403)]


def tenant_cancel_pending(tenant: str, machine_id: str, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return call("CancelTenantPendingActions", b'{"Comment": "customer machine reimaged"}', headers, tenant=tenant,
                machineId=machine_id)  # fmt: skip


def test_a_bulk_cancel_in_a_tenant_sees_and_cancels_only_that_tenants_actions(
    limited_callers: None, sim: DefenderSimulator, entra: EntraEndpoint
) -> None:
    machine = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
    mine = {sim.add_action(machine_id=machine, tenant=CONTOSO) for _ in range(3)}
    theirs = sim.add_action(machine_id=machine, tenant=FABRIKAM)  # same machine id, another customer

    done = tenant_cancel_pending("contoso", machine, caller(SOC_A))
    refused = tenant_cancel_pending("fabrikam", machine, caller(SOC_A))
    entra.consent(LOCAL_TENANT_APP, FABRIKAM, roles=("Machine.Isolate",))  # no Machine.Read.All there
    unreadable = tenant_cancel_pending("fabrikam", machine, caller(MSSP))

    assert done.status_code == 200 and {a["id"] for a in body_of(done)["actions"]} == mine
    assert body_of(done)["cancelled"] == 3 and sim.status_of(theirs) == "Pending"
    assert refused.status_code == 403
    assert unreadable.status_code == 403 and "Machine.Read.All" in body_of(unreadable)["error"]["message"]
    assert {c.tenant for c in sim.calls(api="cancel")} == {CONTOSO}
