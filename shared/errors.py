"""The app's own error hierarchy and the upstream's error shape.

azure-core, azure-identity and requests errors are translated into these at the module boundary
that talks to them, so callers decide what a failure means without knowing the SDKs.
"""

from __future__ import annotations

import math
from typing import Any


def error_body(code: str, message: str, target: str | None = None) -> dict[str, Any]:
    """Defender's own error shape: `{"error": {"code", "message", "target"}}`."""
    error: dict[str, Any] = {"code": code, "message": message}
    if target:
        error["target"] = target
    return {"error": error}


class AppError(Exception):
    """An error with the HTTP status and upstream-style code a caller should see."""

    status = 500
    code = "InternalServerError"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.recorded = False  # its structured log record is written (shared.logs): not again


class SettingsError(AppError):
    """A setting is missing or invalid: the app refuses to run."""


class InvalidRequest(AppError):
    status = 400

    def __init__(self, message: str, *, code: str = "BadRequest") -> None:
        super().__init__(message)
        self.code = code


class KeyReused(InvalidRequest):
    """An idempotency key already used for another action: 422, as the IETF Idempotency-Key draft
    says for a key reused with a different request (draft-ietf-httpapi-idempotency-key-header)."""

    status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message, code="IdempotencyKeyReused")


class TokenUnavailable(AppError):
    status = 502
    code = "TokenUnavailable"


class UpstreamUnavailable(AppError):
    status = 502
    code = "BadGateway"


class UpstreamTimeout(AppError):
    status = 504
    code = "GatewayTimeout"


class StateStoreUnavailable(AppError):
    """The state tables cannot be reached: fail closed, no upstream call."""

    status = 503
    code = "ServiceUnavailable"


class QuotaExceeded(AppError):
    """The shared rate quota is used up for `wait_seconds` (`retry_after`: the same, rounded up)."""

    status = 429
    code = "TooManyRequests"

    def __init__(self, message: str, *, wait_seconds: float) -> None:
        super().__init__(message, retry_after=max(1, math.ceil(wait_seconds)))
        self.wait_seconds = wait_seconds


class RequestInProgress(AppError):
    """A request with the same idempotency key is still being handled."""

    status = 409
    code = "RequestInProgress"


class OutcomeUnknown(AppError):
    """A request left for Defender and its answer was lost (timeout, connection cut): Defender may
    have acted. Answered with the cause's status and code; never retried, never sent again for the
    same idempotency key."""

    def __init__(self, cause: AppError) -> None:
        super().__init__(cause.message, retry_after=cause.retry_after)
        self.status = cause.status
        self.code = cause.code
