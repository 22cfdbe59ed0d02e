"""Idempotency keys, built in one place: scoped by trigger, caller and tenant, so one trigger's or
caller's keys never meet another's.

An HTTP key is scoped by its caller; a bulk action's by its caller, key and action; a queue
message's by (correlation id, action id) -- one ticket may name many actions -- or, without a
correlation id, by the queue message's own id. A customer tenant's keys are scoped by the tenant as
well: one caller's key in two tenants is two cancels. The home tenant's keys keep the unscoped form,
so an upgrade replays what it stored.
"""

from __future__ import annotations


def http_key(caller_scope: str, key: str) -> str:
    return f"http|{caller_scope}|{key}"


def bulk_key(caller_scope: str, key: str, action_id: str) -> str:
    """One action of a bulk cancel sent with an Idempotency-Key: a repeat replays it."""
    return f"bulk|{caller_scope}|{key}|{action_id}"


def queue_key(correlation: str | None, action_id: str, message_id: str | None) -> str | None:
    if correlation:
        return f"queue|correlation|{correlation}|{action_id}"
    return f"queue|message|{message_id}" if message_id else None


def in_tenant(key: str, tenant_id: str, home: bool) -> str:
    """`key` as stored for a request in tenant `tenant_id`."""
    return key if home else f"tenant|{tenant_id}|{key}"
