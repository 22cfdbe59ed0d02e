"""The simulator's read side, as Defender documents it: list with OData $filter, $top and paging by
@odata.nextLink, get, a quota per API, the read role, and actions that end on their own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from localdev import tokens
from localdev.defender import DefenderSimulator
from tests.support.rig import TOKEN_SECRET

MACHINE = "7b1f4967d9728e5aa3c06a9e617a22a4a5a17378"
PENDING = "machineId eq '7b1f4967d9728e5aa3c06a9e617a22a4a5a17378' and (status eq 'Pending' or status eq 'InProgress')"


@pytest.fixture
def reads() -> Iterator[DefenderSimulator]:
    sim = DefenderSimulator(windows=((1000, 60.0),), token_secret=TOKEN_SECRET, page_size=50,
                            api_windows={"list": ((3, 60.0),)}).start()  # fmt: skip
    yield sim
    sim.stop()


def bearer(roles: list[str] | None = None) -> dict[str, str]:
    extra: dict[str, Any] = {"tid": "8a0f4c1e-6f0b-4c8e-9d51-3f3c0e6a9b10", "appid": "app"}
    if roles is not None:
        extra["roles"] = roles
    token, _ = tokens.mint(TOKEN_SECRET, "https://api.securitycenter.microsoft.com", "sp", 600, **extra)
    return {"Authorization": f"Bearer {token}"}


def test_a_filtered_list_pages_by_next_link_and_finds_exactly_the_pending_actions(reads: DefenderSimulator) -> None:
    pending = {reads.add_action(("Pending", "InProgress")[i % 2], machine_id=MACHINE) for i in range(120)}
    for status in ("Succeeded", "Cancelled", "Failed"):
        reads.add_action(status, machine_id=MACHINE)
    reads.add_action("Pending")  # another machine

    url: str | None = f"{reads.base_url}/api/machineactions"
    params: dict[str, str] | None = {"$filter": PENDING}
    seen: list[str] = []
    pages = 0
    while url:
        page = requests.get(url, params=params, headers=bearer(), timeout=10).json()
        seen += [a["id"] for a in page["value"]]
        url, params, pages = page.get("@odata.nextLink"), None, pages + 1

    assert sorted(seen) == sorted(pending) and pages == 3


def test_top_type_filter_and_bad_filters(reads: DefenderSimulator) -> None:
    for action_type in ("Isolate", "RunAntiVirusScan", "Isolate"):
        reads.add_action("Pending", action_type, machine_id=MACHINE)
    url = f"{reads.base_url}/api/machineactions"

    isolates = requests.get(url, params={"$filter": f"machineId eq '{MACHINE}' and type eq 'Isolate'"},
                            headers=bearer(), timeout=10).json()  # fmt: skip
    top = requests.get(url, params={"$top": "1"}, headers=bearer(), timeout=10).json()
    bad = requests.get(url, params={"$filter": "contains(type, 'x')"}, headers=bearer(), timeout=10)

    assert [a["type"] for a in isolates["value"]] == ["Isolate", "Isolate"]
    assert len(top["value"]) == 1 and "@odata.nextLink" not in top
    assert bad.status_code == 400 and reads.calls("", api="list")[-1].status == 400


def test_each_api_has_its_own_windows_and_reads_need_the_read_role(reads: DefenderSimulator) -> None:
    action = reads.add_action()
    url = f"{reads.base_url}/api/machineactions"

    lists = [requests.get(url, headers=bearer(), timeout=10).status_code for _ in range(4)]
    get = requests.get(f"{url}/{action}", headers=bearer(), timeout=10)
    denied = requests.get(f"{url}/{action}", headers=bearer(["Machine.Isolate"]), timeout=10)

    assert lists == [200, 200, 200, 429]  # the list quota (3 here) is not the get quota
    assert get.status_code == 200 and get.json()["id"] == action
    assert denied.status_code == 403 and "Machine.Read.All" in denied.json()["error"]["message"]


def test_an_action_ends_on_its_own_unless_a_cancel_took_effect_first(reads: DefenderSimulator) -> None:
    finished = reads.add_action("InProgress", finish_after=0.0)
    raced = reads.add_action("Pending", finish_after=3600)
    url = f"{reads.base_url}/api/machineactions"

    late = requests.post(f"{url}/{finished}/cancel", json={"Comment": "c"}, headers=bearer(), timeout=10)
    early = requests.post(f"{url}/{raced}/cancel", json={"Comment": "c"}, headers=bearer(), timeout=10)

    assert late.status_code == 400 and reads.status_of(finished) == "Succeeded"
    assert early.status_code == 200 and reads.status_of(raced) == "Cancelled"
