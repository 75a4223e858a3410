"""The committed Python API reference (docs/api/) is what pdoc makes of today's docstrings.

It is rendered afresh into a temporary directory with the same generator ``make api-docs`` runs;
any difference (a changed signature or docstring, a page added or gone) fails, naming the pages.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

API_DOCS = Path(__file__).resolve().parents[2] / "docs" / "api"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedhe_api_docs_generate", API_DOCS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    writing, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writing
    return module


@pytest.mark.slow
def test_the_committed_api_reference_matches_the_docstrings(tmp_path: Path) -> None:
    generate = _generator()
    generate.render(tmp_path)
    fresh, committed = generate.pages(tmp_path), generate.pages(API_DOCS)
    differing = sorted(name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name])
    problems = {
        "missing from docs/api": sorted(fresh.keys() - committed.keys()),
        "no longer generated": sorted(committed.keys() - fresh.keys()),
        "out of date": differing,
    }
    assert not any(problems.values()), f"run `make api-docs` and commit docs/api: {problems}"


def test_the_reference_covers_the_recipe_and_the_clients() -> None:
    pages = _generator().pages(API_DOCS)
    assert {"index.html", "fedhe/he.html", "fedhe/api_client.html"} <= pages.keys()
    for page, names in {
        "fedhe/he.html": ["codec_for", "create_key_material", "load_secret_context", "encode_envelope"],
        "fedhe/api_client.html": ["AggregatorClient", "KeyserverClient", "register_site", "secret_context"],
    }.items():
        text = pages[page].decode()
        assert [name for name in names if name not in text] == [], page
