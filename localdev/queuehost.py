"""Queue triggers run the way the Functions host runs them, for tests and `make run`.

Reads a function folder's function.json and host.json's `extensions.queues`, then polls the trigger
queue in Azurite: each message is decoded (base64), handed to `main()` as an
`azure.functions.QueueMessage` with its dequeue count, and the output bindings' values are sent to
their queues. On success the message is deleted; on an exception it becomes visible again after
`visibilityTimeout`, and once it has been dequeued `maxDequeueCount` times it moves to
`<queue>-poison`, as the host does. Messages run in parallel threads (as the Python worker runs
sync functions), and `pump()` fetches another batch whenever no more than `newBatchThreshold`
are still running. Not emulated: blob-based leases and scale-out, and the host's exponential
polling back-off (polling here is at a fixed short interval).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import azure.functions as func
import azure.functions.queue as azqueue
from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue import QueueClient, QueueMessage, TextBase64EncodePolicy

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class Out(func.Out[T], Generic[T]):
    """The value a function sets on an output binding."""

    def __init__(self) -> None:
        self._value: T | None = None

    def set(self, val: T) -> None:
        self._value = val

    def get(self) -> T:
        return self._value  # type: ignore[return-value]  # None until set, as the host's Out


def open_queue(connection_string: str, name: str, base64_encode: bool = False) -> QueueClient:
    """A client for queue `name`, which is created if absent. Received content comes back raw."""
    policy = TextBase64EncodePolicy() if base64_encode else None
    client = QueueClient.from_connection_string(connection_string, name, message_encode_policy=policy)
    with contextlib.suppress(ResourceExistsError):
        client.create_queue()
    return client


def timespan_seconds(value: str) -> float:
    """host.json's "hh:mm:ss" timespans."""
    match = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", value)
    if not match:
        raise ValueError(f"not a timespan: {value!r}")
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class QueueFunction:
    def __init__(
        self,
        folder: Path,
        connection_string: str,
        host_json: Path = REPO / "host.json",
        visibility_timeout: float | None = None,
        lease_seconds: int = 30,
    ) -> None:
        bindings = json.loads((folder / "function.json").read_text())["bindings"]
        trigger = next(b for b in bindings if b["type"] == "queueTrigger")
        self.trigger_name = trigger["name"]
        self.queue_name = trigger["queueName"]
        self.outputs = {b["name"]: b["queueName"] for b in bindings if b["type"] == "queue" and b["direction"] == "out"}
        queues = json.loads(host_json.read_text()).get("extensions", {}).get("queues", {})
        self.max_dequeue_count = int(queues.get("maxDequeueCount", 5))
        self.batch_size = int(queues.get("batchSize", 16))
        self.new_batch_threshold = int(queues.get("newBatchThreshold", self.batch_size // 2))
        self.visibility_timeout = (
            visibility_timeout
            if visibility_timeout is not None
            else timespan_seconds(queues.get("visibilityTimeout", "00:00:00"))
        )
        self.base64 = queues.get("messageEncoding", "base64") == "base64"
        if str(folder.parent) not in sys.path:  # function folders import as top-level packages
            sys.path.insert(0, str(folder.parent))
        self._main: Callable[..., Any] = importlib.import_module(folder.name).main
        self._conn = connection_string
        self._lease = lease_seconds  # how long a received message stays invisible while it runs
        self._clients: dict[str, QueueClient] = {}
        self.invocations = 0
        # The host runs a batch's messages in parallel (the Python worker's thread pool).
        workers = self.batch_size + self.new_batch_threshold  # the host's ceiling per instance
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"queue-{self.queue_name}")
        self._count_lock = threading.Lock()
        self.in_flight = 0

    def client(self, name: str) -> QueueClient:
        if name not in self._clients:
            self._clients[name] = open_queue(self._conn, name, self.base64)
        return self._clients[name]

    def _receive(self) -> list[QueueMessage]:
        return list(
            self.client(self.queue_name).receive_messages(
                messages_per_page=self.batch_size, max_messages=self.batch_size, visibility_timeout=self._lease
            )
        )

    def poll_once(self) -> int:
        """Receive up to a batch, run its messages concurrently and wait for them; how many ran."""
        received = self._receive()
        list(self._pool.map(self.run, received))
        return len(received)

    def pump(self) -> int:
        """The host's steady state: when no more than newBatchThreshold messages are still running,
        fetch another batch and start it without waiting; how many were started."""
        with self._count_lock:
            if self.in_flight > self.new_batch_threshold:
                return 0
        received = self._receive()
        with self._count_lock:
            self.in_flight += len(received)
        for message in received:
            self._pool.submit(self._run_counted, message)
        return len(received)

    def _run_counted(self, message: QueueMessage) -> None:
        try:
            self.run(message)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def close(self) -> None:
        """Wait for the messages still running, then stop the threads."""
        self._pool.shutdown(wait=True)

    def run(self, message: QueueMessage) -> None:
        with self._count_lock:
            self.invocations += 1
        outputs: dict[str, Out[str]] = {name: Out() for name in self.outputs}
        try:
            body = self._decode(message.content)
            trigger = azqueue.QueueMessage(  # type: ignore[no-untyped-call]
                id=message.id, body=body, dequeue_count=message.dequeue_count,
                                        pop_receipt=message.pop_receipt)  # fmt: skip
            with self._renewing(message):
                self._main(**{self.trigger_name: trigger}, **outputs)
        except Exception as exc:  # noqa: BLE001 - the host's rule: any failure is retried, then poisoned
            logger.warning("%s failed on message %s (dequeue %s): %r", self.queue_name, message.id,
                           message.dequeue_count, exc)  # fmt: skip
            self._failed(message)
            return
        for name, out in outputs.items():
            value = out.get()
            if value is not None:
                self.client(self.outputs[name]).send_message(value)
        self.client(self.queue_name).delete_message(message)

    @contextlib.contextmanager
    def _renewing(self, message: QueueMessage) -> Iterator[None]:
        """While the function runs, keep its message invisible, as Azure's host does: the lease is
        renewed at half its length (the new pop receipt kept on the message), so a run longer than
        the lease is never handed to another worker while it is still going."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self._lease / 2):
                try:
                    receipt = self.client(self.queue_name).update_message(
                        message.id, message.pop_receipt, visibility_timeout=self._lease
                    )
                    message.pop_receipt = receipt.pop_receipt
                except AzureError as exc:  # the message is gone or changed: nothing left to renew
                    logger.warning("could not renew message %s: %s", message.id, type(exc).__name__)
                    return

        renewer = threading.Thread(target=renew, name="renew-" + str(message.id), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()

    def _decode(self, content: str) -> bytes:
        if not self.base64:
            return content.encode()
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the message is not valid base64 (host.json says messageEncoding base64)") from None

    def _failed(self, message: QueueMessage) -> None:
        source = self.client(self.queue_name)
        if message.dequeue_count is not None and message.dequeue_count >= self.max_dequeue_count:
            poison = open_queue(self._conn, self.queue_name + "-poison")
            poison.send_message(message.content)  # as it came: already encoded
            source.delete_message(message)
            return
        # By id, not the message object: given the object, the SDK re-sends (and re-encodes) its content.
        source.update_message(message.id, message.pop_receipt, visibility_timeout=int(self.visibility_timeout))

    def drain(self, until: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
        """Poll until `until()` holds or `timeout` passes; whether it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll_once() == 0:
                if until():
                    return True
                time.sleep(interval)
        return until()


def run_until_empty(
    function: QueueFunction, until: float, idle_polls: int = 5, busy: Callable[[], bool] = lambda: False
) -> None:
    """Pump until `until`, or until nothing runs and the trigger queue has held no message (visible
    or deferred) for `idle_polls` polls in a row while `busy()` is false."""
    trigger = function.client(function.queue_name)
    idle = 0
    while time.time() < until and (busy() or idle < idle_polls):
        if function.pump():
            idle = 0
            continue
        waiting = function.in_flight or trigger.get_queue_properties().approximate_message_count
        idle = 0 if waiting else idle + 1
        time.sleep(0.05 if waiting else 0.1)
    function.close()


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description="Run a queue-triggered function folder as the host would")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--until", type=float, required=True, help="epoch seconds to stop at the latest")
    parser.add_argument("--visibility-timeout", type=float, default=None)
    parser.add_argument("--lease", type=int, default=30, help="seconds a received message stays invisible")
    parser.add_argument("--log-level", default="WARNING", help="the app's records at this level and above go to stderr")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    conn = os.environ["AzureWebJobsStorage"]
    function = QueueFunction(
        args.folder.resolve(), conn, visibility_timeout=args.visibility_timeout, lease_seconds=args.lease
    )
    run_until_empty(function, args.until)
    print(json.dumps({"invocations": function.invocations}), flush=True)


if __name__ == "__main__":
    main()
