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


# The common package holds only what several roles share: agent-only code lives in client_agent,
# aggregator-only code in aggregator, the local cluster (the demo's, which the tests and the
# benchmarks start too) in the demo.

COMMON = PACKAGES["fedhe"]
MOVED_OUT = {
    "site_metrics.py": PACKAGES["aggregator"] / "site_metrics.py",
    "normalisation.py": PACKAGES["client_agent"] / "normalisation.py",
    "dp_randomness.py": PACKAGES["client_agent"] / "dp_randomness.py",
    "models.py": PACKAGES["client_agent"] / "models.py",
    "datasets": PACKAGES["client_agent"] / "datasets" / "__init__.py",
    "local_cluster.py": REPO / "services" / "demo" / "fedhe_demo" / "local_cluster.py",
}
# What only the agent installs (agent.lock): the common package imports none of it.
TENSORFLOW = {"tensorflow", "tensorflow_privacy", "tensorflow_probability", "keras"}
AGENT_ONLY_PACKAGES = TENSORFLOW | {"sklearn", "pydicom", "PIL"}


def _string_imports(path: Path) -> set[str]:
    """Module names given as literals to ``importlib.import_module`` or ``__import__``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_no_module_of_the_common_package_imports_a_service_anywhere_in_it() -> None:
    """Lazy imports, TYPE_CHECKING imports and ``importlib.import_module("...")`` included."""
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported_modules(path) | _string_imports(path) if name.split(".")[0] in SERVICES
        )
        for path in _python_files(COMMON)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_single_role_modules_live_in_their_role() -> None:
    assert sorted(name for name in MOVED_OUT if (COMMON / name).exists()) == []
    assert sorted(str(home.relative_to(REPO)) for home in MOVED_OUT.values() if not home.is_file()) == []
    # The data contract ModelSpec uses stays shared; the readers that apply it are the agent's.
    assert (COMMON / "data_schema.py").is_file()


def test_the_common_package_imports_nothing_only_the_agent_installs() -> None:
    """No TensorFlow (nor Keras, scikit-learn, pydicom, Pillow) anywhere under shared/fedhe, lazily either."""
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported_modules(path) | _string_imports(path) if name.split(".")[0] in AGENT_ONLY_PACKAGES
        )
        for path in _python_files(COMMON)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_runtime_module_imports_test_support() -> None:
    runtime = _python_files(REPO / "shared", REPO / "services")
    assert len(runtime) > 100, "the scan found too few modules"
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name for name in imported_modules(path) | _string_imports(path) if name.split(".")[0] in {"tests", "bench"}
        )
        for path in runtime
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_job_create_finds_the_agents_model_tools_through_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedhe job create`` fingerprints Keras models and reads --initial-weights with the agent's
    ``client_agent.models``, found through the ``fedhe.model_tools`` entry point; without it, it
    says which extra to install."""
    from fedhe.cli import model_tools
    from fedhe.errors import InvalidRequest

    found = model_tools.entry_points(group=model_tools.MODEL_TOOLS_GROUP, name=model_tools.MODEL_TOOLS_NAME)
    assert [entry.value for entry in found] == ["client_agent.models"]
    tools = model_tools.model_tools("fingerprinting")
    assert all(callable(getattr(tools, name)) for name in ("fingerprint", "weights_from_file", "weights_sha256"))

    monkeypatch.setattr(model_tools, "entry_points", lambda **_: [])
    with pytest.raises(InvalidRequest, match=r"--initial-weights builds the model with TensorFlow.*fedhe\[agent\]"):
        model_tools.model_tools("--initial-weights")
