"""Queue trigger: a cancel from `cancel-machine-action`, its result to `cancel-machine-action-results`."""

import json

import azure.functions as func

from shared import queue_api


def main(msg: func.QueueMessage, result: func.Out[str]) -> None:
    message = queue_api.handle(msg.get_body(), msg.dequeue_count or 1)
    if message is not None:
        result.set(json.dumps(message))
