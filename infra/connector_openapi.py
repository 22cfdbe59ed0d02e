"""Write the OpenAPI document for the Logic Apps custom connector with the deployed app's host.

`openapi.json` names a placeholder host; the connector wizard needs the real one. azd runs this
after `azd provision` (azure.yaml's postprovision hook), when the environment's outputs are set as
environment variables; run it by hand with the app's URL as the argument:

    python3 infra/connector_openapi.py [https://<app>.azurewebsites.net] [--out openapi.deployed.json]
                                       [--entra <AUTH_CLIENT_ID>]

With App Service Authentication in front (azd's AUTH_CLIENT_ID, or --entra), every caller needs an
Entra token as well as the function key: the document then declares OAuth 2.0 (Microsoft Entra ID)
as the connector's security, and the key as a header every operation sends.

Standard library only, so it runs wherever azd does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


def deployed_spec(spec: dict[str, Any], app_url: str) -> dict[str, Any]:
    url = urlsplit(app_url if "://" in app_url else f"https://{app_url}")
    if url.scheme != "https" or not url.hostname or url.path not in ("", "/"):
        raise ValueError(f"expected the app's https URL with no path, got {app_url!r}")
    return {**spec, "host": url.netloc, "schemes": ["https"]}


FUNCTION_KEY_HEADER = {
    "name": "x-functions-key",
    "in": "header",
    "required": True,
    "type": "string",
    "x-ms-summary": "Function key",
    "x-ms-visibility": "important",
    "description": "A function key of the app: still required behind App Service Authentication",
}


def entra_spec(spec: dict[str, Any], login: str) -> dict[str, Any]:
    """The document for Entra mode: OAuth 2.0 as the connection's security, the key a header."""
    oauth = {"type": "oauth2", "flow": "accessCode", "authorizationUrl": f"{login}/common/oauth2/authorize",
             "tokenUrl": f"{login}/common/oauth2/token", "scopes": {}}  # fmt: skip
    paths = {
        path: {
            method: {**op, "parameters": [*op.get("parameters", []), FUNCTION_KEY_HEADER]} for method, op in ops.items()
        }
        for path, ops in spec["paths"].items()
    }
    return {**spec, "securityDefinitions": {"entra": oauth}, "security": [{"entra": []}], "paths": paths}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app_url", nargs="?", default=os.environ.get("FUNCTION_APP_URL", ""))
    parser.add_argument("--out", type=Path, default=ROOT / "openapi.deployed.json")
    parser.add_argument(
        "--entra", default=os.environ.get("AUTH_CLIENT_ID", ""), help="App Service Authentication's client id"
    )
    parser.add_argument("--login", default="https://login.microsoftonline.com", help="Entra sign-in host of your cloud")
    args = parser.parse_args()
    if not args.app_url:
        print("error: give the app's URL, or set FUNCTION_APP_URL (azd sets it after provisioning)", file=sys.stderr)
        return 2
    spec = json.loads((ROOT / "openapi.json").read_text())
    try:
        result = deployed_spec(spec, args.app_url)
        if args.entra:
            result = entra_spec(result, args.login.rstrip("/"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    mode = "Entra ID OAuth 2.0 and the function key" if args.entra else "the function key"
    print(f"wrote {args.out} for {result['host']} ({mode}): import it as a Logic Apps custom connector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
