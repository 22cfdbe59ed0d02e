"""The one translation of Azure Storage errors into the app's.

The three answers a caller decides on (the entity exists, is missing, or changed since it was read:
a failed If-Match, however the SDK reports it) pass through as azure-core raises them; everything
else (a timeout, a refused connection, a 5xx, an authorisation failure) means the state store cannot
be relied on now, and becomes StateStoreUnavailable: the app fails closed, with one Retry-After.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from shared.errors import StateStoreUnavailable

RETRY_AFTER_DOWN = 5  # seconds: what a caller is told to wait when a state store does not answer
DECIDED = (ResourceExistsError, ResourceNotFoundError, ResourceModifiedError)


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a storage call for `what` (e.g. "the idempotency records"): the DECIDED errors pass
    through, a 412 becomes ResourceModifiedError, any other AzureError StateStoreUnavailable."""
    try:
        yield
    except DECIDED:
        raise
    except AzureError as exc:
        if getattr(exc, "status_code", None) == 412:  # a retried conditional write can surface raw
            raise ResourceModifiedError(f"{what}: the precondition failed") from None
        raise unavailable(what, exc) from None


def unavailable(what: str, exc: BaseException) -> StateStoreUnavailable:
    return StateStoreUnavailable(
        f"{what[:1].upper()}{what[1:]} cannot be reached: {type(exc).__name__}", retry_after=RETRY_AFTER_DOWN
    )
