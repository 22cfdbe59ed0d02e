"""What the function adds to one cancel, and what importing it costs.

Starts Azurite, the identity endpoint and the Defender simulator on free loopback ports, then
times N cancels through `CancelMachineAction.main` (token from the real azure-identity credential,
audit write to Azurite) against N direct `requests` calls to the same simulator, interleaved.
Then times a cold `import CancelMachineAction` in fresh interpreters against importing the SDKs it
loads at import time. Prints the figures and writes bench/results/overhead.json.

    python -m bench.overhead [--calls 300] [--imports 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EAGER_SDKS = "import azure.functions, requests, urllib3, azure.core.exceptions"
ALL_SDKS = EAGER_SDKS + ", azure.identity, azure.data.tables"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values), "p95_ms": percentile(values, 0.95), "n": len(values)}


def time_cancels(calls: int) -> dict[str, Any]:
    import azure.functions as func

    from localdev.azurite import Azurite
    from localdev.defender import DefenderSimulator
    from localdev.identity import IdentityEndpoint
    from shared.app import get_app

    azurite = Azurite().start()
    identity = IdentityEndpoint().start()
    sim = DefenderSimulator(windows=((10**9, 60.0),)).start()
    try:
        os.environ.update(
            {
                "AzureWebJobsStorage": azurite.connection_string,
                "DEFENDER_API_BASE_URL": sim.base_url,
                "RATE_LIMITS": "8000/60",  # the limiter does its full work per call, but never makes one wait
                **identity.env(),
            }
        )
        from CancelMachineAction import main

        def through_function(action_id: str) -> int:
            request = func.HttpRequest(
                "POST", f"/api/machineactions/{action_id}/cancel", route_params={"actionId": action_id},
                headers={}, body=b'{"Comment": "bench"}',
            )  # fmt: skip
            return int(main(request).status_code)

        token = get_app().home.defender._tokens.token()  # warm: token cached, table created
        direct = requests.Session()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def direct_call(action_id: str) -> int:
            url = f"{sim.base_url}/api/machineactions/{action_id}/cancel"
            return direct.post(url, data=b'{"Comment": "bench"}', headers=headers, timeout=10).status_code

        first_start = time.perf_counter()
        assert through_function(sim.add_action()) == 200
        first_ms = (time.perf_counter() - first_start) * 1000
        fn_ms: list[float] = []
        direct_ms: list[float] = []
        for _ in range(calls):
            for target, sink in ((through_function, fn_ms), (direct_call, direct_ms)):
                action_id = sim.add_action()
                start = time.perf_counter()
                assert target(action_id) == 200
                sink.append((time.perf_counter() - start) * 1000)
        fn, dc = summary(fn_ms), summary(direct_ms)
        return {
            "function": fn,
            "direct": dc,
            "added_median_ms": fn["median_ms"] - dc["median_ms"],
            "added_p95_ms": fn["p95_ms"] - dc["p95_ms"],
            "first_call_after_warmup_ms": first_ms,
            "identity_requests": len(identity.requests),
        }
    finally:
        sim.stop()
        identity.stop()
        azurite.stop()


def import_ms(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print((time.perf_counter() - t) * 1000)"
    env = {**os.environ, "AzureWebJobsStorage": "UseDevelopmentStorage=true"}  # the folder checks settings on import
    out = subprocess.run([sys.executable, "-X", "frozen_modules=on", "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=env)  # fmt: skip
    return float(out.stdout.strip())


def time_imports(repeats: int) -> dict[str, Any]:
    ours, eager, full = [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits all three alike
        ours.append(import_ms("import CancelMachineAction"))
        eager.append(import_ms(EAGER_SDKS))
        full.append(import_ms(ALL_SDKS))
    return {
        "cancel_machine_action_ms": statistics.median(ours),
        "eager_sdks_ms": statistics.median(eager),
        "all_sdks_ms": statistics.median(full),
        "own_code_overhead_ms": statistics.median(ours) - statistics.median(eager),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--imports", type=int, default=7)
    args = parser.parse_args()
    cancels = time_cancels(args.calls)
    imports = time_imports(args.imports)
    result = {"cancel": cancels, "import": imports, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=2))
    f, d = cancels["function"], cancels["direct"]
    print(f"cancel through the function: median {f['median_ms']:.2f} ms, p95 {f['p95_ms']:.2f} ms (n={f['n']})")
    print(f"direct requests call:        median {d['median_ms']:.2f} ms, p95 {d['p95_ms']:.2f} ms")
    print(f"added by the function:       median {cancels['added_median_ms']:.2f} ms (target < 10), "
          f"p95 {cancels['added_p95_ms']:.2f} ms; identity requests: {cancels['identity_requests']}")  # fmt: skip
    print(f"cold import CancelMachineAction {imports['cancel_machine_action_ms']:.1f} ms; its eager SDKs alone "
          f"{imports['eager_sdks_ms']:.1f} ms; all SDKs {imports['all_sdks_ms']:.1f} ms")  # fmt: skip
    print(f"import overhead of our own code: {imports['own_code_overhead_ms']:.1f} ms (target < 50)")
    print(f"written to {RESULTS / 'overhead.json'}")


if __name__ == "__main__":
    main()
