"""The deployment pieces hold together: Bicep, local settings, docs/settings.md, OpenAPI, examples, grant script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from pycep import BicepParser

from shared.cancel.commands import parse_action_id, parse_idempotency_key
from shared.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BICEP = sorted((ROOT / "infra").rglob("*.bicep"))
MAIN = (ROOT / "infra/main.bicep").read_text()

# The contract's settings and their defaults ("" = unset; None = derived, so no fixed default).
CONTRACT_SETTINGS: dict[str, str | None] = {
    "DEFENDER_CLOUD": "Public",
    "DEFENDER_API_BASE_URL": None,
    "DEFENDER_TOKEN_SCOPE": None,
    "AZURE_CLIENT_ID": "",
    "STATE_STORAGE": "AzureWebJobsStorage",
    "RATE_LIMITS": "100/60,1500/3600",
    "RATE_LIMIT_KEY": None,
    "RATE_LIMIT_SAFETY_MS": "1000",
    "HTTP_MAX_WAIT_SECONDS": "0",
    "ALLOWED_CALLERS": "",
}
DERIVED = {
    "DEFENDER_API_BASE_URL": "by cloud",
    "DEFENDER_TOKEN_SCOPE": "by cloud",
    "RATE_LIMIT_KEY": "cloud + identity",
}


def bicep_app_settings() -> dict[str, str]:
    block = MAIN.split("var contractSettings = {", 1)[1].split("\n}", 1)[0]
    return dict(re.findall(r"^\s+(\w+): (.+?)\s*$", block, re.M))


def bicep_param_defaults() -> dict[str, str]:
    return {name: value.strip("'") for name, value in re.findall(r"^param (\w+) \w+ = (.+)$", MAIN, re.M)}


def documented_defaults() -> dict[str, str]:
    """Each setting's default as docs/settings.md's table gives it."""
    text = (ROOT / "docs/settings.md").read_text()
    return {name: default for name, default in re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, re.M)}


def bicep_default(expression: str) -> str:
    literal = re.fullmatch(r"'(.*)'", expression)
    if literal:
        return literal.group(1)
    param = re.fullmatch(r"(?:string\()?(\w+)\)?", expression)
    assert param, f"unexpected setting expression {expression!r}"
    return bicep_param_defaults()[param.group(1)]


@pytest.mark.parametrize("name", CONTRACT_SETTINGS)
def test_every_contract_setting_is_in_bicep_local_settings_and_the_docs_with_one_default(name: str) -> None:
    default = CONTRACT_SETTINGS[name]
    bicep, local, documented = (
        bicep_app_settings(),
        json.loads((ROOT / "local.settings.sample.json").read_text())["Values"],
        documented_defaults(),
    )

    assert name in bicep and name in local and name in documented
    if name == "AZURE_CLIENT_ID":  # deployed with the user-assigned identity; unset locally
        assert bicep[name] == "identity.outputs.clientId" and local[name] == "" and documented[name] == "unset"
        return
    if default is None:
        assert documented[name] == DERIVED[name]
        assert bicep_default(bicep[name]) == ""  # empty = derived, as the app reads it
        return
    assert bicep_default(bicep[name]) == default
    assert local[name] == default
    assert documented[name] in (f"`{default}`", "unset" if default == "" else f"`{default}`")


def test_code_defaults_agree_with_the_contract() -> None:
    s = Settings.from_env({"AzureWebJobsStorage": "UseDevelopmentStorage=true"})

    assert (s.cloud, s.state_storage, s.safety_ms, s.http_max_wait_seconds) == (
        "Public",
        "AzureWebJobsStorage",
        1000,
        0,
    )
    assert ",".join(f"{w.limit}/{w.seconds:g}" for w in s.rate_limits) == CONTRACT_SETTINGS["RATE_LIMITS"]


@pytest.mark.parametrize("path", BICEP, ids=[p.name for p in BICEP])
def test_bicep_parses_and_holds_no_secret(path: Path) -> None:
    parsed = BicepParser().parse(file_path=path)
    text = path.read_text()

    assert parsed["resources"] or parsed.get("modules")
    if path.name == "api-premium.bicep":
        # The one exception, and only for Premium's own content account: Azure Files takes a key.
        [line] = [line for line in text.splitlines() if "listKeys" in line]
        assert "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING" in line and "content.listKeys()" in line
        text = text.replace(line, "")
    for forbidden in ("listKeys", "AccountKey", "DefaultEndpointsProtocol", "SharedAccessKey", "SharedAccessSignature",
                      "connectionString:", "password", "@secure"):  # fmt: skip
        assert forbidden not in text, f"{path.name} has {forbidden}"


def test_storage_is_identity_only_with_scoped_roles() -> None:
    storage = (ROOT / "infra/app/storage.bicep").read_text()
    api = (ROOT / "infra/app/api.bicep").read_text()
    rbac = (ROOT / "infra/app/rbac.bicep").read_text()

    assert "allowSharedKeyAccess: false" in storage
    assert "AzureWebJobsStorage__credential: 'managedidentity'" in MAIN
    assert "tier: 'FlexConsumption'" in api and "name: 'python', version: '3.11'" in api
    for role in ("b7e6dc6d-f1e8-4753-8033-0f276bb0955b", "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
                 "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"):  # fmt: skip
        assert role in rbac
    assert "scope: storage" in rbac
    assert "DisableLocalAuth: true" in (ROOT / "infra/app/monitoring.bicep").read_text()
    assert "output FUNCTION_APP_URL" in MAIN and "output IDENTITY_PRINCIPAL_ID" in MAIN


def test_openapi_is_valid_swagger_2_and_matches_the_http_routes() -> None:
    spec = json.loads((ROOT / "openapi.json").read_text())
    validate(spec)
    routes = set()
    for function_json in ROOT.glob("*/function.json"):
        trigger = json.loads(function_json.read_text())["bindings"][0]
        if trigger["type"] == "httpTrigger":
            routes |= {(f"/{trigger['route']}", method) for method in trigger["methods"]}

    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert spec["swagger"] == "2.0" and spec["basePath"] == "/api"
    assert documented == routes
    for ops in spec["paths"].values():
        for op in ops.values():  # every answer has its shape, but the host's empty 401
            assert all("schema" in r for code, r in op["responses"].items() if code != "401")
            assert "schema" not in op["responses"]["401"]
    # One key scheme (the connector wizard takes one): the header.
    assert spec["securityDefinitions"] == {
        "functionKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "x-functions-key",
            "description": "A function key of the app",
        }
    }
    assert spec["security"] == [{"functionKeyHeader": []}]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_idempotency_key_the_openapi_allows_the_app_accepts(data: st.DataObject) -> None:
    spec = json.loads((ROOT / "openapi.json").read_text())
    cancel = spec["paths"]["/machineactions/{actionId}/cancel"]["post"]
    declared = next(p for p in cancel["parameters"] if p["name"] == "Idempotency-Key")
    key = data.draw(st.from_regex(declared["pattern"], fullmatch=True))
    assume(declared["minLength"] <= len(key) <= declared["maxLength"])

    assert parse_idempotency_key(key) == key
    action = data.draw(st.from_regex(next(p for p in cancel["parameters"] if p["name"] == "actionId")["pattern"]))
    assert parse_action_id(action.strip())


def test_sentinel_playbook_is_a_valid_arm_template() -> None:
    template = json.loads((ROOT / "examples/sentinel-playbook.json").read_text())

    assert template["$schema"].endswith("deploymentTemplate.json#")
    assert template["contentVersion"] and isinstance(template["resources"], list)
    assert all({"type", "apiVersion", "name"} <= set(r) for r in template["resources"])
    workflow = next(r for r in template["resources"] if r["type"] == "Microsoft.Logic/workflows")
    definition = workflow["properties"]["definition"]
    assert definition["triggers"] and definition["actions"]
    actions = json.dumps(definition["actions"])
    # Logic Apps' Azure Functions action needs a function id, refuses custom routes and names .NET and
    # Node.js only (call-azure-functions-from-workflows): the playbook uses an Http action.
    assert '"type": "Http"' in actions and '"type": "Function"' not in actions and "/Incidents/Comment" in actions
    # The key comes only from the secure parameter. The bulk call also carries it as `code`: a Logic
    # App polls a 202's Location without the action's own headers (Azure/logicapps#611), so the
    # app's Location repeats the request's `code`; the action's inputs are secured (test_playbook).
    text = json.dumps(template)
    assert "listKeys" not in text
    assert re.findall(r"code=[^\"&]*", text) == ["code=@{encodeUriComponent(parameters('functionKey'))}"]


def test_grant_script_dry_run_prints_the_exact_graph_calls() -> None:
    principal, sp, role = (
        "11111111-2222-3333-4444-555555555555", "aaaaaaaa-2222-3333-4444-555555555555",
        "bbbbbbbb-2222-3333-4444-555555555555",
    )  # fmt: skip
    out = subprocess.run(
        ["bash", str(ROOT / "infra/grant-defender-permissions.sh"), "--principal-id", principal, "--dry-run",
         "--resource-sp-id", sp, "--app-role-id", role],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip

    assert f"GET https://graph.microsoft.com/v1.0/servicePrincipals/{principal}/appRoleAssignments" in out
    assert f"POST https://graph.microsoft.com/v1.0/servicePrincipals/{sp}/appRoleAssignedTo" in out
    body = json.loads(out.strip().splitlines()[-1])
    assert body == {"principalId": principal, "resourceId": sp, "appRoleId": role}


def test_grant_script_dry_run_looks_up_the_defender_service_principal_first() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "infra/grant-defender-permissions.sh"), "--principal-id",
         "11111111-2222-3333-4444-555555555555", "--dry-run", "--cloud", "GCCHigh"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    assert out.startswith(
        "1. GET https://graph.microsoft.us/v1.0/servicePrincipals?$filter=appId%20eq%20"
        "'fc780465-2017-40d4-a0c5-307022471b92'"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--principal-id", "not-a-guid"], "GUID"), (["--principal-id", "11111111-2222-3333-4444-555555555555",
      "--role", "Machine.Nope"], "--role must be one of")],
)  # fmt: skip
def test_grant_script_refuses_bad_input_clearly(args: list[str], message: str) -> None:
    run = subprocess.run(["bash", str(ROOT / "infra/grant-defender-permissions.sh"), *args, "--dry-run"],
                         capture_output=True, text=True)  # fmt: skip

    assert run.returncode == 2 and message in run.stderr


def test_azd_project_points_at_the_function_app() -> None:
    azure_yaml = (ROOT / "azure.yaml").read_text()

    assert "host: function" in azure_yaml and "language: python" in azure_yaml


def resource_blocks(bicep: str) -> dict[str, str]:
    """Each top-level `resource <name> '<type>'` block's text, by symbolic name."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^resource (\w+) '", bicep, re.M)]
    ends = [start for start, _ in starts[1:]] + [len(bicep)]
    return {name: bicep[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def test_only_the_site_carries_the_azd_service_tag() -> None:
    """azd deploy fails when two resources carry azd-service-name: api (the plan used to, too)."""
    api = (ROOT / "infra/app/api.bicep").read_text()
    tagged = [name for name, block in resource_blocks(api).items() if "azd-service-name" in block]

    assert tagged == ["site"]
    assert "azd-service-name" not in MAIN.split("module api", 1)[1].split("serviceName:", 1)[0]


def test_flex_limits_and_blob_names_are_enforced_at_the_parameter() -> None:
    assert re.search(r"@minValue\(40\)\s*@maxValue\(1000\)\s*param maximumInstanceCount int", MAIN)
    assert re.search(r"var deploymentContainer = toLower\(", MAIN)


FAKE_AZ = """#!/usr/bin/env bash
# Records each call; answers what the grant script asks for.
echo "$*" >> "$AZ_LOG"
case "$*" in
  "account show"*) echo '{}' ;;
  *"servicePrincipals?"*) printf 'aaaaaaaa-2222-3333-4444-555555555555\\tbbbbbbbb-2222-3333-4444-555555555555\\n' ;;
  *appRoleAssignments*) echo 0 ;;
  *) echo '{}' ;;
esac
"""


@pytest.mark.parametrize(
    ("cloud", "graph"),
    [("Public", "https://graph.microsoft.com"), ("GCC", "https://graph.microsoft.com"),
     ("GCCHigh", "https://graph.microsoft.us"), ("DoD", "https://dod-graph.microsoft.us")],
)  # fmt: skip
def test_grant_script_names_the_graph_token_resource_on_every_call(tmp_path: Path, cloud: str, graph: str) -> None:
    """az rest derives a token only for the signed-in cloud's own Graph host, and sends none for DoD's
    dod-graph.microsoft.us: every call must say which resource its token is for."""
    fake = tmp_path / "az"
    fake.write_text(FAKE_AZ)
    fake.chmod(0o755)
    log = tmp_path / "az.log"
    subprocess.run(
        ["bash", str(ROOT / "infra/grant-defender-permissions.sh"), "--principal-id",
         "11111111-2222-3333-4444-555555555555", "--cloud", cloud],
        capture_output=True, text=True, check=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "AZ_LOG": str(log)},
    )  # fmt: skip

    calls = [line for line in log.read_text().splitlines() if line.startswith("rest ")]
    assert len(calls) == 3  # look up the role, read assignments, grant
    assert all(f"--resource {graph}" in call and f"--url {graph}/v1.0/" in call for call in calls)


def test_the_connector_document_names_the_deployed_host(tmp_path: Path) -> None:
    out = tmp_path / "openapi.deployed.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "infra/connector_openapi.py"), "--out", str(out)],
        env={"PATH": "/usr/bin:/bin", "FUNCTION_APP_URL": "https://func-abc123.azurewebsites.net"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    spec = json.loads(out.read_text())

    assert spec["host"] == "func-abc123.azurewebsites.net" and spec["schemes"] == ["https"]
    validate(spec)
    assert "func-abc123.azurewebsites.net" in run.stdout
    refused = subprocess.run([sys.executable, str(ROOT / "infra/connector_openapi.py"), "http://x/api", "--out",
                              str(out)], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "https URL" in refused.stderr
    assert (
        "postprovision" in (ROOT / "azure.yaml").read_text()
        and "connector_openapi.py" in (ROOT / "azure.yaml").read_text()
    )


def test_the_location_is_limited_to_flex_regions_and_azd_asks_for_one() -> None:
    param = re.search(r"((?:@[^\n]*\n|  [^\n]*\n|\]\)\n|\}\)\n)*)param location string", MAIN)
    assert param is not None
    decorators = param.group(1)
    regions = re.findall(r"^  '([a-z0-9]+)'$", decorators, re.M)
    assert {"eastus", "westeurope", "swedencentral"} <= set(regions) and len(regions) >= 30
    assert {"usgovvirginia", "usgovtexas", "usgovarizona", "usdodeast", "usdodcentral"} <= set(regions)
    assert "type: 'location'" in decorators


PREMIUM_ONLY = ("FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
                "WEBSITE_CONTENTSHARE")  # fmt: skip


def test_each_plan_kind_has_its_own_settings_and_azure_government_runs_premium() -> None:
    flex = (ROOT / "infra/app/api.bicep").read_text()
    premium = (ROOT / "infra/app/api-premium.bicep").read_text()

    # Flex Consumption refuses the worker-runtime, version and content-share settings; Premium needs them.
    assert not any(name in flex for name in PREMIUM_ONLY)
    block = premium.split("var premiumSettings = {", 1)[1].split("\n}", 1)[0]
    settings = dict(re.findall(r"^  (\w+): (.+?)\s*$", block, re.M))
    assert set(PREMIUM_ONLY) <= set(settings)
    assert settings["FUNCTIONS_WORKER_RUNTIME"] == "'python'" and settings["FUNCTIONS_EXTENSION_VERSION"] == "'~4'"
    assert settings["SCM_DO_BUILD_DURING_DEPLOYMENT"] == "'true'"  # the Python packages built on deploy
    assert "tier: 'ElasticPremium', name: 'EP1'" in premium and "kind: 'elastic'" in premium
    assert "linuxFxVersion: 'Python|3.11'" in premium and "name: 'python', version: '3.11'" in flex
    # Each plan's module tags only its site for azd, and both get the same app settings.
    for text in (flex, premium):
        assert [n for n, b in resource_blocks(text).items() if "azd-service-name" in b] == ["site"]
    assert MAIN.count("appSettings: union(hostSettings, contractSettings)") == 2
    assert "var usePremium = planKind == 'premium' || environment().name == 'AzureUSGovernment'" in MAIN
    assert "module api 'app/api.bicep' = if (!usePremium)" in MAIN
    assert "module apiPremium 'app/api-premium.bicep' = if (usePremium)" in MAIN
    # The app's own storage stays identity-only whatever the plan.
    assert "allowSharedKeyAccess: false" in (ROOT / "infra/app/storage.bicep").read_text()


def test_the_connector_document_for_entra_mode_asks_for_a_token_and_sends_the_key(tmp_path: Path) -> None:
    out = tmp_path / "openapi.entra.json"
    subprocess.run(
        [sys.executable, str(ROOT / "infra/connector_openapi.py"), "https://func-abc123.azurewebsites.net", "--out",
         str(out), "--entra", "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    spec = json.loads(out.read_text())

    validate(spec)
    assert spec["security"] == [{"entra": []}] and spec["securityDefinitions"]["entra"]["type"] == "oauth2"
    for ops in spec["paths"].values():
        for op in ops.values():
            key = [p for p in op["parameters"] if p["name"] == "x-functions-key"]
            assert key and key[0]["in"] == "header" and key[0]["required"] is True


def test_every_setting_the_app_reads_is_deployed_documented_and_in_the_local_sample() -> None:
    source = (ROOT / "shared/config/settings.py").read_text()
    read = set(re.findall(r'_(?:get|int|seconds|table|partition_key)\(env, "([A-Z_]+)"', source))
    bicep, local = bicep_app_settings(), json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    documented = documented_defaults()

    assert {"TENANTS", "TENANT_APP_CLIENT_ID", "HOME_TENANT_ID", "AZURE_AUTHORITY_HOST"} <= read
    assert not read - set(bicep), read - set(bicep)
    assert not read - set(local), read - set(local)
    assert not read - set(documented), read - set(documented)


def test_bicep_federates_the_identity_with_the_tenant_app_when_it_manages_it() -> None:
    module = (ROOT / "infra/app/tenant-app.bicep").read_text()
    config = json.loads((ROOT / "infra/bicepconfig.json").read_text())

    assert config["extensions"]["microsoftGraphV1"].startswith(
        "br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:"
    )
    assert "extension microsoftGraphV1" in module and "signInAudience: 'AzureADMultipleOrgs'" in module
    assert (
        "subject: identityPrincipalId" in module
        and "'${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'" in module
    )
    assert "api://AzureADTokenExchangeUSGov" in module and "fc780465-2017-40d4-a0c5-307022471b92" in module
    assert "module tenantApp 'app/tenant-app.bicep' = if (manageTenantApp)" in MAIN
    assert "identityPrincipalId: identity.outputs.principalId" in MAIN
    assert bicep_app_settings()["TENANT_APP_CLIENT_ID"] == "tenantAppId"
    assert bicep_app_settings()["HOME_TENANT_ID"] == "tenant().tenantId"
