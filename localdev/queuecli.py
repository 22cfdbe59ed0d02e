"""Put a cancel on the queue and read result messages, as a playbook or webhook would.

    python -m localdev.queuecli put ACTION_ID "comment" [--correlation-id ID]
    python -m localdev.queuecli results [--wait SECONDS]

Talks to the local Azurite (UseDevelopmentStorage=true) unless --connection-string or the
AzureWebJobsStorage variable says otherwise. Messages are base64, as the Functions host expects.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
import uuid

from localdev.queuehost import open_queue

QUEUE = "cancel-machine-action"
RESULTS = "cancel-machine-action-results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--connection-string", default=os.environ.get("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    )
    commands = parser.add_subparsers(dest="command", required=True)
    put = commands.add_parser("put", help="queue one cancel")
    put.add_argument("action_id")
    put.add_argument("comment")
    put.add_argument("--correlation-id", default=None)
    results = commands.add_parser("results", help="print (and remove) result messages")
    results.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the first one")
    args = parser.parse_args()
    if args.command == "put":
        message = {"machineActionId": args.action_id, "comment": args.comment,
                   "correlationId": args.correlation_id or str(uuid.uuid4())}  # fmt: skip
        open_queue(args.connection_string, QUEUE).send_message(base64.b64encode(json.dumps(message).encode()).decode())
        print(json.dumps(message))
        return
    queue = open_queue(args.connection_string, RESULTS)
    deadline = time.monotonic() + args.wait
    printed = 0
    while True:
        for received in queue.receive_messages(max_messages=32):
            print(base64.b64decode(received.content).decode())
            queue.delete_message(received)
            printed += 1
        if printed or time.monotonic() >= deadline:
            return
        time.sleep(0.5)


if __name__ == "__main__":
    main()
