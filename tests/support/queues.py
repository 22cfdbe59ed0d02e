"""Queue helpers for the tests: the app's three queues on Azurite, and draining a host until results come."""

from __future__ import annotations

import base64
import json
from typing import Any

from localdev.queuehost import QueueFunction, open_queue
from shared.faces import queue_api

QUEUES = (queue_api.QUEUE, queue_api.RESULTS_QUEUE, queue_api.QUEUE + "-poison")


class Queues:
    def __init__(self, conn: str) -> None:
        self.clients = {name: open_queue(conn, name) for name in QUEUES}
        for client in self.clients.values():
            client.clear_messages()

    def put(self, message: Any) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.clients[queue_api.QUEUE].send_message(base64.b64encode(text.encode()).decode())

    def take(self, name: str) -> list[str]:
        client = self.clients[name]
        out = []
        for message in client.receive_messages(max_messages=32, messages_per_page=32):
            out.append(base64.b64decode(message.content).decode())
            client.delete_message(message)
        return out

    def count(self, name: str) -> int:
        return int(self.clients[name].get_queue_properties().approximate_message_count or 0)


def run_until_results(host: QueueFunction, queues: Queues, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        got.extend(json.loads(r) for r in queues.take(queue_api.RESULTS_QUEUE))
        return len(got) >= count

    assert host.drain(enough, timeout), f"only {len(got)} of {count} results"
    return got


def read_all(client: Any) -> list[dict[str, Any]]:
    """Every message on a queue (base64 JSON), taken off it."""
    found = []
    while batch := list(client.receive_messages(max_messages=32)):
        for received in batch:
            found.append(json.loads(base64.b64decode(received.content)))
            client.delete_message(received)
    return found
