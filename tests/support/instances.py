"""App instances as separate processes (`bench.hammer`), each calling the HTTP function in a loop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def start_instances(
    env: dict[str, str],
    count: int,
    start: float,
    until: float,
    strategy: str = "shared",
    skew_ms: float = 0.0,
    tenant: str | None = None,
) -> list[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "bench.hammer", "--start-at", str(start), "--until", str(until),
               "--strategy", strategy, "--clock-skew-ms", str(skew_ms)]  # fmt: skip
    if tenant:
        command += ["--tenant", tenant]
    return [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    """Each instance's report: the statuses it got and its admission times."""
    results = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run_instances(
    env: dict[str, str], count: int, start: float, until: float, strategy: str = "shared", skew_ms: float = 0.0
) -> list[dict[str, Any]]:
    return finish(start_instances(env, count, start, until, strategy, skew_ms), timeout=until - time.time() + 60)
