"""Queue trigger: a cancel from `cancel-machine-action`, its result to `cancel-machine-action-results`."""

import azure.functions as func

from shared.app import get_settings
from shared.faces import queue_api

get_settings()  # a bad setting stops the function from loading; the host logs which one, at start


def main(msg: func.QueueMessage, result: func.Out[str]) -> None:
    message = queue_api.handle(msg.get_body(), msg.dequeue_count or 1, msg.id)
    if message is not None:
        result.set(message.to_json())
