"""The layout rules of CONTRACT.md and STYLE.md that a reader relies on."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_shared_never_imports_azure_functions() -> None:
    offenders = [
        p.name
        for p in (ROOT / "shared").glob("*.py")
        if re.search(r"^\s*(import|from) azure\.functions", p.read_text(), re.M)
    ]
    assert offenders == []


def test_http_route_has_no_guid_constraint_and_function_auth() -> None:
    binding = json.loads((ROOT / "CancelMachineAction/function.json").read_text())["bindings"][0]

    assert binding["route"] == "machineactions/{actionId}/cancel"
    assert binding["authLevel"] == "function" and binding["methods"] == ["post"]


def test_host_json_follows_the_contract() -> None:
    host = json.loads((ROOT / "host.json").read_text())

    assert host["extensionBundle"]["version"] == "[4.*, 5.0.0)"
    assert host["extensions"]["http"]["routePrefix"] == "api"
    assert host["extensions"]["queues"]["messageEncoding"] == "base64"


def test_host_json_keeps_every_invocation_in_the_monitor_tab() -> None:
    """Host.Results feeds the `requests` table and the portal's Monitor tab, at Information level
    only: a stricter level hides successful runs (MicrosoftDocs azure-docs, configure-monitoring.md)."""
    levels = json.loads((ROOT / "host.json").read_text())["logging"]["logLevel"]

    for category in ("Host.Results", "Host", "default"):
        assert levels.get(category, "Information") in ("Information", "Debug", "Trace"), category


def test_runtime_requirements_are_pinned_and_have_no_dev_tools() -> None:
    lines = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    names = {ln.split("==")[0] for ln in lines}

    assert all("==" in ln for ln in lines)
    assert {"azure-functions", "azure-identity", "requests", "azure-data-tables", "azure-storage-queue"} <= names
    assert not names & {"pytest", "mypy", "ruff", "hypothesis"}


def test_make_run_calls_the_script_the_e2e_tests_drive() -> None:
    makefile = (ROOT / "Makefile").read_text()

    assert "-m localdev.stack" in makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]


def test_every_function_folder_is_thin() -> None:
    for folder in ROOT.glob("*/function.json"):
        code = (folder.parent / "__init__.py").read_text()
        assert len(code.splitlines()) <= 30, folder.parent.name
        assert "from shared import" in code
