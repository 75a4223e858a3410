"""The arrows point one way: the common package never imports a service or a tool built on them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = {"keyserver", "aggregator", "client_agent", "fedhe_demo"}
PACKAGES = {
    "fedhe": REPO / "shared" / "fedhe",
    "keyserver": REPO / "services" / "keyserver" / "keyserver",
    "aggregator": REPO / "services" / "aggregator" / "aggregator",
    "client_agent": REPO / "services" / "client-agent" / "client_agent",
}


def imported_packages(root: Path) -> dict[str, set[str]]:
    """Top-level package of every import in every module under ``root``, by module path."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_common_package_imports_no_service() -> None:
    offenders = {
        path: names & SERVICES for path, names in imported_packages(PACKAGES["fedhe"]).items() if names & SERVICES
    }
    assert offenders == {}


@pytest.mark.parametrize("service", ["keyserver", "aggregator", "client_agent"])
def test_services_do_not_import_each_other(service: str) -> None:
    others = SERVICES - {service}
    offenders = {path: names & others for path, names in imported_packages(PACKAGES[service]).items() if names & others}
    assert offenders == {}
