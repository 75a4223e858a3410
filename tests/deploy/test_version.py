"""One version source: ``[project] version`` in pyproject.toml.

Everything else derives it (``fedhe.__version__`` from the installed distribution's metadata, the
services' OpenAPI version from that, the images' label from ``make images``' VERSION build
argument) or, where Helm needs a literal (``appVersion``, the default image tag), is checked
against it here. No other tracked file may spell the version out.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import fedhe

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "fedhe"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
# Files where Helm or a reader needs the version written out; each mention is checked below.
LITERAL_FILES = {
    "pyproject.toml",
    "deploy/helm/fedhe/Chart.yaml",
    "deploy/helm/fedhe/values.yaml",
    "deploy/helm/fedhe/README.md",
    "deploy/helm/fedhe/ci/production-keyserver-values.yaml",
    "deploy/helm/fedhe/ci/production-coordinator-values.yaml",
}


def yaml_file(path: Path) -> dict[str, object]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_package_reports_the_projects_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION)
    assert fedhe.__version__ == VERSION


def test_the_services_openapi_version_is_the_packages() -> None:
    for path in ("services/aggregator/aggregator/app.py", "services/keyserver/keyserver/app.py"):
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(r"FastAPI\(title=\"fedhe \w+\", version=__version__", source), path


def test_the_chart_and_its_scenarios_pin_the_projects_version() -> None:
    assert yaml_file(CHART / "Chart.yaml")["appVersion"] == VERSION
    image = yaml_file(CHART / "values.yaml")["image"]
    assert isinstance(image, dict)
    assert image["tag"] == VERSION
    for scenario in sorted((CHART / "ci").glob("*.yaml")):
        image = yaml_file(scenario).get("image")
        if isinstance(image, dict) and "tag" in image:
            assert image["tag"] == VERSION, scenario.name


def test_the_chart_readme_names_the_projects_version() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"appVersion `([^`]+)`", readme) == [VERSION]
    assert re.findall(r"^\| `image\.tag` \| `\"([^\"]+)\"` \|", readme, re.M) == [VERSION]
    pushed = re.findall(r"docker push \S+:(\S+)", readme)
    assert pushed
    assert set(pushed) == {VERSION}


def test_the_images_take_the_version_from_the_build() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "--build-arg VERSION=$(VERSION)" in makefile
    assert re.search(r"^VERSION\s*:= \$\(shell sed .*pyproject\.toml\)$", makefile, re.M)


def test_no_other_file_spells_the_version_out() -> None:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    spelled = re.compile(rf"(?<![\w.]){re.escape(VERSION)}(?![\w.])")
    offenders = []
    for name in filter(None, listed.split("\0")):
        path = REPO / name
        if name in LITERAL_FILES or name.startswith("tests/") or name.endswith(".lock") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if spelled.search(line)]
    assert offenders == [], "derive the version (fedhe.__version__, the VERSION build argument) instead"
