"""Docs that cannot drift: named tests exist, every setting is documented, every link resolves.

1. Every ``tests/...py::name`` a document cites is a test file that defines ``name`` (read with
   ``ast``, nothing is imported), so a promise in the threat model cannot outlive its proof.
2. Every field of every settings class appears in docs/configuration.md under its environment
   variable, and every ``FEDHE_*`` name there is a real setting or one of the known switches.
   The classes are found by importing every ``settings.py`` of the packages, so a new field (or
   a new settings module) fails this test until it is documented. So does every ``FEDHE_*``
   variable the code of ``shared/`` and ``services/`` reads straight from ``os.environ`` (found
   with ``ast``: ``os.environ.get``, ``os.getenv``, ``os.environ[...]``, ``... in os.environ``),
   and every ``FEDHE_*`` name written anywhere in that code (a message or docstring naming a
   variable names a documented one).
3. Every relative link in the docs and the README points at a file that exists, and an anchor
   at a heading (GitHub's slug rules) or an explicit ``<a id>`` of the target.
4. docs/performance.md shows exactly the committed benchmark tables (``bench/results/``).
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from bench import publish

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
LINKED = [*DOCS, ROOT / "README.md"]
CONFIGURATION = ROOT / "docs" / "configuration.md"

# Variables read straight from the environment rather than through a settings class, with the
# source that reads each (checked below, so a switch that is removed from the code fails here).
SWITCHES = {
    "FEDHE_INSECURE_PLAINTEXT_CODEC": "shared/fedhe/he/plaintext.py",
    "FEDHE_INSECURE_DP_SEED": "services/client-agent/client_agent/dp_randomness.py",
    "FEDHE_TEST_POSTGRES_URL": "tests/conftest.py",
    "FEDHE_CHROMIUM": "tests/browser/test_dashboard.py",
    "FEDHE_SCREENSHOT_DIR": "tests/browser/test_dashboard.py",
}

# Code whose direct reads of the environment are checked, and whose every FEDHE_* name must be documented.
SOURCE_ROOTS = (ROOT / "shared", ROOT / "services")
# A whole variable name: not a prefix (``FEDHE_AGENT_``) or a pattern (``FEDHE_AGENT_*``,
# ``FEDHE_<SERVICE>_<FIELD>``, ``f"FEDHE_{service}_..."``).
FEDHE_VARIABLE = re.compile(r"\bFEDHE_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_{<*])")

TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?")
FEDHE_NAME = re.compile(r"FEDHE_[A-Z0-9_]*")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- 1. named tests exist ------------------------------------------------------------------


@cache
def _definitions(test_file: Path) -> dict[str, set[str]]:
    """Top-level test functions and classes of a file; a class maps to its methods."""
    tree = ast.parse(test_file.read_text(encoding="utf-8"), filename=str(test_file))
    found: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            found[node.name] = {
                item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return found


def _missing_test(path: str, name: str, method: str | None) -> str | None:
    """Why ``path::name[::method]`` does not name a test, or None if it does."""
    test_file = ROOT / path
    if not test_file.is_file():
        return f"{path} does not exist"
    definitions = _definitions(test_file)
    if name not in definitions:
        return f"{path} defines no {name}"
    if method is not None and method not in definitions[name]:
        return f"{path}::{name} has no method {method}"
    return None


def test_every_named_test_exists() -> None:
    problems = []
    cited: dict[str, int] = {}
    for doc in LINKED:
        for match in TEST_REFERENCE.finditer(doc.read_text(encoding="utf-8")):
            cited[doc.name] = cited.get(doc.name, 0) + 1
            problem = _missing_test(*match.groups())
            if problem is not None:
                problems.append(f"{_relative(doc)} cites {match.group(0)}: {problem}")
    assert not problems, "\n".join(problems)
    # Guards against this test passing because the references stopped matching its pattern.
    assert cited.get("threat-model.md", 0) >= 30, "the threat model's promises should name their tests"


# ---- 2. every setting documented -------------------------------------------------------------


def _module_name(path: Path) -> str:
    """The import name of a settings module: ``shared/fedhe/x/settings.py`` → ``fedhe.x.settings``."""
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[1:] if relative.parts[0] == "shared" else relative.parts[2:]
    return ".".join(parts)


def _settings_modules() -> list[str]:
    paths = [*(ROOT / "shared").rglob("settings.py"), *(ROOT / "services").glob("*/*/**/settings.py")]
    return sorted({_module_name(path) for path in paths})


@cache
def settings_classes() -> tuple[type[BaseSettings], ...]:
    """Every settings class with an environment prefix defined in a settings module.

    A class without a prefix (``ServiceSettings``) is a base: its fields are read through the
    services' classes that inherit them.
    """
    found = []
    for name in _settings_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value.__module__ == module.__name__
                and value.model_config.get("env_prefix")
            ):
                found.append(value)
    return tuple(found)


def environment_names(settings_class: type[BaseSettings]) -> dict[str, str]:
    """The environment variable of each field, as pydantic-settings reads it (upper case)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names = {}
    for field_name, field in settings_class.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        # pydantic-settings does not prefix an explicit alias.
        names[(alias or prefix + field_name).upper()] = field_name
    return names


def _documented_names() -> tuple[set[str], set[str]]:
    """Full variable names, and prefixes (names ending in ``_``), written in configuration.md."""
    text = CONFIGURATION.read_text(encoding="utf-8")
    names: set[str] = set()
    prefixes: set[str] = set()
    for match in FEDHE_NAME.finditer(text):
        (prefixes if match.group(0).endswith("_") else names).add(match.group(0))
    return names, prefixes


def test_settings_classes_are_found() -> None:
    found = {cls.__name__ for cls in settings_classes()}
    assert {"KeyserverSettings", "AggregatorSettings", "AgentSettings", "CliSettings"} <= found


def test_every_setting_is_documented_and_every_documented_variable_exists() -> None:
    documented, prefixes = _documented_names()
    real: set[str] = set(direct_reads())
    problems = []
    for settings_class in settings_classes():
        source = f"{settings_class.__module__}.{settings_class.__name__}"
        for env_name, field_name in environment_names(settings_class).items():
            real.add(env_name)
            if env_name not in documented:
                problems.append(f"docs/configuration.md does not document {env_name} ({source}.{field_name})")
    known_prefixes = {cls.model_config.get("env_prefix", "").upper() for cls in settings_classes()}
    for name in sorted(documented - real - set(SWITCHES)):
        problems.append(f"docs/configuration.md documents {name}, which no settings class or known switch reads")
    for prefix in sorted(prefixes - known_prefixes):
        problems.append(f"docs/configuration.md names the prefix {prefix}, which no settings class uses")
    for switch in sorted(set(SWITCHES) - documented):
        problems.append(f"docs/configuration.md does not document the switch {switch}")
    assert not problems, "\n".join(problems)


def _source_files() -> list[Path]:
    return sorted(path for root in SOURCE_ROOTS for path in root.rglob("*.py"))


def _is_environ(node: ast.expr) -> bool:
    """``os.environ`` or a bare ``environ``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ"
    return isinstance(node, ast.Name) and node.id == "environ"


def _is_getenv(func: ast.expr) -> bool:
    """``os.getenv``/``getenv``, or ``os.environ.get``."""
    if isinstance(func, ast.Attribute):
        return func.attr == "getenv" or (func.attr == "get" and _is_environ(func.value))
    return isinstance(func, ast.Name) and func.id == "getenv"


def _read_names(tree: ast.Module) -> Iterator[ast.expr]:
    """The name argument of every read of the environment in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_getenv(node.func) and node.args:
            yield node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            yield node.slice
        elif (
            isinstance(node, ast.Compare)
            and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
            and any(_is_environ(right) for right in node.comparators)
        ):
            yield node.left


def environment_reads(source: str, filename: str = "<source>") -> tuple[set[str], list[str]]:
    """The variables a module reads straight from the environment, and the reads it names by an
    expression this test cannot resolve (only those that look like ``FEDHE_*`` are kept).

    A name is a string literal or a module-level constant (``SWITCH = "FEDHE_..."``).
    """
    tree = ast.parse(source, filename=filename)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    names: set[str] = set()
    unresolved: list[str] = []
    for expression in _read_names(tree):
        if isinstance(expression, ast.Constant) and isinstance(expression.value, str):
            names.add(expression.value)
        elif isinstance(expression, ast.Name) and expression.id in constants:
            names.add(constants[expression.id])
        elif "FEDHE_" in ast.unparse(expression):
            unresolved.append(f"{filename}:{expression.lineno}: {ast.unparse(expression)}")
    return {name for name in names if name.startswith("FEDHE_")}, unresolved


@cache
def direct_reads() -> dict[str, str]:
    """Every FEDHE_* variable ``shared/`` and ``services/`` read without a settings class, with a reader."""
    found: dict[str, str] = {}
    for path in _source_files():
        names, _ = environment_reads(path.read_text(encoding="utf-8"), _relative(path))
        for name in names:
            found.setdefault(name, _relative(path))
    return found


def test_environment_reads_are_found() -> None:
    source = (
        "import os\n"
        "SWITCH = 'FEDHE_A'\n"
        "os.environ.get(SWITCH)\n"
        "os.getenv('FEDHE_B', '')\n"
        "x = os.environ['FEDHE_C']\n"
        "y = 'FEDHE_D' in os.environ\n"
        "os.environ['FEDHE_WRITTEN'] = '1'\n"
        "os.environ.get('HOME')\n"
        "os.environ.get(f'FEDHE_{name}')\n"
    )
    names, unresolved = environment_reads(source)
    assert names == {"FEDHE_A", "FEDHE_B", "FEDHE_C", "FEDHE_D"}
    assert unresolved == ["<source>:9: f'FEDHE_{name}'"]
    # The CLI's URL variables are read this way; they are what configuration.md once left out.
    assert {"FEDHE_AGGREGATOR_URL", "FEDHE_KEYSERVER_URL"} <= set(direct_reads())


def test_every_variable_the_code_reads_directly_is_documented() -> None:
    documented, _ = _documented_names()
    problems = [
        f"docs/configuration.md does not document {name}, which {reader} reads from the environment"
        for name, reader in sorted(direct_reads().items())
        if name not in documented
    ]
    for path in _source_files():
        _, unresolved = environment_reads(path.read_text(encoding="utf-8"), _relative(path))
        problems.extend(
            f"{where} reads a FEDHE_* variable by a computed name: use a constant, and document it"
            for where in unresolved
        )
    assert not problems, "\n".join(problems)


def test_every_fedhe_variable_named_in_the_code_is_documented() -> None:
    """A message, docstring or literal in the code that names a variable names a documented one."""
    documented, prefixes = _documented_names()
    problems = []
    seen = 0
    for path in _source_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for name in FEDHE_VARIABLE.findall(line):
                seen += 1
                # A documented prefix passed without its underscore (``tls_env("FEDHE_KEYSERVER")``) is fine.
                if name not in documented and f"{name}_" not in prefixes:
                    problems.append(f"{_relative(path)}:{number} names {name}, which docs/configuration.md does not")
    assert not problems, "\n".join(problems)
    assert seen >= 30, "the scan should find the variables the demo's local_cluster.py and the CLI name"


def test_variable_pattern_keeps_whole_names_only() -> None:
    text = "FEDHE_AGENT_* FEDHE_<SERVICE>_<FIELD> f'FEDHE_{service}_TOKEN' FEDHE_AGENT_ `FEDHE_CA_FILE` FEDHE_X1."
    assert FEDHE_VARIABLE.findall(text) == ["FEDHE_CA_FILE", "FEDHE_X1"]


@pytest.mark.parametrize(("switch", "reader"), sorted(SWITCHES.items()))
def test_known_switches_are_still_read_by_the_code(switch: str, reader: str) -> None:
    assert switch in (ROOT / reader).read_text(encoding="utf-8"), f"{reader} no longer reads {switch}"


# ---- 3. links resolve ------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text, lower case, punctuation dropped.

    Letters, digits, spaces, hyphens and underscores are kept (any script); spaces become hyphens.
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing here
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def _prose_lines(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks, without HTML comments."""
    fenced = False
    for line in HTML_COMMENT.sub("", text).splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


@cache
def anchors(document: Path) -> frozenset[str]:
    """Every anchor of a Markdown file: heading slugs (numbered as GitHub numbers repeats) and ``<a id>``."""
    text = document.read_text(encoding="utf-8")
    found: set[str] = set(HTML_ANCHOR.findall(HTML_COMMENT.sub("", text)))
    seen: dict[str, int] = {}
    for line in _prose_lines(text):
        heading = HEADING.match(line)
        if heading is None:
            continue
        slug = github_slug(heading.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


def links(document: Path) -> Iterator[str]:
    """Every link target of a Markdown file outside code (inline links, images, definitions)."""
    text = document.read_text(encoding="utf-8")
    prose = "\n".join(INLINE_CODE.sub("", line) for line in _prose_lines(text))
    yield from LINK.findall(prose)
    yield from REFERENCE_DEFINITION.findall(prose)


def _broken(document: Path, target: str) -> str | None:
    """Why a relative link does not resolve, or None (external links are not followed)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
        return None
    path_part, _, anchor = target.partition("#")
    resolved = (document.parent / path_part).resolve() if path_part else document
    if not resolved.exists():
        return f"{path_part} does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{_relative(resolved)} has no heading or anchor #{anchor}"
    return None


def test_github_slugs() -> None:
    assert github_slug("Who must not collude with whom") == "who-must-not-collude-with-whom"
    assert github_slug("DP-SGD: noise nobody can regenerate") == "dp-sgd-noise-nobody-can-regenerate"
    assert github_slug("5.8 Audit logs") == "58-audit-logs"
    assert github_slug("Client commands (`fedhe` CLI)") == "client-commands-fedhe-cli"
    assert github_slug("[ADR 0008](adr/0008.md) and ε") == "adr-0008-and-ε"


def test_every_relative_link_resolves() -> None:
    problems = []
    for document in LINKED:
        for target in links(document):
            problem = _broken(document, target)
            if problem is not None:
                problems.append(f"{_relative(document)} links to {target}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", publish.BENCHMARKS)
def test_performance_page_shows_the_committed_benchmark_tables(name: str) -> None:
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert publish.section(page, name) == publish.result_body(ROOT / "bench" / "results", name), (
        f"docs/performance.md's {name} table differs from bench/results/{name}.md: run python -m bench.publish"
    )
