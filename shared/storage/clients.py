"""Table and queue clients for the app's storage, by connection string or managed identity."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from shared.config.settings import StorageConnection
from shared.storage.errors import translated

if TYPE_CHECKING:
    from azure.data.tables import TableClient
    from azure.storage.queue import QueueClient

# A state store that does not answer quickly is treated as down (fail closed), not waited on.
STORAGE_CONNECT_TIMEOUT = 3
STORAGE_READ_TIMEOUT = 5
STORAGE_RETRY_TOTAL = 2


def table_client(conn: StorageConnection, table_name: str) -> TableClient:
    """A client for `table_name`, created if it does not exist yet."""
    from azure.data.tables import TableClient

    client: TableClient = _open(TableClient, conn, conn.table_service_uri, table_name)
    _create(lambda: client.create_table(), "the state store")
    return client


@functools.cache
def queue_client(conn: StorageConnection, queue_name: str) -> QueueClient:
    """A client for `queue_name` that speaks base64, as the Functions host expects; created if absent.

    One per process and queue: a deferral is then one request, not two."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

    client: QueueClient = _open(
        QueueClient,
        conn,
        conn.queue_service_uri,
        queue_name,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )
    _create(lambda: client.create_queue(), "the queue service")
    return client


def _open(client_class: Any, conn: StorageConnection, service_uri: str | None, name: str, **options: Any) -> Any:
    """A table or queue client by connection string, or by managed identity on the service URI."""
    options.update(
        connection_timeout=STORAGE_CONNECT_TIMEOUT, read_timeout=STORAGE_READ_TIMEOUT, retry_total=STORAGE_RETRY_TOTAL
    )
    if conn.connection_string:
        return client_class.from_connection_string(conn.connection_string, name, **options)
    return client_class(str(service_uri), name, credential=storage_credential(conn.client_id), **options)


@functools.cache
def storage_credential(client_id: str | None) -> Any:
    """One managed identity credential (one token cache) for every storage client of an identity."""
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=client_id)


def _create(create: Callable[[], Any], what: str) -> None:
    from azure.core.exceptions import ResourceExistsError

    with contextlib.suppress(ResourceExistsError), translated(what):
        create()


T = TypeVar("T")


def recreating_table(table: TableClient, operation: Callable[[], T]) -> T:
    """Run `operation`; if the table itself is gone (a state store rebuilt empty), create it and
    run it once more. A missing *entity* is not this case and is raised as it is."""
    from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

    try:
        return operation()
    except ResourceNotFoundError as exc:
        if getattr(exc, "error_code", None) == "ResourceNotFound":
            raise
        with contextlib.suppress(ResourceExistsError):
            table.create_table()
        return operation()
