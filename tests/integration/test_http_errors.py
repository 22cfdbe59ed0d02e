"""Every HTTP function answers an unexpected failure itself: a 500 in Defender's error shape with the
request's correlation id, and one log record that says so, never an exception for the host."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from bench.logs import worker_logging
from localdev.defender import DefenderSimulator
from shared.cancel import bulk
from shared.ratelimit.limiter import RateLimiter
from shared.storage.jobs import JobStore
from tests.support.rig import GUID, body_of, call

MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
JOB = "0123456789abcdef0123456789abcdef"
COMMENT = json.dumps({"Comment": "boom"}).encode()


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("an internal fault with a detail that must not reach the caller")


# (function folder, route parameters, body, the internal call that fails)
ROUTES = [
    ("CancelMachineAction", {"actionId": GUID}, COMMENT, (RateLimiter, "acquire")),
    ("CancelTenantMachineAction", {"tenant": "home", "actionId": GUID}, COMMENT, (RateLimiter, "acquire")),
    ("CancelPendingActions", {"machineId": MACHINE}, COMMENT, (bulk, "list_pending")),
    ("CancelTenantPendingActions", {"tenant": "home", "machineId": MACHINE}, COMMENT, (bulk, "list_pending")),
    ("GetPendingActionsJob", {"machineId": MACHINE, "jobId": JOB}, b"", (JobStore, "state")),
    ("GetTenantPendingActionsJob", {"tenant": "home", "machineId": MACHINE, "jobId": JOB}, b"", (JobStore, "state")),
    ("GetQuota", {}, b"", (RateLimiter, "stats")),
    ("GetTenantQuota", {"tenant": "home"}, b"", (RateLimiter, "stats")),
]


@pytest.mark.parametrize(("folder", "route", "body", "target"), ROUTES, ids=[r[0] for r in ROUTES])
def test_an_unexpected_exception_is_a_500_in_the_error_shape_with_the_correlation_id_and_one_record(
    app_env: dict[str, str],
    sim: DefenderSimulator,
    monkeypatch: pytest.MonkeyPatch,
    folder: str,
    route: dict[str, str],
    body: bytes,
    target: tuple[Any, str],
) -> None:
    monkeypatch.setattr(*target, boom)

    with worker_logging() as recorder:
        response = call(folder, body, {"x-correlation-id": "INC-500"}, **route)

    assert response.status_code == 500
    assert body_of(response) == {
        "error": {"code": "InternalServerError", "message": "Unexpected error", "target": "INC-500"}
    }
    assert response.headers["x-correlation-id"] == "INC-500"
    errors = [r for r in recorder.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["unexpected failure, correlation INC-500"]
    assert errors[0].exc_info is not None  # the traceback goes to the log, not to the caller
    assert sim.calls() == []
