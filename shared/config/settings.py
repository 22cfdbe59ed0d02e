"""The app's settings: read once from the environment, validated, frozen.

Every name here is an app setting of CONTRACT.md (and of the Bicep); a wrong value fails with one
message that names the setting and what it accepts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.config.callers import CallerPolicy, parse_callers
from shared.config.clouds import (
    API_ROOTS,
    AUTHORITY_HOSTS,
    CLOUDS,
    EXCHANGE_AUDIENCES,
    KNOWN_DEFENDER_HOSTS,
    TOKEN_RESOURCES,
)
from shared.config.tenants import TenantDirectory, parse_tenants
from shared.errors import SettingsError
from shared.formats import GUID, Api

DEFAULT_RATE_LIMITS = "100/60,1500/3600"  # Defender's, for each of cancel, list and get (per app + tenant)
DEFAULT_VERIFY_SECONDS = 30.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_SAFETY_MS = 1000
QUEUE_CONNECTION = "AzureWebJobsStorage"
QUEUE = "cancel-machine-action"  # the queue trigger's queue (CONTRACT.md)
RESULTS_QUEUE = "cancel-machine-action-results"
HOST_JSON = Path(__file__).resolve().parents[2] / "host.json"
DEFAULT_MAX_DEQUEUE_COUNT = 5
MAX_LOGGED_CALLS = 8000
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_AUDIT_TABLE = "CancelAudit"
DEFAULT_RATE_LIMIT_TABLE = "CancelRateLimit"
DEFAULT_IDEMPOTENCY_TABLE = "CancelIdempotency"
DEFAULT_BULK_TABLE = "CancelBulkJobs"
DEFAULT_IDEMPOTENCY_LEASE = 360.0  # longer than host.json's functionTimeout (5 min)
QUEUE_INLINE_WAIT_SECONDS = 5.0  # a queue message sleeps this long for a slot in place; longer is deferred
# "Regardless of the function app timeout setting, 230 seconds is the maximum amount of time that an
# HTTP triggered function can take to respond" (Azure Load Balancer's idle timeout; MicrosoftDocs
# azure-docs, includes/functions-timeout-duration.md).
HTTP_RESPONSE_LIMIT_SECONDS = 230.0

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{2,62}")
_WINDOW = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*")
_WHOLE = re.compile(r"[0-9]+")
# A PartitionKey may not hold / \ # ? or control characters, and is at most 1 KiB (Table service
# data model, "Characters disallowed in key fields").
_PARTITION_KEY = re.compile(r"[^/\\#?\x00-\x1f\x7f-\x9f]{1,512}")


@dataclass(frozen=True)
class RateWindow:
    """At most `limit` calls in any rolling `seconds`."""

    limit: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class StorageConnection:
    """Where the state tables live: a connection string, or an endpoint reached by identity."""

    connection_string: str | None = field(default=None, repr=False)
    table_service_uri: str | None = None
    queue_service_uri: str | None = None
    client_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    cloud: str
    api_base_url: str
    token_scope: str
    client_id: str | None
    state_storage: str
    storage: StorageConnection
    queue_storage: StorageConnection  # the queue trigger's connection (AzureWebJobsStorage)
    max_dequeue_count: int
    rate_limits: tuple[RateWindow, ...]  # the cancel quota
    rate_limit_key: str
    safety_ms: int
    http_max_wait_seconds: float
    timeout_seconds: float
    callers: CallerPolicy
    audit_table: str
    rate_limit_table: str
    idempotency_table: str
    idempotency_lease_seconds: float
    bulk_table: str = DEFAULT_BULK_TABLE
    sdk_log_level: str = "WARNING"
    list_rate_limits: tuple[RateWindow, ...] = ()
    get_rate_limits: tuple[RateWindow, ...] = ()
    verify_seconds: float = DEFAULT_VERIFY_SECONDS
    tenants: TenantDirectory = field(default_factory=lambda: TenantDirectory.build(None, ()))
    tenant_app_client_id: str | None = None
    authority_host: str = AUTHORITY_HOSTS["Public"]
    exchange_audience: str = EXCHANGE_AUDIENCES["Public"]

    @property
    def allowed_callers(self) -> frozenset[str]:
        return self.callers.allowed

    def quota_windows(self, api: Api) -> tuple[RateWindow, ...]:
        """The windows of one Defender API's quota: RATE_LIMITS is the cancel quota."""
        chosen = {Api.CANCEL: self.rate_limits, Api.LIST: self.list_rate_limits, Api.GET: self.get_rate_limits}[api]
        return chosen or self.rate_limits

    def quota_key(self, api: Api, tenant_id: str | None = None) -> str:
        """The log one Defender API's quota is kept in, for the home tenant (None) or a customer's.
        Defender counts per app and tenant: a customer tenant's quota is the registration's there.
        The cancel quota keeps the bare key (its log survives an upgrade); the read APIs append theirs."""
        cancel = self.rate_limit_key if tenant_id is None else f"{self.cloud}-{self.tenant_app_client_id}-{tenant_id}"
        return cancel if api is Api.CANCEL else f"{cancel}-{api}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The validated settings; a SettingsError names the setting (or the two settings) at fault."""
        return check_consistent(cls._read(env))

    @classmethod
    def _read(cls, env: Mapping[str, str] | None) -> Settings:
        env = os.environ if env is None else env
        cloud = _get(env, "DEFENDER_CLOUD", "Public")
        if cloud not in CLOUDS:
            raise SettingsError(f"DEFENDER_CLOUD must be one of {', '.join(CLOUDS)}; got {cloud!r}")
        client_id = _get(env, "AZURE_CLIENT_ID", "") or None
        state_storage = _get(env, "STATE_STORAGE", "AzureWebJobsStorage")
        tenants = parse_tenants(_get(env, "TENANTS", ""), _get(env, "HOME_TENANT_ID", "") or None)
        return cls(
            cloud=cloud,
            api_base_url=parse_api_base_url(_get(env, "DEFENDER_API_BASE_URL", API_ROOTS[cloud])),
            token_scope=_get(env, "DEFENDER_TOKEN_SCOPE", TOKEN_RESOURCES[cloud] + "/.default"),
            client_id=client_id,
            state_storage=state_storage,
            storage=parse_storage_connection(env, state_storage),
            queue_storage=parse_storage_connection(env, QUEUE_CONNECTION, service="queue"),
            max_dequeue_count=host_max_dequeue_count(),
            rate_limits=parse_rate_limits(_get(env, "RATE_LIMITS", DEFAULT_RATE_LIMITS)),
            list_rate_limits=parse_rate_limits(_get(env, "LIST_RATE_LIMITS", DEFAULT_RATE_LIMITS), "LIST_RATE_LIMITS"),
            get_rate_limits=parse_rate_limits(_get(env, "GET_RATE_LIMITS", DEFAULT_RATE_LIMITS), "GET_RATE_LIMITS"),
            verify_seconds=_seconds(env, "VERIFY_SECONDS", DEFAULT_VERIFY_SECONDS),
            rate_limit_key=_partition_key(env, "RATE_LIMIT_KEY", f"{cloud}-{client_id or 'system'}"),
            safety_ms=_int(env, "RATE_LIMIT_SAFETY_MS", DEFAULT_SAFETY_MS),
            http_max_wait_seconds=_seconds(env, "HTTP_MAX_WAIT_SECONDS", 0.0),
            timeout_seconds=_seconds(env, "DEFENDER_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_SECONDS),
            callers=parse_allowed_callers(env, tenants),
            audit_table=_table(env, "AUDIT_TABLE", DEFAULT_AUDIT_TABLE),
            rate_limit_table=_table(env, "RATE_LIMIT_TABLE", DEFAULT_RATE_LIMIT_TABLE),
            idempotency_table=_table(env, "IDEMPOTENCY_TABLE", DEFAULT_IDEMPOTENCY_TABLE),
            idempotency_lease_seconds=_seconds(env, "IDEMPOTENCY_LEASE_SECONDS", DEFAULT_IDEMPOTENCY_LEASE),
            bulk_table=_table(env, "BULK_TABLE", DEFAULT_BULK_TABLE),
            sdk_log_level=_level(env, "LOG_LEVEL_SDK", "WARNING"),
            tenants=tenants,
            tenant_app_client_id=_tenant_app(env, tenants, client_id),
            authority_host=parse_authority_host(_get(env, "AZURE_AUTHORITY_HOST", AUTHORITY_HOSTS[cloud])),
            exchange_audience=_get(env, "TOKEN_EXCHANGE_AUDIENCE", EXCHANGE_AUDIENCES[cloud]),
        )


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def check_consistent(settings: Settings) -> Settings:
    """Refuse settings that contradict each other, naming both."""
    longest_wait = max(settings.http_max_wait_seconds, QUEUE_INLINE_WAIT_SECONDS)
    if settings.idempotency_lease_seconds <= longest_wait + settings.timeout_seconds:
        raise SettingsError(
            f"IDEMPOTENCY_LEASE_SECONDS ({settings.idempotency_lease_seconds:g}) must exceed the longest wait for "
            f"a slot (HTTP_MAX_WAIT_SECONDS or the queue's {QUEUE_INLINE_WAIT_SECONDS:g} s, here {longest_wait:g}) "
            f"plus DEFENDER_TIMEOUT_SECONDS ({settings.timeout_seconds:g}): a live holder would be overtaken"
        )
    if (
        settings.http_max_wait_seconds + settings.timeout_seconds + settings.verify_seconds
        > HTTP_RESPONSE_LIMIT_SECONDS
    ):
        raise SettingsError(
            f"HTTP_MAX_WAIT_SECONDS ({settings.http_max_wait_seconds:g}) plus DEFENDER_TIMEOUT_SECONDS "
            f"({settings.timeout_seconds:g}) plus VERIFY_SECONDS ({settings.verify_seconds:g}) must be at most "
            f"{HTTP_RESPONSE_LIMIT_SECONDS:g} s, the longest an HTTP-triggered function may take to answer on Azure"
        )
    return settings


def _partition_key(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name, default)
    if not _PARTITION_KEY.fullmatch(value):
        raise SettingsError(
            f"{name} must be 1 to 512 characters without / \\ # ? or control characters "
            f"(it is a Table PartitionKey); got {value!r}"
        )
    return value


def _level(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name, default).upper()
    if value not in LOG_LEVELS:
        raise SettingsError(f"{name} must be one of {', '.join(LOG_LEVELS)}; got {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name, str(default))
    if not _WHOLE.fullmatch(raw):
        raise SettingsError(f"{name} must be a whole number >= 0; got {raw!r}")
    return int(raw)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise SettingsError(f"{name} must be a number of seconds from 0 to 3600; got {raw!r}")
    return value


def _table(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name, default)
    if not _TABLE_NAME.fullmatch(value):
        raise SettingsError(f"{name} must be a table name (3-63 letters or digits, a letter first); got {value!r}")
    return value


def parse_rate_limits(raw: str, name: str = "RATE_LIMITS") -> tuple[RateWindow, ...]:
    """`COUNT/SECONDS[,COUNT/SECONDS...]`, e.g. `100/60,1500/3600`; sorted shortest window first."""
    windows = []
    for part in raw.split(","):
        match = _WINDOW.fullmatch(part)
        if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
            raise SettingsError(
                f"{name} must be a comma list of COUNT/SECONDS windows with COUNT >= 1 and "
                f"SECONDS > 0, e.g. {DEFAULT_RATE_LIMITS}; got {raw!r}"
            )
        windows.append(RateWindow(int(match.group(1)), float(match.group(2))))
    windows.sort(key=lambda w: w.seconds)
    if windows[-1].limit > MAX_LOGGED_CALLS:
        # The limiter keeps the longest window's calls in one Table entity (64 KiB of int64).
        raise SettingsError(f"{name}: the longest window may allow at most {MAX_LOGGED_CALLS} calls; got {raw!r}")
    return tuple(windows)


def parse_api_base_url(raw: str) -> str:
    """Accept https on a known Defender host, or a loopback address (http allowed) for local use."""
    if _is_root_url(raw, KNOWN_DEFENDER_HOSTS, loopback_schemes=("http", "https")):
        return raw.rstrip("/")
    raise SettingsError(
        "DEFENDER_API_BASE_URL must be https://<a Defender API host> (e.g. "
        "https://api.security.microsoft.com) or a loopback address such as "
        f"http://127.0.0.1:PORT, with no path; got {raw!r}"
    )


def _is_root_url(raw: str, known_hosts: Collection[str], loopback_schemes: tuple[str, ...]) -> bool:
    """A bare root URL (no path, query, fragment or user, a valid port): https on one of
    `known_hosts` at the default port, or a loopback address over one of `loopback_schemes`."""
    url = urlsplit(raw)
    host = (url.hostname or "").lower()
    try:
        port = url.port
    except ValueError:  # a port that is not a number, or out of range
        return False
    if url.path not in ("", "/") or url.query or url.fragment or url.username:
        return False
    if _is_loopback(host):
        return url.scheme in loopback_schemes
    return url.scheme == "https" and host in known_hosts and port in (None, 443)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_max_dequeue_count(host_json: Path = HOST_JSON) -> int:
    """host.json's `extensions.queues.maxDequeueCount`: the one place the host reads it from."""
    try:
        queues = json.loads(host_json.read_text()).get("extensions", {}).get("queues", {})
    except (OSError, ValueError):
        return DEFAULT_MAX_DEQUEUE_COUNT
    return int(queues.get("maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT))


def parse_storage_connection(env: Mapping[str, str], name: str, service: str = "table") -> StorageConnection:
    """The Functions convention: `<name>` is a connection string, or `<name>__*` names an identity."""
    conn = env.get(name, "").strip()
    if conn:
        return StorageConnection(connection_string=conn)
    account = env.get(f"{name}__accountName", "").strip()
    table_uri = env.get(f"{name}__tableServiceUri", "").strip()
    queue_uri = env.get(f"{name}__queueServiceUri", "").strip()
    if account:
        table_uri = table_uri or f"https://{account}.table.core.windows.net"
        queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
    if not (table_uri if service == "table" else queue_uri):
        raise SettingsError(
            f"The storage connection {name!r} is not set: set {name} (a connection string) or "
            f"{name}__{service}ServiceUri / {name}__accountName (managed identity)"
            + (" - STATE_STORAGE names it" if service == "table" else " - the queue trigger uses it")
        )
    client_id = env.get(f"{name}__clientId", "").strip() or None
    return StorageConnection(table_service_uri=table_uri, queue_service_uri=queue_uri or None, client_id=client_id)


def _tenant_app(env: Mapping[str, str], tenants: TenantDirectory, client_id: str | None) -> str | None:
    """The multi-tenant app registration customers consented to; needed exactly when TENANTS is set.
    Only a user-assigned identity can be its federated credential (Entra Workload ID docs)."""
    app = _get(env, "TENANT_APP_CLIENT_ID", "").lower() or None
    if not tenants.customers:
        return app
    if app is None or not GUID.fullmatch(app):
        raise SettingsError(
            f"TENANTS is set, so TENANT_APP_CLIENT_ID must be the multi-tenant app registration's client id "
            f"(a GUID); got {app!r}"
        )
    if client_id is None:
        raise SettingsError(
            "TENANTS is set, so AZURE_CLIENT_ID must name a user-assigned managed identity: only a "
            "user-assigned identity can be the app registration's federated credential"
        )
    return app


def parse_authority_host(raw: str) -> str:
    """Entra's authority: https on a known login host, or a loopback address (https still: the SDK
    refuses anything else) for the local stack."""
    known = {urlsplit(h).hostname or "" for h in AUTHORITY_HOSTS.values()}
    if _is_root_url(raw, known, loopback_schemes=("https",)):
        return raw.rstrip("/")
    raise SettingsError(
        "AZURE_AUTHORITY_HOST must be https://login.microsoftonline.com, https://login.microsoftonline.us "
        f"or an https loopback address, with no path; got {raw!r}"
    )


def parse_allowed_callers(env: Mapping[str, str], tenants: TenantDirectory | None = None) -> CallerPolicy:
    callers = parse_callers(env.get("ALLOWED_CALLERS", ""), tenants or TenantDirectory.build(None, ()))
    # The caller header can be trusted only when the platform's authentication strips forged ones.
    if callers.allowed and not platform_authentication(env):
        raise SettingsError(
            "ALLOWED_CALLERS is set but App Service Authentication is off (neither WEBSITE_AUTH_ENABLED=True "
            "nor AUTH_CLIENT_ID is set): caller identity cannot be trusted; turn authentication on or unset "
            "ALLOWED_CALLERS"
        )
    return callers


def platform_authentication(env: Mapping[str, str]) -> bool:
    """Whether App Service Authentication fronts the app: the platform says so (WEBSITE_AUTH_ENABLED,
    set on App Service plans), or the deployment does: infra/ sets AUTH_CLIENT_ID exactly when it
    configures authsettingsV2, for hosts that do not set WEBSITE_AUTH_ENABLED."""
    website = env.get("WEBSITE_AUTH_ENABLED", "").strip().lower() == "true"
    return website or bool(env.get("AUTH_CLIENT_ID", "").strip())
