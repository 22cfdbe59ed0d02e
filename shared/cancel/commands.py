"""Turning what a caller sent into a valid command (one cancel, or a bulk cancel of a machine), or a
400 in the upstream's error shape, before anything is sent."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

from shared.errors import InvalidRequest
from shared.formats import ACTION_TYPES, GUID, MACHINE_ID, MAX_COMMENT_CHARS, OPEN_STATUSES
from shared.idempotency.keys import http_key

MAX_BODY_BYTES = 64 * 1024
BULK_FIELDS = frozenset({"Comment", "comment", "types", "dryRun", "verify"})
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as the IETF draft's examples


@dataclass(frozen=True)
class CancelCommand:
    action_id: str  # canonical lower-case GUID: safe to put in the upstream path
    comment: str
    correlation_id: str
    source: str  # "http", "queue" or "bulk"
    _: KW_ONLY
    idempotency_key: str | None = None
    verify: bool = False  # read the action back after Defender's answer (shared.cancel.service)
    caller: str = "queue"  # whose request, for the records: the HTTP caller's scope, or the queue


def parse_action_id(raw: object) -> str:
    # fullmatch, not match: a trailing newline or "/../" must never reach the upstream path.
    if not isinstance(raw, str) or not GUID.fullmatch(raw):
        raise InvalidRequest("The machine action id must be a GUID, e.g. 988cc94e-7a8f-4b28-ab65-54970c5d5018")
    return str(uuid.UUID(raw))


def parse_comment(payload: Mapping[str, Any]) -> str:
    """`Comment` as upstream spells it; `comment` accepted too."""
    key = "Comment" if "Comment" in payload else "comment"
    if key not in payload:
        raise InvalidRequest("The request body must have a 'Comment' string", code="MissingRequiredParameter")
    comment = payload[key]
    if not isinstance(comment, str) or not comment.strip():
        raise InvalidRequest("'Comment' must be a non-empty string", code="InvalidRequestBody")
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidRequest(f"'Comment' must be at most {MAX_COMMENT_CHARS} characters", code="InvalidRequestBody")
    return comment


def parse_json_object(body: bytes, what: str = "The request body") -> dict[str, Any]:
    """A JSON object of at most 64 KiB (a queue message is never larger)."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"{what} must be at most {MAX_BODY_BYTES} bytes", code="InvalidRequestBody")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: crafted deep nesting
        payload = None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"{what} must be a JSON object", code="InvalidRequestBody")
    return payload


def correlation_id(given: str | None) -> str:
    """The caller's correlation id when it is a sane token, else a new one."""
    if given and _CORRELATION_ID.fullmatch(given):
        return given
    return str(uuid.uuid4())


def parse_idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return raw


def parse_http_cancel(
    action_id: str, body: bytes, correlation: str, idempotency_key: str | None, caller_scope: str
) -> CancelCommand:
    """Validate an HTTP cancel; raises InvalidRequest before anything is sent upstream."""
    action = parse_action_id(action_id)
    payload = parse_json_object(body)
    comment = parse_comment(payload)
    key = parse_idempotency_key(idempotency_key)
    scoped = http_key(caller_scope, key) if key else None
    verify = parse_flag(payload, "verify")
    return CancelCommand(
        action, comment, correlation, "http", idempotency_key=scoped, verify=verify, caller=caller_scope
    )


def parse_flag(payload: Mapping[str, Any], name: str) -> bool:
    """An optional boolean field (false when absent)."""
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false", code="InvalidRequestBody")
    return value


@dataclass(frozen=True)
class BulkRequest:
    machine_id: str  # Defender's machine id: 40 hex digits, lower case
    comment: str
    _: KW_ONLY
    types: tuple[str, ...] = ()
    dry_run: bool = False
    verify: bool = False

    def odata_filter(self) -> str:
        """The machine's actions that are not final, of the asked types."""
        status = " or ".join(f"status eq '{s}'" for s in OPEN_STATUSES)
        terms = [f"machineId eq '{self.machine_id}'", f"({status})"]
        if self.types:
            terms.append("(" + " or ".join(f"type eq '{t}'" for t in self.types) + ")")
        return " and ".join(terms)


def parse_machine_id(raw: object) -> str:
    if not isinstance(raw, str) or not MACHINE_ID.fullmatch(raw):
        raise InvalidRequest("The machine id must be Defender's machine id: 40 hexadecimal digits")
    return raw.lower()


def parse_bulk(
    machine_id: object, payload: Mapping[str, Any], extra_fields: frozenset[str] = frozenset()
) -> BulkRequest:
    """Validate a bulk cancel before any call; unknown fields are refused, not ignored."""
    unknown = sorted(set(payload) - BULK_FIELDS - extra_fields)
    if unknown:
        raise InvalidRequest(f"Unknown field(s): {', '.join(unknown)}", code="InvalidRequestBody")
    types = payload.get("types", [])
    if not isinstance(types, list) or not all(isinstance(t, str) and t in ACTION_TYPES for t in types):
        raise InvalidRequest(f"'types' must be a list of {', '.join(sorted(ACTION_TYPES))}", code="InvalidRequestBody")
    return BulkRequest(
        parse_machine_id(machine_id),
        parse_comment(payload),
        types=tuple(dict.fromkeys(types)),
        dry_run=parse_flag(payload, "dryRun"),
        verify=parse_flag(payload, "verify"),
    )
