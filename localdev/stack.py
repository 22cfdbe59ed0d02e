"""`make run`: the whole app on one machine, no Azure account needed.

Starts, in the foreground: Azurite, the Defender simulator (seeded with open machine actions whose
ids it prints), the loopback managed identity endpoint, and the app on http://localhost:7071,
served by `func start` when Functions Core Tools is installed, else by localdev.funchost. The app
settings come from local.settings.json (or local.settings.sample.json), pointed at this stack.
Ctrl-C (or SIGTERM) stops everything.

    python -m localdev.stack [--port 7071] [--defender-port 7080] [--identity-port 7081]
                             [--azurite-ports 10000,10001,10002] [--seed 6] [--local-host]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from localdev import tokens
from localdev.azurite import STANDARD_PORTS, Azurite
from localdev.defender import DefenderSimulator, parse_windows
from localdev.identity import IdentityEndpoint

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KEY = "local-function-key"


def local_settings() -> dict[str, str]:
    for name in ("local.settings.json", "local.settings.sample.json"):
        path = REPO / name
        if path.exists():
            values: dict[str, Any] = json.loads(path.read_text()).get("Values", {})
            return {k: str(v) for k, v in values.items()}
    return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the app and its local stack")
    parser.add_argument("--port", type=int, default=7071, help="the app (Functions host) port")
    parser.add_argument("--defender-port", type=int, default=7080)
    parser.add_argument("--identity-port", type=int, default=7081)
    parser.add_argument("--azurite-ports", default=",".join(map(str, STANDARD_PORTS)), help="blob,queue,table")
    parser.add_argument("--seed", type=int, default=6, help="open machine actions to create")
    parser.add_argument("--windows", default="100/60,1500/3600", help="the simulator's rate windows")
    parser.add_argument("--local-host", action="store_true", help="use localdev.funchost even if func exists")
    return parser.parse_args(argv)


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        ports = tuple(int(p) for p in args.azurite_ports.split(","))
        self.azurite = Azurite((ports[0], ports[1], ports[2]))
        self.identity = IdentityEndpoint(args.identity_port, token_secret=tokens.DEFAULT_SECRET)
        self.defender = DefenderSimulator(
            args.defender_port, parse_windows(args.windows), token_secret=tokens.DEFAULT_SECRET
        )
        self.settings = local_settings()
        self.key = self.settings.get("LOCAL_FUNCTION_KEY") or DEFAULT_KEY
        self._func: subprocess.Popen[bytes] | None = None
        self._host: Any = None

    def app_env(self) -> dict[str, str]:
        return {
            **self.settings,
            **self.identity.env(),
            "AzureWebJobsStorage": self.azurite.connection_string,
            "DEFENDER_API_BASE_URL": self.defender.base_url,
            "FUNCTIONS_WORKER_RUNTIME": "python",
        }

    def start(self) -> dict[str, Any]:
        self.azurite.start()
        self.identity.start()
        self.defender.start()
        actions = self.defender.seed(self.args.seed)
        env = self.app_env()
        func = None if self.args.local_host else shutil.which("func")
        if func:
            self._func = subprocess.Popen(
                [func, "start", "--port", str(self.args.port)], cwd=REPO, env={**os.environ, **env}
            )
        else:
            os.environ.update(env)
            from localdev.funchost import FunctionHost

            self._host = FunctionHost(REPO, self.azurite.connection_string, {self.key}, self.args.port).start()
        return {
            "app": f"http://localhost:{self.args.port}",
            "host": "func start" if func else "localdev.funchost",
            "functionKey": self.key,
            "defender": self.defender.base_url,
            "identity": self.identity.endpoint,
            "storage": self.azurite.connection_string.split("AccountKey=")[0] + "...",
            "actions": actions,
            "pids": {"stack": os.getpid(), "azurite": self.azurite.pid},
        }

    def stop(self) -> None:
        if self._func is not None and self._func.poll() is None:
            self._func.terminate()
            self._func.wait(20)
        if self._host is not None:
            self._host.stop()
        self.defender.stop()
        self.identity.stop()
        self.azurite.stop()


def banner(info: dict[str, Any]) -> str:
    app, key, first = info["app"], info["functionKey"], info["actions"][0] if info["actions"] else "<id>"
    lines = [
        f"Cancel Machine Action is running at {app} (served by {info['host']})",
        f"  Defender simulator {info['defender']}  identity endpoint {info['identity']}",
        "  open machine actions: " + ", ".join(info["actions"]),
        "",
        f"  curl -s -X POST '{app}/api/machineactions/{first}/cancel' -H 'x-functions-key: {key}' \\",
        "       -H 'Content-Type: application/json' -d '{\"Comment\": \"false positive\"}'",
        f"  curl -s '{app}/api/quota?code={key}'",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    stack = Stack(parse_args(argv))
    done = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        info = stack.start()
        print(banner(info), flush=True)
        print("STACK " + json.dumps(info), flush=True)  # one line for scripts and tests
        while not done.wait(1.0):
            if stack._func is not None and stack._func.poll() is not None:
                break
    finally:
        stack.stop()
        print("stopped", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
