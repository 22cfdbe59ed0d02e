"""Cancel everything pending on a machine (POST /api/machines/{id}/cancelPendingActions), and
verify: against the simulator's list with paging, its quota per API, and actions that race a cancel."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest

from localdev.defender import DefenderSimulator
from localdev.windows import earliest, violations
from tests.support.rig import TOKEN_SECRET, body_of, call, http_cancel

MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
# Defender's 100 per window, the window compressed from 60 s to 24 s: the 120th cancel waits for
# the 20th's window to pass, so what the batch adds to the least time is the margin and the time
# the first 20 sends take (one Table write each, ~5 ms here), as beside Defender's real minute.
CANCEL_WINDOWS = ((100, 24.0),)
LIST_WINDOWS = ((10, 24.0),)


@pytest.fixture
def sim() -> Iterator[DefenderSimulator]:
    """Pages of 50, and the quota of each API compressed in time."""
    simulator = DefenderSimulator(windows=CANCEL_WINDOWS, token_secret=TOKEN_SECRET, page_size=50,
                                  api_windows={"list": LIST_WINDOWS, "get": ((1000, 60.0),)}).start()  # fmt: skip
    yield simulator
    simulator.stop()


@pytest.fixture
def quotas(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATE_LIMITS", "100/24")
    monkeypatch.setenv("LIST_RATE_LIMITS", "10/24")
    monkeypatch.setenv("GET_RATE_LIMITS", "1000/60")
    monkeypatch.setenv("RATE_LIMIT_SAFETY_MS", "100")
    monkeypatch.setenv("VERIFY_SECONDS", "5")


def cancel_pending(machine_id: str, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return call("CancelPendingActions", json.dumps(body).encode(), headers, machineId=machine_id)


def seed(sim: DefenderSimulator, pending: int) -> tuple[set[str], set[str]]:
    open_ids = {sim.add_action(("Pending", "InProgress")[i % 2], machine_id=MACHINE) for i in range(pending)}
    final_ids = {sim.add_action(s, machine_id=MACHINE) for s in ("Succeeded", "Cancelled", "Failed", "TimeOut")}
    sim.add_action("Pending")  # another machine's
    return open_ids, final_ids


def test_dry_run_lists_exactly_the_pending_actions_across_pages_and_cancels_nothing(
    quotas: None, sim: DefenderSimulator
) -> None:
    pending, _ = seed(sim, 120)

    response = cancel_pending(MACHINE, {"Comment": "look first", "dryRun": True})

    body = body_of(response)
    assert response.status_code == 200 and body["found"] == 120 and body["dryRun"] is True
    assert {a["id"] for a in body["actions"]} == pending and {a["outcome"] for a in body["actions"]} == {"listed"}
    assert len(sim.calls("", api="list")) == 3 and sim.calls(api="cancel") == []


def test_120_pending_are_each_cancelled_once_inside_both_quotas_in_the_least_time(
    quotas: None, sim: DefenderSimulator
) -> None:
    pending, final = seed(sim, 120)

    response = cancel_pending(MACHINE, {"Comment": "machine reimaged"})

    body = body_of(response)
    assert response.status_code == 200
    assert (body["found"], body["cancelled"], body["alreadyFinal"], body["failed"]) == (120, 120, 0, 0)
    cancels = sim.calls(api="cancel")
    per_action = Counter(c.path.split("/")[-2] for c in cancels)
    assert set(per_action) == pending and set(per_action.values()) == {1}  # each once, no final one
    assert not final & set(per_action)
    lists = sim.calls("", api="list")
    assert (
        violations([c.at for c in cancels], CANCEL_WINDOWS) == 0
        and violations([c.at for c in lists], LIST_WINDOWS) == 0
    )
    assert all(c.status != 429 for c in cancels + lists)
    took = cancels[-1].at - lists[0].at
    least = earliest(120, CANCEL_WINDOWS)
    assert least <= took <= 1.02 * least, (took, least)


def test_bad_bulk_requests_are_refused_before_any_call(quotas: None, sim: DefenderSimulator) -> None:
    refused = [
        cancel_pending("not-a-machine", {"Comment": "x"}),
        cancel_pending(MACHINE, {"Comment": "x", "types": ["Teleport"]}),
        cancel_pending(MACHINE, {"Comment": "x", "dryrun": True}),  # unknown field (a typo)
        cancel_pending(MACHINE, {"Comment": "x", "verify": "yes"}),
        cancel_pending(MACHINE, {"types": ["Isolate"]}),
    ]

    assert [r.status_code for r in refused] == [400] * 5
    assert "dryrun" in body_of(refused[2])["error"]["message"]
    assert sim.calls("") == []


def test_types_narrow_the_list(quotas: None, sim: DefenderSimulator) -> None:
    scan = sim.add_action("Pending", "RunAntiVirusScan", machine_id=MACHINE)
    sim.add_action("Pending", "Isolate", machine_id=MACHINE)

    body = body_of(cancel_pending(MACHINE, {"Comment": "x", "types": ["RunAntiVirusScan"]}))

    assert [(a["id"], a["outcome"]) for a in body["actions"]] == [(scan, "cancelled")]


def test_a_list_refused_for_a_missing_role_names_the_role(quotas: None, sim: DefenderSimulator) -> None:
    from localdev.defender import Fault

    sim.inject(Fault("status", status=403))
    response = cancel_pending(MACHINE, {"Comment": "x"})

    assert response.status_code == 403 and "Machine.Read.All" in body_of(response)["error"]["message"]
    assert sim.calls(api="cancel") == []


def test_verify_reports_what_defender_ended_with(quotas: None, sim: DefenderSimulator) -> None:
    won_race = sim.add_action("InProgress", finish_after=0.0)  # finished before the cancel reached it
    cancelled = sim.add_action("Pending")
    sim.cancel_takes = 1.2  # an accepted cancel shows as Cancelled a little later
    slow = sim.add_action("Pending")

    answers = {a: http_cancel(a, {"Comment": "check", "verify": True}) for a in (won_race, cancelled, slow)}

    assert {a: (r.status_code, r.headers.get("x-verified-status")) for a, r in answers.items()} == {
        won_race: (400, "Succeeded"),
        cancelled: (200, "Cancelled"),
        slow: (200, "Cancelled"),
    }
    assert len(sim.calls(f"/{slow}", api="get")) >= 2  # it read again until the action was final


@pytest.mark.parametrize(
    "link",
    ["https://evil.example/api/machineactions?$skip=50", "http://127.0.0.1:1/api/machineactions?$skip=50",
     "{base}/api/machines?$skip=50", "{base}.evil.example/api/machineactions?$skip=50"],
)  # fmt: skip
def test_a_next_page_link_off_the_api_root_is_never_followed(sim: DefenderSimulator, link: str) -> None:
    from shared.defender.client import DefenderClient
    from shared.errors import UpstreamUnavailable

    class NoToken:
        def token(self) -> str:
            raise AssertionError("a token was asked for a link that must not be followed")

    client = DefenderClient(sim.base_url, NoToken(), 5)  # type: ignore[arg-type]

    with pytest.raises(UpstreamUnavailable, match="outside the Defender API root"):
        client.list_page(link.format(base=sim.base_url))
    assert sim.calls("") == []
