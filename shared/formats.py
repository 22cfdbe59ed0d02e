"""Defender's vocabulary and the formats of what callers send: ids, action statuses and types, limits.

The one place each is spelled, for the parsers (shared.cancel.commands), the Defender client's
answer checks (shared.defender.client) and the settings (tenant ids).
"""

from __future__ import annotations

import re
from enum import StrEnum

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")  # Defender's machine id
MAX_COMMENT_CHARS = 4096  # openapi.json's maxLength; the audit record keeps it whole

# MachineAction.status and .type, as Defender's Swagger (reference/mde.swagger.json) and REFERENCE.md list them.
ACTION_STATUSES = frozenset({"Pending", "InProgress", "Succeeded", "Failed", "TimeOut", "Cancelled"})
OPEN_STATUSES = ("Pending", "InProgress")
FINAL_STATUSES = ACTION_STATUSES - set(OPEN_STATUSES)
ACTION_TYPES = frozenset(
    {
        "RunAntiVirusScan",
        "Offboard",
        "LiveResponse",
        "CollectInvestigationPackage",
        "Isolate",
        "Unisolate",
        "StopAndQuarantineFile",
        "RestrictCodeExecution",
        "UnrestrictCodeExecution",
        "RequestSample",
    }
)


class Api(StrEnum):
    """The Defender APIs the app calls, each with a quota of its own (shared.config.settings)."""

    CANCEL = "cancel"  # POST /api/machineactions/{id}/cancel
    LIST = "list"  # GET /api/machineactions?$filter=...
    GET = "get"  # GET /api/machineactions/{id}
