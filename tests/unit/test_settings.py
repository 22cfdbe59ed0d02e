"""Settings: every contract setting read once, validated, with a message naming the setting."""

from __future__ import annotations

import pytest

from shared.config.settings import RateWindow, Settings, parse_api_base_url, parse_rate_limits
from shared.errors import SettingsError
from shared.formats import Api

BASE = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def settings(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


def test_defaults_follow_the_contract() -> None:
    s = settings()

    assert s.cloud == "Public"
    assert s.api_base_url == "https://api.security.microsoft.com"  # the host Microsoft documents now
    assert s.token_scope == "https://api.securitycenter.microsoft.com/.default"  # tokens keep the old audience
    assert s.client_id is None
    assert s.rate_limits == (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    assert s.rate_limit_key == "Public-system"
    assert s.safety_ms == 1000
    assert s.http_max_wait_seconds == 0
    assert s.allowed_callers == frozenset()
    assert s.storage.connection_string == "UseDevelopmentStorage=true"


@pytest.mark.parametrize(
    ("cloud", "root", "resource"),
    [
        ("Public", "https://api.security.microsoft.com", "https://api.securitycenter.microsoft.com"),
        ("GCC", "https://api-gcc.securitycenter.microsoft.us", "https://api-gcc.securitycenter.microsoft.us"),
        ("GCCHigh", "https://api-gov.securitycenter.microsoft.us", "https://api-gov.securitycenter.microsoft.us"),
        ("DoD", "https://api-gov.securitycenter.microsoft.us", "https://api-gov.securitycenter.microsoft.us"),
    ],
)
def test_cloud_picks_api_root_and_token_scope(cloud: str, root: str, resource: str) -> None:
    s = settings(DEFENDER_CLOUD=cloud)

    assert s.api_base_url == root
    assert s.token_scope == resource + "/.default"


def test_overrides_win_and_key_follows_the_identity() -> None:
    s = settings(
        DEFENDER_API_BASE_URL="https://eu.api.security.microsoft.com",
        DEFENDER_TOKEN_SCOPE="https://api.securitycenter.microsoft.com/.default",
        AZURE_CLIENT_ID="abc",
        RATE_LIMITS="10/2, 30/8",
        RATE_LIMIT_SAFETY_MS="50",
        HTTP_MAX_WAIT_SECONDS="2.5",
    )

    assert s.api_base_url == "https://eu.api.security.microsoft.com"
    assert s.rate_limits == (RateWindow(10, 2.0), RateWindow(30, 8.0))
    assert s.rate_limit_key == "Public-abc"
    assert (s.safety_ms, s.http_max_wait_seconds) == (50, 2.5)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"DEFENDER_CLOUD": "China"}, "DEFENDER_CLOUD"),
        ({"RATE_LIMITS": "100"}, "RATE_LIMITS"),
        ({"RATE_LIMITS": "0/60"}, "RATE_LIMITS"),
        ({"RATE_LIMITS": "10/0"}, "RATE_LIMITS"),
        ({"RATE_LIMITS": "10/60,"}, "RATE_LIMITS"),
        ({"RATE_LIMIT_SAFETY_MS": "-1"}, "RATE_LIMIT_SAFETY_MS"),
        ({"HTTP_MAX_WAIT_SECONDS": "soon"}, "HTTP_MAX_WAIT_SECONDS"),
        ({"AUDIT_TABLE": "bad-name"}, "AUDIT_TABLE"),
        ({"DEFENDER_API_BASE_URL": "https://example.com"}, "DEFENDER_API_BASE_URL"),
        ({"DEFENDER_API_BASE_URL": "https://api.securitycenter.microsoft.com:99999"}, "DEFENDER_API_BASE_URL"),
        ({"DEFENDER_API_BASE_URL": "http://127.0.0.1:port"}, "DEFENDER_API_BASE_URL"),
        ({"RATE_LIMIT_SAFETY_MS": "²"}, "RATE_LIMIT_SAFETY_MS"),
        ({"RATE_LIMITS": "10/6\u0660"}, "RATE_LIMITS"),
        ({"RATE_LIMIT_KEY": "tenant/app"}, "RATE_LIMIT_KEY"),
        ({"RATE_LIMIT_KEY": "a#b"}, "RATE_LIMIT_KEY"),
        ({"RATE_LIMIT_KEY": "a\tb"}, "RATE_LIMIT_KEY"),
        ({"RATE_LIMIT_KEY": "k" * 513}, "RATE_LIMIT_KEY"),
        ({"ALLOWED_CALLERS": "app-1"}, "ALLOWED_CALLERS"),
    ],
)
def test_a_wrong_value_fails_naming_the_setting(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        settings(**env)


@pytest.mark.parametrize(
    ("env", "first", "second"),
    [
        ({"IDEMPOTENCY_LEASE_SECONDS": "30", "DEFENDER_TIMEOUT_SECONDS": "30"}, "IDEMPOTENCY_LEASE_SECONDS",
         "DEFENDER_TIMEOUT_SECONDS"),
        ({"IDEMPOTENCY_LEASE_SECONDS": "40", "HTTP_MAX_WAIT_SECONDS": "20", "DEFENDER_TIMEOUT_SECONDS": "20"},
         "IDEMPOTENCY_LEASE_SECONDS", "HTTP_MAX_WAIT_SECONDS"),
        ({"HTTP_MAX_WAIT_SECONDS": "200", "DEFENDER_TIMEOUT_SECONDS": "31"}, "HTTP_MAX_WAIT_SECONDS",
         "DEFENDER_TIMEOUT_SECONDS"),
        ({"HTTP_MAX_WAIT_SECONDS": "150", "DEFENDER_TIMEOUT_SECONDS": "30", "VERIFY_SECONDS": "60"},
         "HTTP_MAX_WAIT_SECONDS", "VERIFY_SECONDS"),
    ],
)  # fmt: skip
def test_settings_that_contradict_each_other_are_refused_naming_both(
    env: dict[str, str], first: str, second: str
) -> None:
    with pytest.raises(SettingsError, match=f"{first}.*{second}"):
        settings(**env)


def test_the_longest_consistent_settings_are_accepted() -> None:
    s = settings(IDEMPOTENCY_LEASE_SECONDS="36", HTTP_MAX_WAIT_SECONDS="5", DEFENDER_TIMEOUT_SECONDS="30")

    assert (s.idempotency_lease_seconds, s.http_max_wait_seconds, s.timeout_seconds) == (36, 5, 30)


def test_missing_storage_connection_names_both_forms() -> None:
    with pytest.raises(SettingsError, match=r"MyState__tableServiceUri.*STATE_STORAGE"):
        Settings.from_env({"STATE_STORAGE": "MyState", **BASE})


def test_identity_based_storage_connection() -> None:
    s = Settings.from_env(
        {"STATE_STORAGE": "State", "State__accountName": "stcancel", "State__clientId": "cid", **BASE}
    )

    assert s.storage.connection_string is None
    assert s.storage.table_service_uri == "https://stcancel.table.core.windows.net"
    assert s.storage.client_id == "cid"


def test_connection_string_never_appears_in_repr() -> None:
    s = settings(AzureWebJobsStorage="DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0")

    assert "c2VjcmV0" not in repr(s)


@pytest.mark.parametrize(
    "platform", [{"WEBSITE_AUTH_ENABLED": "True"}, {"AUTH_CLIENT_ID": "3c1d2e4f-0000-4000-8000-0a1b2c"}]
)
def test_allowed_callers_need_platform_authentication(platform: dict[str, str]) -> None:
    """The platform's own flag, or the deployment's AUTH_CLIENT_ID (a host that fronts the app with
    authentication but sets no WEBSITE_AUTH_ENABLED must still start)."""
    s = settings(ALLOWED_CALLERS="App-1, obj-2", **platform)

    assert s.allowed_callers == frozenset({"app-1", "obj-2"})
    with pytest.raises(SettingsError, match="ALLOWED_CALLERS"):
        settings(ALLOWED_CALLERS="App-1", WEBSITE_AUTH_ENABLED="False")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.securitycenter.microsoft.com",
        "https://api.security.microsoft.com/",
        "https://uk.api.security.microsoft.com",
        "https://ina.api.security.microsoft.com",
        "https://aea.api.security.microsoft.com",
        "https://api-gov.securitycenter.microsoft.us",
        "http://127.0.0.1:7080",
        "http://localhost:1234",
        "http://[::1]:8080",
        "https://127.0.0.2",
    ],
)
def test_known_hosts_and_loopback_are_accepted(url: str) -> None:
    assert parse_api_base_url(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://api.securitycenter.microsoft.com",
        "https://api.securitycenter.microsoft.com.evil.example",
        "https://evil.example/api.securitycenter.microsoft.com",
        "https://api.securitycenter.microsoft.com/api",
        "https://user@api.securitycenter.microsoft.com",
        "https://api.securitycenter.microsoft.com:8443",
        "http://10.0.0.5:7080",
        "ftp://127.0.0.1",
        "not a url",
    ],
)
def test_other_hosts_are_refused(url: str) -> None:
    with pytest.raises(SettingsError, match="DEFENDER_API_BASE_URL"):
        parse_api_base_url(url)


def test_rate_limits_are_sorted_shortest_first() -> None:
    assert parse_rate_limits("1500/3600,100/60") == (RateWindow(100, 60.0), RateWindow(1500, 3600.0))


def test_a_function_with_a_bad_setting_refuses_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from shared.app import reset_app

    monkeypatch.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    monkeypatch.delenv("ALLOWED_CALLERS", raising=False)
    reset_app()
    import CancelMachineAction  # loads with good settings

    monkeypatch.setenv("ALLOWED_CALLERS", "some-app")
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    reset_app()
    try:
        with pytest.raises(SettingsError, match="ALLOWED_CALLERS"):
            importlib.reload(CancelMachineAction)  # what the worker does when the host starts
    finally:
        reset_app()


TENANT_ENV = {
    "TENANTS": " Contoso=6D3F0C4A-2B1E-4F5A-8C7D-9E0F1A2B3C4D , fabrikam=a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    "TENANT_APP_CLIENT_ID": "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
    "AZURE_CLIENT_ID": "5b1f0e2a-9c47-4d0e-8f6a-2c3d4e5f6a7b",
}


def test_tenants_are_found_by_name_or_id_and_each_has_the_key_of_app_and_tenant() -> None:
    s = settings(**TENANT_ENV)

    contoso = s.tenants.resolve("CONTOSO")
    assert contoso == s.tenants.resolve("6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d")
    assert (contoso.name, contoso.home) == ("contoso", False)
    assert s.tenants.resolve(None) == s.tenants.resolve("home") and s.tenants.home.home
    assert s.quota_key(Api.CANCEL, contoso.id) == f"Public-{TENANT_ENV['TENANT_APP_CLIENT_ID']}-{contoso.id}"
    assert s.quota_key(Api.LIST, contoso.id) == f"Public-{TENANT_ENV['TENANT_APP_CLIENT_ID']}-{contoso.id}-list"
    assert s.rate_limit_key == f"Public-{TENANT_ENV['AZURE_CLIENT_ID']}"  # the home tenant: unchanged


@pytest.mark.parametrize(
    ("cloud", "authority", "audience"),
    [
        ("Public", "https://login.microsoftonline.com", "api://AzureADTokenExchange"),
        ("GCC", "https://login.microsoftonline.com", "api://AzureADTokenExchange"),
        ("GCCHigh", "https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
        ("DoD", "https://login.microsoftonline.us", "api://AzureADTokenExchangeUSGov"),
    ],
)
def test_each_cloud_has_its_entra_authority_and_exchange_audience(cloud: str, authority: str, audience: str) -> None:
    s = settings(DEFENDER_CLOUD=cloud, **TENANT_ENV)

    assert (s.authority_host, s.exchange_audience) == (authority, audience)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TENANTS": "contoso"}, "TENANTS"),
        ({"TENANTS": "contoso=not-a-guid"}, "TENANTS"),
        ({"TENANTS": "home=6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d"}, "TENANTS"),
        # a name shaped like a tenant id would make tenants/<that id> act in another tenant
        ({"TENANTS": "11111111-2222-3333-4444-555555555555=6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d"}, "TENANTS"),
        ({"TENANTS": "a=6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d,b=6d3f0c4a-2b1e-4f5a-8c7d-9e0f1a2b3c4d"}, "TENANTS"),
        ({"TENANT_APP_CLIENT_ID": ""}, "TENANT_APP_CLIENT_ID"),
        ({"AZURE_CLIENT_ID": ""}, "AZURE_CLIENT_ID"),  # a system-assigned identity cannot be federated
        ({"HOME_TENANT_ID": "home"}, "HOME_TENANT_ID"),
        ({"AZURE_AUTHORITY_HOST": "http://127.0.0.1:7082"}, "AZURE_AUTHORITY_HOST"),
        ({"AZURE_AUTHORITY_HOST": "https://login.evil.example"}, "AZURE_AUTHORITY_HOST"),
        ({"AZURE_AUTHORITY_HOST": "https://127.0.0.1:99999"}, "AZURE_AUTHORITY_HOST"),  # no such port
        ({"ALLOWED_CALLERS": "app-1=northwind", "WEBSITE_AUTH_ENABLED": "True"}, "ALLOWED_CALLERS"),
        ({"ALLOWED_CALLERS": "app-1=", "WEBSITE_AUTH_ENABLED": "True"}, "ALLOWED_CALLERS"),
    ],
)
def test_tenant_settings_that_cannot_work_are_refused_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        settings(**{**TENANT_ENV, **env})


def test_a_caller_may_be_limited_to_tenants_by_name_or_id() -> None:
    s = settings(
        **TENANT_ENV,
        ALLOWED_CALLERS="App-1=contoso|A1B2C3D4-E5F6-4A7B-8C9D-0E1F2A3B4C5D, app-2=home, app-3",
        WEBSITE_AUTH_ENABLED="True",
    )
    contoso, fabrikam, home = (s.tenants.resolve(n) for n in ("contoso", "fabrikam", "home"))

    assert [s.callers.may_act_in({"app-1"}, t) for t in (contoso, fabrikam, home)] == [True, True, False]
    assert [s.callers.may_act_in({"app-2"}, t) for t in (contoso, fabrikam, home)] == [False, False, True]
    assert [s.callers.may_act_in({"app-3"}, t) for t in (contoso, fabrikam, home)] == [True, True, True]
    assert not s.callers.may_act_in({"app-4"}, home)
