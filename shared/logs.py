"""What the app logs: the SDKs kept quiet, and one structured record per cancel and per refusal.

Under the Functions Python worker every record at INFO and above, from any logger, goes to the host
and on to Application Insights as a trace. The SDKs' routine records (azure-core's HTTP logging
policy prints every Table request and response, azure-identity a line per token, MSAL, urllib3)
are kept at WARNING unless LOG_LEVEL_SDK asks for more. The worker forwards a record's message but
drops its `extra` (azure-functions-python-worker #1327, #1681), so each record's fields travel in
the message itself, as JSON after a fixed prefix that KQL reads with parse_json (docs/logs.md, infra
queries); the same fields also go as `extra`, for handlers that keep them (OpenTelemetry). The
fields are an AuditRecord's, the same columns as the audit table's rows (shared.storage.audit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import AppError
from shared.outcomes import Outcome

PREFIX = "cancel-machine-action "  # every structured record's message starts so
SDK_LOGGERS = ("azure", "msal", "urllib3")  # azure: azure.core's HTTP logging policy, azure.identity, storage

logger = logging.getLogger("cancel_machine_action")


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """What happened to one cancel request: an audit row when it reached Defender, and, for every
    request (refusals too), one structured log record with the same fields."""

    action_id: str
    source: str  # "http", "queue" or "bulk"
    comment: str
    correlation_id: str
    outcome: Outcome
    duration_ms: float = 0.0
    upstream_status: int | None = None
    attempts: int = 0
    request_id: str | None = None
    tenant_id: str = "home"  # the directory acted in (shared.config.tenants)
    caller: str = ""  # whose request: "function-key", "principal:<ids>" or "queue"
    waited_ms: float = 0.0  # for a slot of the quota
    upstream_ms: float = 0.0  # from the first send to Defender's answer
    error_code: str = ""  # our error's code, when there was no answer from Defender
    event: str = "cancel"  # "cancel" (sent), "replay", "refusal" (nothing sent), "verify"
    verified_status: str = ""  # a verify event's read: the action's status (or "Unverified")

    def fields(self) -> dict[str, Any]:
        """The record's fields, under the names the audit table and the log queries use."""
        return {
            "Event": self.event,
            "ActionId": self.action_id,
            "Source": self.source,
            "TenantId": self.tenant_id,
            "Caller": self.caller,
            "CorrelationId": self.correlation_id,
            "Outcome": str(self.outcome),
            "UpstreamStatus": self.upstream_status if self.upstream_status is not None else -1,
            "Attempts": self.attempts,
            "WaitedMs": round(self.waited_ms, 3),
            "UpstreamMs": round(self.upstream_ms, 3),
            "DurationMs": round(self.duration_ms, 3),
            "UpstreamRequestId": self.request_id or "",
            "ErrorCode": self.error_code,
            "VerifiedStatus": self.verified_status,
        }


def quiet_sdks(level: str = "WARNING") -> None:
    """The SDKs log at `level` and above (LOG_LEVEL_SDK); never a token or key either way."""
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(level)


def record(fields: Mapping[str, Any], level: int = logging.INFO) -> None:
    """One structured record: a line a person can read, and fields a query can use."""
    logger.log(level, PREFIX + json.dumps(fields, separators=(",", ":"), default=str), extra=dict(fields))


def parse(message: str) -> dict[str, Any] | None:
    """A structured record's fields from its message (what the KQL queries do), else None."""
    if not message.startswith(PREFIX):
        return None
    fields: dict[str, Any] = json.loads(message[len(PREFIX) :])
    return fields


def refused(exc: AppError, correlation: str, source: str = "http") -> None:
    """The record of a request refused before the cancel service saw it (caller, tenant, a bad
    request or message). The service records its own refusals (quota, state store, token)."""
    fields = AuditRecord(
        action_id="",
        source=source,
        comment="",
        correlation_id=correlation,
        outcome=Outcome.REFUSED,
        error_code=exc.code,
        event="refusal",
    )
    record(fields.fields(), logging.WARNING if exc.status >= 500 else logging.INFO)
