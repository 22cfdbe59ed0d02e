"""A small mutation run over the promises: each mutant is one textual change to the code, run
against the tests that should see it; a mutant is killed when those tests fail. Not part of
`make test` (it runs the chosen tests once per mutant, a few minutes in all).

    python -m bench.mutants            # every mutant, in a scratch copy of the checkout
    python -m bench.mutants 3 7        # only these (by number)

Writes bench/results/mutants.json. The checkout itself is never modified: each mutant is applied to
a copy made with `git worktree` (the working tree's changes included), then removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
P = "tests/integration/test_bulk_promises.py"
SIM = "tests/unit/test_simulation.py"
IDEM = "tests/integration/test_idempotency.py"
DECIDE = "tests/unit/test_idempotency_decide.py"
HTTP = "tests/integration/test_http_errors.py"
LAYOUT = "tests/unit/test_layout.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    # the five the review found surviving
    Mutant("complete() unconditional", "shared/idempotency/table.py",
           "                    entity, mode=UpdateMode.REPLACE, etag=claim.etag, match_condition=MatchConditions.IfNotModified\n                )\n                return",
           "                    entity, mode=UpdateMode.REPLACE\n                )\n                return", (IDEM,)),
    Mutant("release() unconditional", "shared/idempotency/table.py",
           "self.partition(claim.key), ROW_KEY, etag=claim.etag, match_condition=MatchConditions.IfNotModified",
           "self.partition(claim.key), ROW_KEY", (IDEM,)),
    Mutant("bulk lists on the cancel quota", "shared/defender/client.py",
           "reply = self._send(Api.LIST, url, None, max_wait)", "reply = self._send(Api.CANCEL, url, None, max_wait)",
           (P,)),
    Mutant("on_time() always true", "shared/ratelimit/limiter.py",
           "return self._clock() <= permit.slot + self.slip_ms", "return True", (SIM,)),
    Mutant("bulk cancels 120 s past their deadline", "shared/cancel/bulk.py",
           "max_wait=max(0.0, cancel_until - monotonic())", "max_wait=max(0.0, cancel_until + 120 - monotonic())", (P,)),
    # the limiter
    Mutant("Retry-After hold ignored when placing a slot", "shared/ratelimit/rule.py",
           "slot = max(not_before, blocked_until, log[-1] if log else not_before)",
           "slot = max(not_before, log[-1] if log else not_before)", (SIM,)),
    Mutant("late write not given up", "shared/ratelimit/limiter.py",
           "            if written > slot + self.slip_ms:", "            if False:", (SIM,)),
    Mutant("a Defender 429 on list/get holds nobody", "shared/defender/client.py",
           "if status == 429 and gate is not None:", "if status == 429 and gate is not None and payload is not None:",
           (P,)),
    Mutant("Retry-After not capped", "shared/defender/retry.py",
           "return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(seconds)))", "return max(1, math.ceil(seconds))", (P,)),
    Mutant("verify reads take the whole get window", "shared/cancel/service.py",
           "VERIFY_READ_SHARE = 0.8", "VERIFY_READ_SHARE = 1.0", (P,)),
    # idempotency
    Mutant("fence counted from after the claim", "shared/cancel/service.py",
           "        fence = self._monotonic() + self._answers.lease_seconds - self._budget\n        held = self._answers.claim(key, command.action_id)",
           "        held = self._answers.claim(key, command.action_id)\n        fence = self._monotonic() + self._answers.lease_seconds - self._budget",
           (SIM,)),
    Mutant("lease judged on the taker's clock", "shared/idempotency/table.py",
           "age=self._age(entity, date),", 'age=self._clock() - float(entity.get("ClaimedAt", 0)),',
           (IDEM, SIM)),
    Mutant("a read-back of the wrong shape taken as proof", "shared/defender/client.py",
           "            if problem:\n                raise InvalidUpstreamResponse(f\"Defender's read of",
           "            if False:\n                raise InvalidUpstreamResponse(f\"Defender's read of", (P,)),
    Mutant("a key not handed back after a failed read", "shared/cancel/service.py",
           "        except AppError:  # no slot, no token, no answer, a body of the wrong shape: nothing known yet\n            answers.abandon(held)",
           "        except AppError:  # no slot, no token, no answer, a body of the wrong shape: nothing known yet\n            pass",
           (P,)),
    Mutant("a handed-back key taken as a fresh one", "shared/idempotency/record.py",
           "if record is None or record.state is None:", "if record is None or record.state in (None, State.ABANDONED):",
           (DECIDE, IDEM, P)),
    Mutant("a live claim taken over", "shared/idempotency/record.py",
           "if record.state is State.IN_FLIGHT and (record.age is None or record.age < lease):",
           "if record.state is State.IN_FLIGHT and record.age is not None and record.age < lease:", (DECIDE, SIM)),
    # bulk
    Mutant("job key without the machine", "shared/storage/jobs.py",
           'return "|".join((tenant_id, job_id, machine_id, "+".join(sorted(types)) or "all"))',
           'return "|".join((tenant_id, job_id, "0" * 40, "+".join(sorted(types)) or "all"))', (P,)),
    Mutant("summary parts as large as the whole", "shared/faces/bulk_queue.py",
           "MAX_PART_BYTES = 45_000", "MAX_PART_BYTES = 450_000", (P,)),
    Mutant("no listing after the first", "shared/cancel/bulk.py", "MAX_LISTINGS = 4", "MAX_LISTINGS = 1", (P,)),
    Mutant("a child's job not checked", "shared/faces/queue_api.py",
           "return job is not None and job.tenant_id == tenant_id and message.action_id in job.action_ids",
           "return True", (P,)),
    Mutant("a list page's shape not checked", "shared/defender/client.py",
           '    """What makes `body` not a page of MachineActions, or None."""\n',
           '    """What makes `body` not a page of MachineActions, or None."""\n    return None\n', (P,)),
    Mutant("a large HTTP batch answered inline", "shared/faces/http_api.py",
           "if time.monotonic() + eta + settings.timeout_seconds > cancel_until:",
           "if time.monotonic() + eta + settings.timeout_seconds > cancel_until + 1e9:", (P,)),
    # verify and the local host
    Mutant("the queue host never renews a running message", "localdev/queuehost.py",
           "            with self._renewing(message):", "            with contextlib.nullcontext():", (P,)),
    # the structure
    Mutant("an HTTP route's unexpected exception escapes", "shared/faces/http_api.py",
           "    except Exception:\n        logger.exception", "    except ZeroDivisionError:\n        logger.exception", (HTTP,)),
    Mutant("a decided storage answer taken for a store that is down", "shared/storage/errors.py",
           "    except DECIDED:\n        raise\n", "", (IDEM,)),
)  # fmt: skip


def run(mutant: Mutant, tree: Path) -> tuple[bool, float]:
    target = tree / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: its text is not found once in {mutant.path}")
    target.write_text(original.replace(mutant.old, mutant.new))
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:logging", "--timeout", "120", *mutant.tests],
            cwd=tree,
            capture_output=True,
            text=True,
            env={**os.environ, "CI": "true"},
            timeout=900,
        )
        killed = done.returncode != 0
    except subprocess.TimeoutExpired:
        killed = True
    finally:
        target.write_text(original)
    return killed, time.monotonic() - started


def main() -> None:
    chosen = {int(a) for a in sys.argv[1:]}
    scratch = Path(tempfile.mkdtemp(prefix="mutants-"))
    tree = scratch / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree)], cwd=ROOT, check=True, capture_output=True)
    try:
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        if diff:
            subprocess.run(["git", "apply"], cwd=tree, input=diff, check=True)
        (tree / "tools" / "node_modules").symlink_to(ROOT / "tools" / "node_modules")
        rows: list[dict[str, object]] = []
        for number, mutant in enumerate(MUTANTS, 1):
            if chosen and number not in chosen:
                continue
            dead, seconds = run(mutant, tree)
            rows.append({"number": number, "mutant": mutant.name, "killed": dead, "seconds": round(seconds, 1)})
            print(f"{number:2d} {'killed  ' if dead else 'SURVIVED'} {seconds:6.1f} s  {mutant.name}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    score = sum(1 for r in rows if r["killed"])
    print(f"mutation score: {score}/{len(rows)} = {100 * score / max(1, len(rows)):.0f} %")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutants.json").write_text(json.dumps({"killed": score, "total": len(rows), "mutants": rows}, indent=2))


if __name__ == "__main__":
    main()
