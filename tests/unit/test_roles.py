"""Each role installs only what it runs: pyproject's extras, requirements/<role>.in and <role>.lock
agree, the aggregator's and keyserver's locks hold no TensorFlow, tensorflow-privacy or pydicom,
and each role's code imports (and builds its app) with every package outside its lock blocked.

The import checks run in a subprocess of the development environment (which holds every role's
packages, requirements/runtime.lock) with a ``sys.meta_path`` finder that refuses every top-level
module whose distribution is not in the role's lock: an import of TensorFlow by the aggregator,
even a lazy one on a path the role needs, fails here rather than in the image.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements"
ROLES = ("agent", "aggregator", "keyserver", "cli")
SERVER_FORBIDDEN = {"tensorflow", "tensorflow-privacy", "tensorflow-probability", "tensorflow-estimator", "pydicom"}
FORBIDDEN = {
    "aggregator": SERVER_FORBIDDEN | {"keras", "tensorboard", "scikit-learn", "pillow"},
    "keyserver": SERVER_FORBIDDEN | {"keras", "tensorboard", "scikit-learn", "pillow", "dp-accounting", "plotly"},
    "cli": SERVER_FORBIDDEN | {"keras", "tensorboard", "plotly", "uvicorn", "psycopg"},
    "agent": {"plotly", "uvicorn", "psycopg", "redis"},
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` requirements (extras dropped) by normalised name."""
    found = {}
    for line in lines:
        if match := PIN.match(line.strip()):
            found[normalise(match.group(1))] = match.group(3)
    return found


def in_file(name: str) -> tuple[dict[str, str], list[str]]:
    """A requirements/*.in file's own pins and the files it includes with ``-r``."""
    lines = (REQUIREMENTS / name).read_text(encoding="utf-8").splitlines()
    included = [line.split(maxsplit=1)[1] for line in lines if line.startswith("-r ")]
    return pins(lines), included


def lock(role: str) -> dict[str, str]:
    return pins((REQUIREMENTS / f"{role}.lock").read_text(encoding="utf-8").splitlines())


def project() -> dict[str, object]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data)


def test_common_in_is_the_projects_dependencies_and_build_backend() -> None:
    data = project()
    table = data["project"]
    assert isinstance(table, dict)
    build = data["build-system"]
    assert isinstance(build, dict)
    common, included = in_file("common.in")
    assert included == []
    assert common == pins([*table["dependencies"], *build["requires"]])


@pytest.mark.parametrize("role", ROLES)
def test_role_in_is_common_plus_the_roles_extra(role: str) -> None:
    table = project()["project"]
    assert isinstance(table, dict)
    own, included = in_file(f"{role}.in")
    assert included == ["common.in"]
    assert own == pins(table["optional-dependencies"][role])


def test_runtime_in_is_every_role_and_the_demo_extra_too() -> None:
    _, included = in_file("runtime.in")
    assert sorted(included) == sorted(f"{role}.in" for role in ROLES)
    table = project()["project"]
    assert isinstance(table, dict)
    assert table["optional-dependencies"]["demo"] == [f"fedhe[{','.join(ROLES)}]"]


@pytest.mark.parametrize("role", ROLES)
def test_role_lock_is_within_the_tested_runtime_lock(role: str) -> None:
    """Every role runs the versions the tests ran (runtime.lock, the development environment)."""
    runtime = lock("runtime")
    role_lock = lock(role)
    assert {name: runtime.get(name) for name in role_lock} == role_lock
    own, _ = in_file(f"{role}.in")
    common, _ = in_file("common.in")
    assert {**common, **own}.items() <= role_lock.items()
    text = (REQUIREMENTS / f"{role}.lock").read_text(encoding="utf-8")
    assert text.count("--hash=sha256:") >= len(role_lock)


@pytest.mark.parametrize("role", ROLES)
def test_role_lock_lists_no_forbidden_package(role: str) -> None:
    assert set(lock(role)) & FORBIDDEN[role] == set()


def test_runtime_lock_is_the_union_of_the_roles() -> None:
    union: dict[str, str] = {}
    for role in ROLES:
        union |= lock(role)
    assert union == lock("runtime")


# ---- imports with everything outside the role's lock blocked -----------------------------------

PROBE = """
import importlib.abc, sys
BLOCKED = frozenset({blocked})
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in this role's lock")
        return None
sys.meta_path.insert(0, Refuse())
"""

AGGREGATOR = """
import tempfile
import fedhe
from fastapi.testclient import TestClient
from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
import aggregator.commands
with tempfile.TemporaryDirectory() as tmp:
    settings = AggregatorSettings(
        database_url=f"sqlite:///{tmp}/aggregator.db", insecure_http=True, keyserver_url="http://127.0.0.1:9",
        keyserver_token="k" * 32, bootstrap_admin_token="a" * 32,
    )
    app = create_app(settings)
    assert app.title == "fedhe aggregator", app.title
    assert app.version == fedhe.__version__, app.version
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
"""

KEYSERVER = """
import tempfile
import fedhe
from fastapi.testclient import TestClient
from keyserver.app import create_app
from keyserver.settings import KeyserverSettings
import keyserver.commands
with tempfile.TemporaryDirectory() as tmp:
    settings = KeyserverSettings(
        database_url=f"sqlite:///{tmp}/keyserver.db", insecure_http=True, kek="A" * 43 + "=",
        bootstrap_admin_token="a" * 32, aggregator_token="g" * 32,
    )
    app = create_app(settings)
    assert app.title == "fedhe keyserver", app.title
    assert app.version == fedhe.__version__, app.version
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
"""

AGENT = """
import client_agent.agent, client_agent.commands, client_agent.data_check
"""

CLI = """
import contextlib, io, sys
from fedhe.cli.main import build_parser
for command in ({commands}):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
print("parsed")
"""

PROBES = {
    "aggregator": (AGGREGATOR, ("aggregator", "job", "site", "privacy")),
    "keyserver": (KEYSERVER, ("keyserver", "federation")),
    "agent": (AGENT, ("agent",)),
    "cli": ("", ("job", "site", "federation", "privacy", "devca")),
}


def blocked_for(role: str) -> set[str]:
    """Top-level modules of the development environment that no distribution in the role's lock provides."""
    allowed = set(lock(role)) | {"fedhe"}
    modules: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        modules.setdefault(module, set()).update(normalise(d) for d in distributions)
    return {module for module, distributions in modules.items() if not distributions & allowed}


@pytest.mark.parametrize("role", sorted(PROBES))
def test_role_runs_with_only_its_locked_packages(role: str, tmp_path: Path) -> None:
    blocked = blocked_for(role)
    if role in {"aggregator", "keyserver"}:
        assert {"tensorflow", "tensorflow_privacy", "tensorflow_probability", "pydicom", "keras"} <= blocked
    script, commands = PROBES[role]
    source = (
        PROBE.format(blocked=json.dumps(sorted(blocked)))
        + textwrap.dedent(script)
        + CLI.format(commands=", ".join(json.dumps(c) for c in commands) + ",")
    )
    result = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("parsed")


@pytest.mark.slow
def test_agent_trains_with_only_its_locked_packages(tmp_path: Path) -> None:
    """The agent's TensorFlow side (training, evaluation, export, the image readers) finds every
    package it imports in agent.lock (about 12 s: TensorFlow's import)."""
    script = """
import client_agent.evaluation, client_agent.export, client_agent.pretraining, client_agent.simulation
import client_agent.training
import PIL.Image, pydicom, sklearn.datasets, tensorflow_privacy
print("trained")
"""
    source = PROBE.format(blocked=json.dumps(sorted(blocked_for("agent")))) + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("trained")
