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


# The HE layer, fenced like pyca/cryptography's hazmat: TenSEAL lives in fedhe.he._seal, every
# program goes through fedhe.he, and the modules of fedhe.he import each other one way.

HE = REPO / "shared" / "fedhe" / "he"
RUNTIME_AND_TOOLS = [REPO / "shared", REPO / "services", REPO / "bench"]
# The benchmark's TenSEAL baseline (TenSEAL's usual CKKSVector set-up, measured against fedhe's codecs).
TENSEAL_BASELINE = {"bench/he_codecs.py"}
HE_PUBLIC_SURFACE = {
    "CKKS_FORMAT_ID",
    "DEFAULT_FORMAT_ID",
    "PACKED_FORMAT_ID",
    "BfvParameters",
    "CkksParameters",
    "Envelope",
    "EvaluationContext",
    "HeParameters",
    "KeyMaterial",
    "PackedBfvCodec",
    "PackingLayout",
    "PackingSettings",
    "SecretContext",
    "UpdateCodec",
    "check_packing",
    "codec_for",
    "create_key_material",
    "decode_envelope",
    "encode_envelope",
    "format_for",
    "load_evaluation_context",
    "load_secret_context",
    "parameters_from",
    "quantisation_report",
    "supported_formats",
}


def _python_files(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in root.rglob("*.py") if "__pycache__" not in path.parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (lazy and TYPE_CHECKING imports included);
    ``from package import name`` counts as both ``package`` and ``package.name``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO / "shared").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_private_he_module(module: str) -> bool:
    parts = module.split(".")
    return parts[:2] == ["fedhe", "he"] and any(part.startswith("_") for part in parts[2:])


def test_tenseal_is_imported_only_by_the_seal_internals() -> None:
    importers = {
        str(path.relative_to(REPO))
        for path in _python_files(*RUNTIME_AND_TOOLS)
        if any(name.split(".")[0] == "tenseal" for name in imported_modules(path))
    }
    assert importers, "the scan found no TenSEAL import at all"
    outside = {path for path in importers if not path.startswith("shared/fedhe/he/_seal/")} - TENSEAL_BASELINE
    assert outside == set()


def test_only_fedhe_he_imports_its_private_modules() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(name for name in imported_modules(path) if _is_private_he_module(name))
        for path in _python_files(*RUNTIME_AND_TOOLS)
        if not path.is_relative_to(HE)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_modules_of_fedhe_he_import_each_other_without_a_cycle() -> None:
    import graphlib

    modules = {_module_name(path): path for path in _python_files(HE)}
    assert {"fedhe.he", "fedhe.he.codec", "fedhe.he.registry", "fedhe.he._seal.io"} <= modules.keys()
    graph = {module: imported_modules(path) & modules.keys() - {module} for module, path in modules.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names the circle
    assert order[-1] == "fedhe.he"
    # The interface imports nothing else of the package; the registry is imported by the package only.
    assert graph["fedhe.he.codec"] == set()
    assert {module for module, imports in graph.items() if "fedhe.he.registry" in imports} == {"fedhe.he"}


def test_the_public_surface_of_fedhe_he_is_locked() -> None:
    import fedhe.he

    assert set(fedhe.he.__all__) == HE_PUBLIC_SURFACE
    assert len(fedhe.he.__all__) == len(HE_PUBLIC_SURFACE)
    assert all(hasattr(fedhe.he, name) for name in fedhe.he.__all__)
    modules = {name: str(getattr(getattr(fedhe.he, name), "__module__", "")) for name in fedhe.he.__all__}
    assert {name: module for name, module in modules.items() if module.startswith("tenseal")} == {}
