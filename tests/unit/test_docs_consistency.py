"""The guides and the Helm chart's docs say what the code does (issue 16, "Docs that agree").

1. The exit-status tables of ``fedhe agent --once`` in the site-admin and operator guides list
   every code the agent returns, with the code's meaning: each outcome of
   ``client_agent.outcomes.EXIT_CODES`` beside its code, each ``EXIT_*`` constant of
   ``fedhe.cli.main`` (the codes of errors before any outcome) and the SIGTERM code of
   ``client_agent.commands``; and the guides' prose never gives an outcome another code.
2. The Helm chart's NOTES.txt port-forwards each installed Service to its real port, the README's
   port-forward commands are ones NOTES.txt prints, and the README's way to render the chart
   without a cluster runs.
3. No document calls the scheme that is not the default (CKKS) the default, or names the
   federations' secret contexts by it, while new federations get the default (BFV).

The tables and the code are read, never trusted to agree: each check compares values.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from client_agent.outcomes import EXIT_CODES, OutcomeStatus
from fedhe.schemas import FederationCreate

ROOT = Path(__file__).resolve().parents[2]
SITE_ADMIN_GUIDE = ROOT / "docs" / "site-admin-guide.md"
OPERATOR_GUIDE = ROOT / "docs" / "operator-guide.md"
CLI_MAIN = ROOT / "shared" / "fedhe" / "cli" / "main.py"
AGENT_COMMANDS = ROOT / "services" / "client-agent" / "client_agent" / "commands.py"
CHART_DIR = ROOT / "deploy" / "helm" / "fedhe"
CHART_README = CHART_DIR / "README.md"
SCENARIOS = sorted(path.name for path in (CHART_DIR / "ci").glob("*-values.yaml"))
RELEASE = "fedhe"

EXIT_TABLE_HEADER = re.compile(r"^\|\s*(?:Status|Code)\s*\|\s*Outcome\s*\|\s*Meaning\s*\|\s*$")
BACKTICKED = re.compile(r"`([^`]+)`")
PORT_FORWARD = re.compile(r"kubectl -n (\S+) port-forward svc/(\S+) (\d+):(\d+)")
WHOAMI = re.compile(r"fedhe account whoami --service (\w+) --\1 https?://localhost:(\d+)")
FENCE = re.compile(r"^```(\w*)\s*$")


# ---- 1. exit codes ----------------------------------------------------------------------------


def cli_exit_codes() -> dict[int, str]:
    """``EXIT_*`` constants of ``fedhe.cli.main`` other than success, as code → the word naming it
    (``EXIT_INVALID_INPUT = 2`` → ``invalid``), read with ``ast``."""
    tree = ast.parse(CLI_MAIN.read_text(encoding="utf-8"))
    found: dict[int, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id.startswith("EXIT_") and node.value.value != 0:
                assert isinstance(node.value.value, int), target.id
                found[node.value.value] = target.id.removeprefix("EXIT_").split("_")[0].lower()
    return found


def signal_exit_codes() -> set[int]:
    """Codes ``fedhe agent`` exits with on SIGTERM (``signal.SIGTERM, lambda *_: sys.exit(N)``)."""
    source = AGENT_COMMANDS.read_text(encoding="utf-8")
    return {int(code) for code in re.findall(r"SIGTERM[^\n]*sys\.exit\((\d+)\)", source)}


def outcomes_by_code() -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for status, code in EXIT_CODES.items():
        found.setdefault(code, set()).add(status.value)
    return found


def exit_table(text: str, name: str) -> dict[int, tuple[set[str], str]]:
    """The ``| Status | Outcome | Meaning |`` table of a guide: code → (outcomes named, meaning)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if EXIT_TABLE_HEADER.match(line)]
    assert len(starts) == 1, f"{name} should have one exit-status table, has {len(starts)}"
    rows: dict[int, tuple[set[str], str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        code, outcome, meaning = (cell.strip() for cell in line.strip().strip("|").split("|", 2))
        assert code.isdigit(), f"{name}: {line}"
        assert int(code) not in rows, f"{name} lists exit status {code} twice"
        rows[int(code)] = (set(BACKTICKED.findall(outcome)), meaning)
    return rows


@pytest.mark.parametrize("document", [SITE_ADMIN_GUIDE, OPERATOR_GUIDE], ids=lambda path: path.name)
def test_exit_status_table_lists_every_code_the_agent_returns(document: Path) -> None:
    table = exit_table(document.read_text(encoding="utf-8"), document.name)
    outcomes, generic, signals = outcomes_by_code(), cli_exit_codes(), signal_exit_codes()
    assert generic, "fedhe.cli.main defines no EXIT_* codes: has it moved?"
    assert signals == {143}, signals
    assert sorted(table) == sorted({*outcomes, *generic, *signals}), f"{document.name}'s exit statuses"
    for code, statuses in outcomes.items():
        assert table[code][0] == statuses, f"{document.name}: status {code} is {statuses}, not {table[code][0]}"
    for code, word in generic.items():
        named, meaning = table[code]
        assert not named, f"{document.name}: status {code} comes before any outcome, yet names {named}"
        assert word in meaning.lower(), f"{document.name}: status {code} should say it is '{word}': {meaning}"
    for code in signals:
        assert "SIGTERM" in table[code][1], f"{document.name}: status {code} is SIGTERM"


def test_the_exit_table_reader_sees_a_wrong_code() -> None:
    text = SITE_ADMIN_GUIDE.read_text(encoding="utf-8")
    table = exit_table(text, "guide")
    assert table[11][0] == {"refused"}
    assert table[13][0] == {"failed", "stopped"}
    wrong = text.replace("| 11 | `refused` |", "| 1 | `refused` |", 1)
    assert wrong != text
    with pytest.raises(AssertionError, match="exit status 1 twice"):
        exit_table(wrong, "guide")


OUTCOME_AND_STATUS = re.compile(r"outcome `(\w+)`(?:[^()`]|`\w+`)*?exit status (\d+)")
SIGNATURE_AND_STATUS = re.compile(r"[^\n]*bad_signature[^\n]*")


@pytest.mark.parametrize("document", [SITE_ADMIN_GUIDE, OPERATOR_GUIDE], ids=lambda path: path.name)
def test_prose_gives_each_outcome_its_code(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    statuses = {status.value: code for status, code in EXIT_CODES.items()}
    seen = 0
    for outcome, code in OUTCOME_AND_STATUS.findall(text):
        seen += 1
        assert outcome in statuses, f"{document.name} names an outcome `{outcome}` the agent does not have"
        assert int(code) == statuses[outcome], f"{document.name}: outcome `{outcome}` exits {statuses[outcome]}"
    if document == SITE_ADMIN_GUIDE:
        assert seen >= 3, "the site-admin guide names outcomes with their exit status"
        # A signature the keyserver rejects comes while the agent takes part in a job: `refused`.
        for line in SIGNATURE_AND_STATUS.findall(text):
            for code in re.findall(r"exit status (\d+)", line):
                assert int(code) == EXIT_CODES[OutcomeStatus.REFUSED], line


# ---- 2. the Helm chart's NOTES.txt and README ---------------------------------------------------


def scenario_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART_DIR / "ci" / name).read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


@cache
def rendered(name: str, namespace: str) -> tuple[str, dict[str, list[int]]]:
    """NOTES.txt, and each Service's name → ports, for a scenario file installed as ``fedhe``."""
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(scenario_values(name), name=RELEASE, namespace=namespace)
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    services: dict[str, list[int]] = {}
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc and doc.get("kind") == "Service":
                    services[doc["metadata"]["name"]] = [port["port"] for port in doc["spec"]["ports"]]
    return notes, services


@pytest.mark.deploy
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_notes_port_forward_each_service_to_its_port(scenario: str) -> None:
    notes, services = rendered(scenario, "fedhe")
    lines = notes.splitlines()
    forwarded = {}
    for index, line in enumerate(lines):
        match = PORT_FORWARD.search(line)
        if match is None:
            continue
        namespace, service, local, remote = match.groups()
        assert namespace == "fedhe"
        assert service in services, f"{scenario}: NOTES.txt forwards to {service}, not a Service of the release"
        assert int(remote) in services[service], f"{scenario}: {service} exposes {services[service]}, not {remote}"
        # The command that follows reaches the service through the forwarded local port.
        whoami = next(WHOAMI.search(later) for later in lines[index:] if WHOAMI.search(later))
        assert whoami is not None
        assert service.endswith(whoami.group(1)), (service, whoami.group(0))
        assert whoami.group(2) == local, f"{scenario}: forwards {local} but the CLI calls {whoami.group(2)}"
        forwarded[service] = int(remote)
    assert set(forwarded) == set(services), f"{scenario}: NOTES.txt should port-forward every Service"


def _readme_sections() -> dict[str, str]:
    sections: dict[str, str] = {}
    title = ""
    for line in CHART_README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
        sections[title] = sections.get(title, "") + line
    return sections


def _code_blocks(text: str, language: str) -> Iterator[str]:
    """The fenced blocks of ``language`` in a Markdown text."""
    opened: str | None = None  # the language of the block being read
    block: list[str] = []
    for line in text.splitlines():
        fence = FENCE.match(line)
        if opened is None and fence is not None:
            opened, block = fence.group(1), []
        elif opened is not None and line.startswith("```"):
            if opened == language:
                yield "\n".join(block)
            opened = None
        elif opened is not None:
            block.append(line)


@pytest.mark.deploy
def test_readme_port_forwards_are_those_notes_print() -> None:
    text = CHART_README.read_text(encoding="utf-8")
    mentioned = PORT_FORWARD.findall(text)
    assert len(mentioned) >= 3, "the README shows the port-forward for both services"
    for namespace, service, local, remote in mentioned:
        command = f"kubectl -n {namespace} port-forward svc/{service} {local}:{remote}"
        printers = [name for name in SCENARIOS if command in rendered(name, namespace)[0]]
        assert printers, f"README.md shows `{command}`, which NOTES.txt prints for no ci/ scenario"


@pytest.mark.deploy
def test_readme_admin_cli_block_is_what_notes_print() -> None:
    [block] = list(_code_blocks(_readme_sections()["Admin CLI"], "sh"))
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    match = PORT_FORWARD.search(lines[0])
    assert match is not None, lines[0]
    namespace = match.group(1)
    matching = [
        name
        for name in SCENARIOS
        if all(line in {printed.strip() for printed in rendered(name, namespace)[0].splitlines()} for line in lines)
    ]
    assert matching, "README.md's Admin CLI block differs from every scenario's NOTES.txt"


@pytest.mark.deploy
def test_readme_renders_the_chart_without_a_cluster(tmp_path: Path) -> None:
    section = _readme_sections()["Render without a cluster"]
    blocks = list(_code_blocks(section, "sh"))
    helm_commands = [line for block in blocks for line in block.splitlines() if line.startswith("helm ")]
    assert any(line.startswith("helm template ") for line in helm_commands)
    for line in helm_commands:
        for values_file in re.findall(r"-f (\S+)", line):
            assert (ROOT / values_file).is_file(), line
    [python] = [block for block in blocks if block.startswith("python - <<'EOF'")]
    script = python.split("\n", 1)[1].rsplit("\nEOF", 1)[0]
    # The README's own snippet, run as a reader would.
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "kubectl -n fedhe port-forward svc/fedhe-keyserver 8090:8090 &" in done.stderr  # NOTES.txt
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if isinstance(doc, dict)]
    kinds = {doc["kind"] for doc in objects}
    assert {"Deployment", "Service", "NetworkPolicy"} <= kinds, kinds
    ports = {doc["metadata"]["name"]: doc["spec"]["ports"][0]["port"] for doc in objects if doc["kind"] == "Service"}
    assert ports == {"fedhe-keyserver": 8090, "fedhe-aggregator": 8080}


# ---- 3. the default HE scheme -------------------------------------------------------------------

SCHEMES = ("BFV", "CKKS")
# Documents that describe the system as it is (ADRs are dated decisions and keep their history).
DESCRIBING = [
    ROOT / "README.md",
    *(path for path in sorted((ROOT / "docs").glob("*.md"))),
    *sorted((ROOT / "deploy").rglob("README.md")),
    *sorted((ROOT / "deploy").rglob("NOTES.txt")),
]


def default_scheme() -> str:
    """The scheme of a federation created without parameters, from the request model's default."""
    factory = FederationCreate.model_fields["parameters"].default_factory
    assert factory is not None
    return str(factory().scheme).upper()  # type: ignore[call-arg]


def wrong_default_claims(text: str, default: str) -> list[str]:
    """Phrases that call another scheme the default, or name the secret contexts by it."""
    found: list[str] = []
    for scheme in SCHEMES:
        if scheme == default:
            continue
        patterns = [
            rf"\bdefault(?:s|ed)?\b(?:\s+(?:is|to|of|scheme|HE|encryption|the|a)\b)*\s*:?\s*{scheme}\b",
            rf"\b{scheme}\b\s*(?:\(the default\)|by default|is the default|as default|\(default\))",
            rf"\b(?:secret|keyless|public|evaluation|federation(?:'s|s')?)\s+{scheme}\s+(?:contexts?|keys?)\b",
        ]
        for pattern in patterns:
            found.extend(match.group(0) for match in re.finditer(pattern, text, re.IGNORECASE))
    return found


def test_the_default_scheme_is_read_from_the_code() -> None:
    assert default_scheme() == "BFV"


def test_wrong_default_claims_are_recognised() -> None:
    assert wrong_default_claims("the secret CKKS contexts stored by the keyserver", "BFV") == ["secret CKKS contexts"]
    assert wrong_default_claims("CKKS (the default) or BFV", "BFV") == ["CKKS (the default)"]
    assert wrong_default_claims("the default scheme is CKKS", "BFV") == ["default scheme is CKKS"]
    assert wrong_default_claims("HE parameters, by default BFV; `ckks` on request", "BFV") == []
    assert wrong_default_claims("secret HE contexts (BFV by default)", "BFV") == []
    assert wrong_default_claims("secret HE contexts (BFV by default)", "CKKS") == ["BFV by default"]


@pytest.mark.parametrize("document", DESCRIBING, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_document_calls_another_scheme_the_default(document: Path) -> None:
    claims = wrong_default_claims(document.read_text(encoding="utf-8"), default_scheme())
    assert not claims, f"{document.relative_to(ROOT)}: new federations are {default_scheme()}, yet it says {claims}"
