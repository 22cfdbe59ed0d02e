"""Write the OpenAPI document for the Logic Apps custom connector with the deployed app's host.

`openapi.json` names a placeholder host; the connector wizard needs the real one. azd runs this
after `azd provision` (azure.yaml's postprovision hook), when the environment's outputs are set as
environment variables; run it by hand with the app's URL as the argument:

    python3 infra/connector_openapi.py [https://<app>.azurewebsites.net] [--out openapi.deployed.json]

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app_url", nargs="?", default=os.environ.get("FUNCTION_APP_URL", ""))
    parser.add_argument("--out", type=Path, default=ROOT / "openapi.deployed.json")
    args = parser.parse_args()
    if not args.app_url:
        print("error: give the app's URL, or set FUNCTION_APP_URL (azd sets it after provisioning)", file=sys.stderr)
        return 2
    spec = json.loads((ROOT / "openapi.json").read_text())
    try:
        result = deployed_spec(spec, args.app_url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} for {result['host']}: import it as a Logic Apps custom connector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
