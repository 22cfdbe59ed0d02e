"""The layout rules of CONTRACT.md and STYLE.md that a reader relies on."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_shared_never_imports_azure_functions() -> None:
    offenders = [
        p.name
        for p in (ROOT / "shared").rglob("*.py")
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
        assert "from shared.faces import" in code


# --- the layers of shared/ -----------------------------------------------------------------------
# Top to bottom; a module may import its own layer and the ones below it, never one above. Each
# entry is a module or a package (all its modules).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("faces", ("shared.faces",)),
    ("composition", ("shared.app",)),
    ("cancel", ("shared.cancel",)),
    ("ports", ("shared.defender.client", "shared.ratelimit.limiter")),
    (
        "adapters",
        (
            "shared.storage",
            "shared.ratelimit.table",
            "shared.ratelimit.memory",
            "shared.idempotency.table",
            "shared.defender.transport",
            "shared.defender.token",
        ),
    ),
    (
        "rules",
        ("shared.ratelimit.rule", "shared.idempotency.record", "shared.idempotency.keys", "shared.defender.retry"),
    ),
    ("config", ("shared.config",)),
    ("base", ("shared.errors", "shared.logs", "shared.redaction", "shared.formats", "shared.outcomes", "shared")),
)
# The SDKs each have one home: Azure's in the storage adapters (and azure-identity's in the token
# module), requests/urllib3 in the Defender transport.
SDK_HOMES: dict[str, tuple[str, ...]] = {
    "azure": ("shared.storage", "shared.ratelimit.table", "shared.idempotency.table", "shared.defender.token"),
    "requests": ("shared.defender.transport",),
    "urllib3": ("shared.defender.transport",),
}


def _modules(root: Path) -> dict[str, Path]:
    """shared's modules by dotted name (a package by its own name)."""
    found = {}
    for path in (root / "shared").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """Every module `path` imports, at any depth (lazy imports in functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from shared.faces import http_api` imports a module
                name = f"{node.module}.{alias.name}"
                found.append((node.lineno, name if name in modules else node.module))
    return found


def _in(module: str, owners: tuple[str, ...]) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


def _layer(module: str) -> int:
    """The index of the layer that owns `module` (the most specific entry wins)."""
    best = max(
        ((len(owner), rank) for rank, (_, owners) in enumerate(LAYERS) for owner in owners if _in(module, (owner,))),
        default=None,
    )
    assert best is not None, f"{module} is in no layer of tests/unit/test_layout.py: give it one"
    return best[1]


def layering_violations(root: Path = ROOT) -> list[str]:
    modules = _modules(root)
    problems = []
    for module, path in sorted(modules.items()):
        for line, imported in _imports(path, modules):
            where = f"{path.relative_to(root)}:{line}"
            top = imported.split(".")[0]
            if top in SDK_HOMES and not _in(module, SDK_HOMES[top]):
                problems.append(f"{where}: {imported} outside {', '.join(SDK_HOMES[top])}")
            if top == "shared" and _layer(imported) < _layer(module):
                upper, lower = LAYERS[_layer(imported)][0], LAYERS[_layer(module)][0]
                problems.append(f"{where}: {module} ({lower}) imports {imported} ({upper}), a layer above it")
    return problems


def test_shared_imports_only_downward_and_each_sdk_stays_in_its_adapter() -> None:
    assert layering_violations() == []


@pytest.mark.parametrize(
    ("module", "planted", "expected"),
    [
        ("storage/audit.py", "from shared.cancel import service", "(adapters) imports shared.cancel.service (cancel)"),
        ("ratelimit/rule.py", "import shared.ratelimit.table", "(rules) imports shared.ratelimit.table (adapters)"),
        ("cancel/bulk.py", "import azure.core.exceptions", "azure.core.exceptions outside shared.storage"),
        ("faces/http_api.py", "import requests", "requests outside shared.defender.transport"),
    ],
)
def test_the_layout_check_catches_a_planted_violation(tmp_path: Path, module: str, planted: str, expected: str) -> None:
    copy = tmp_path / "shared"
    shutil.copytree(ROOT / "shared", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef planted() -> None:\n    {planted}\n")

    problems = layering_violations(tmp_path)

    assert len(problems) == 1 and expected in problems[0], problems


def test_function_folders_call_only_the_faces_and_the_composition_root() -> None:
    modules = _modules(ROOT)
    for folder in ROOT.glob("*/function.json"):
        imported = [name for _, name in _imports(folder.parent / "__init__.py", modules) if name.startswith("shared")]
        assert imported and all(_in(name, ("shared.faces", "shared.app")) for name in imported), folder.parent.name
