"""`make run`: the whole app on one machine, no Azure account needed.

Starts, in the foreground: Azurite, the Defender simulator (seeded with open machine actions whose
ids it prints, in the home tenant and in two customer tenants), the loopback managed identity
endpoint, a loopback Entra token endpoint (TLS, its CA made at start) where a multi-tenant app
registration trusts the identity and is consented in both customers, and the app on
http://localhost:7071,
served by `func start` when Functions Core Tools is installed, else by localdev.funchost. The app
settings come from local.settings.json (or local.settings.sample.json), pointed at this stack.
Ctrl-C (or SIGTERM) stops everything.

    python -m localdev.stack [--port 7071] [--defender-port 7080] [--identity-port 7081]
                             [--entra-port 7082] [--azurite-ports 10000,10001,10002] [--seed 6]
                             [--local-host]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from localdev.entra import EntraEndpoint, FederatedCredential
from localdev.identity import ISSUER_HOST, IdentityEndpoint, object_id

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KEY = "local-function-key"
# The local directories: the app's user-assigned identity lives in the home tenant, as does the
# multi-tenant app registration it is the federated credential of; two customers consented to it.
LOCAL_IDENTITY = "5b1f0e2a-9c47-4d0e-8f6a-2c3d4e5f6a7b"
LOCAL_TENANT_APP = "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a"
LOCAL_MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"  # a machine with actions pending, for the bulk cancel
MACHINE_ACTIONS = (
    ("Pending", "Isolate"),
    ("InProgress", "RunAntiVirusScan"),
    ("Pending", "CollectInvestigationPackage"),
    ("Succeeded", "Isolate"),
)
LOCAL_TENANTS = {"contoso": "1c7e2a4b-3d5f-4a6b-8c9d-0e1f2a3b4c5d", "fabrikam": "9e8d7c6b-5a4f-4e3d-9c1b-0a9f8e7d6c5b"}


def federate(entra: EntraEndpoint, identity: IdentityEndpoint, tenants: dict[str, str]) -> dict[str, str]:
    """What an MSSP's admin does once, and each customer's admin once: the app registration trusts
    the identity (issuer, subject = its object id, audience), and each customer consents to it.
    Returns the app settings that use it."""
    issuer = f"{ISSUER_HOST}/{identity.home_tenant}/v2.0"
    entra.register(LOCAL_TENANT_APP, FederatedCredential(issuer, object_id(LOCAL_IDENTITY)))
    for tenant_id in tenants.values():
        entra.add_tenant(tenant_id)
        entra.consent(LOCAL_TENANT_APP, tenant_id)
    return {
        "TENANTS": ",".join(f"{name}={tenant_id}" for name, tenant_id in tenants.items()),
        "TENANT_APP_CLIENT_ID": LOCAL_TENANT_APP,
        "AZURE_CLIENT_ID": LOCAL_IDENTITY,
        "HOME_TENANT_ID": identity.home_tenant,
        "AZURE_AUTHORITY_HOST": entra.authority,
        "REQUESTS_CA_BUNDLE": entra.ca_path,  # trust the local CA; verification stays on
    }


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
    parser.add_argument("--entra-port", type=int, default=7082)
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
        self.entra = EntraEndpoint(args.entra_port, token_secret=tokens.DEFAULT_SECRET)
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
            **federate(self.entra, self.identity, LOCAL_TENANTS),
            "AzureWebJobsStorage": self.azurite.connection_string,
            "DEFENDER_API_BASE_URL": self.defender.base_url,
            "FUNCTIONS_WORKER_RUNTIME": "python",
        }

    def start(self) -> dict[str, Any]:
        self.azurite.start()
        self.identity.start()
        self.entra.start()
        self.defender.start()
        actions = self.defender.seed(self.args.seed)
        tenant_actions = {}
        for name, tenant_id in LOCAL_TENANTS.items():
            self.defender.add_tenant(tenant_id)
            tenant_actions[name] = self.defender.seed(2, random.Random(name), tenant_id)
        on_machine = [
            self.defender.add_action(status, kind, machine_id=LOCAL_MACHINE) for status, kind in MACHINE_ACTIONS
        ]
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
            "entra": self.entra.authority,
            "tenants": LOCAL_TENANTS,
            "tenantActions": tenant_actions,
            "machine": {"id": LOCAL_MACHINE, "actions": on_machine},
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
        self.entra.stop()
        self.identity.stop()
        self.azurite.stop()


def banner(info: dict[str, Any]) -> str:
    app, key, first = info["app"], info["functionKey"], info["actions"][0] if info["actions"] else "<id>"
    lines = [
        f"Cancel Machine Action is running at {app} (served by {info['host']})",
        f"  Defender simulator {info['defender']}  identity endpoint {info['identity']}  Entra {info['entra']}",
        "  open machine actions (home tenant): " + ", ".join(info["actions"]),
        *(f"  open machine actions in {name}: " + ", ".join(ids) for name, ids in info["tenantActions"].items()),
        "",
        f"  curl -s -X POST '{app}/api/machineactions/{first}/cancel' -H 'x-functions-key: {key}' \\",
        "       -H 'Content-Type: application/json' -d '{\"Comment\": \"false positive\"}'",
    ]
    for name, ids in info["tenantActions"].items():
        lines += [
            f"  curl -s -X POST '{app}/api/tenants/{name}/machineactions/{ids[0]}/cancel' \\",
            f"       -H 'x-functions-key: {key}' -H 'Content-Type: application/json' \\",
            '       -d \'{"Comment": "false positive"}\'',
        ]
    lines += [
        f"  curl -s -X POST '{app}/api/machines/{info['machine']['id']}/cancelPendingActions' \\",
        f"       -H 'x-functions-key: {key}' -H 'Content-Type: application/json' \\",
        '       -d \'{"Comment": "machine reimaged", "dryRun": true}\'',
        f"  curl -s '{app}/api/quota?code={key}'",
        f"  curl -s '{app}/api/tenants/contoso/quota?code={key}'",
    ]
    return "\n".join([*lines, "", "Ctrl-C stops everything."])


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
