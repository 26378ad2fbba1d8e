"""The import-linter contracts (``.importlinter``) see the packages under ``src/``; the
``flows/`` folder is mapped into the package by the build, so its layer rule is checked
here: flows sit above ``migration`` and ``operations`` and below the CLI and console."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from source_trees import parse_tree

FLOWS = Path(__file__).resolve().parents[2] / "flows"
# What a flow may import of the library: the layers below it (docs/adr/0008-layers.md).
ALLOWED = (
    "migration",
    "operations",
    "keys",
    "storage",
    "search",
    "state",
    "clients",
    "retry",
    "domain",
    "config",
    "errors",
    "flows",
)
FORBIDDEN = ("cli", "demo", "api")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(parse_tree(FLOWS)[path]):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [m for m in found if m == "archive_kms" or m.startswith("archive_kms.")]


@pytest.mark.parametrize("path", sorted(FLOWS.glob("*.py")), ids=lambda p: p.name)
def test_flows_import_only_the_layers_below_them(path: Path) -> None:
    for module in _imports(path):
        part = module.split(".")[1] if "." in module else ""
        assert part not in FORBIDDEN, f"{path.name} imports {module}: flows never import the CLI, demo or console"
        assert part in ALLOWED, f"{path.name} imports {module}: not a layer below flows (docs/adr/0008-layers.md)"


def test_the_check_sees_the_flows() -> None:
    assert any(_imports(p) for p in FLOWS.glob("*.py")), "no flow imports archive_kms: the check would prove nothing"
