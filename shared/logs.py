"""What the app logs: the SDKs kept quiet, and one structured record per cancel and per refusal.

Under the Functions Python worker every record at INFO and above, from any logger, goes to the host
and on to Application Insights as a trace. The SDKs' routine records (azure-core's HTTP logging
policy prints every Table request and response, azure-identity a line per token, MSAL, urllib3)
are kept at WARNING unless LOG_LEVEL_SDK asks for more. The worker forwards a record's message but
drops its `extra` (azure-functions-python-worker #1327, #1681), so each record's fields travel in
the message itself, as JSON after a fixed prefix that KQL reads with parse_json (README, infra
queries); the same fields also go as `extra`, for handlers that keep them (OpenTelemetry). Field
names are the audit record's (shared.audit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from shared.audit import AuditRecord
from shared.errors import AppError

PREFIX = "cancel-machine-action "  # every structured record's message starts so
SDK_LOGGERS = ("azure", "msal", "urllib3")  # azure: azure.core's HTTP logging policy, azure.identity, storage

logger = logging.getLogger("cancel_machine_action")


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
    fields = AuditRecord("", source, "", correlation, None, "refused", 0.0, 0, error_code=exc.code, event="refusal")
    record(fields.fields(), logging.WARNING if exc.status >= 500 else logging.INFO)
