"""Regenerate the Python API reference in docs/api/ from the docstrings, with pdoc (``make api-docs``).

The reference covers what a program needs to talk to fedhe: the REST clients
(``fedhe.api_client``) with the wire schemas (``fedhe.schemas``), errors (``fedhe.errors``) and
client TLS (``fedhe.tls``) their signatures name, and the HE recipe layer (``fedhe.he``).
Sources and search are left out, so the pages change only when a documented signature or
docstring does. pdoc's output is deterministic for one pdoc version (pinned in
requirements/dev.lock); tests/unit/test_api_docs.py renders it afresh and fails when the
committed pages differ.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODULES = ["fedhe.api_client", "fedhe.errors", "fedhe.he", "fedhe.schemas", "fedhe.tls"]
FOOTER = "fedhe Python API, generated from docstrings by make api-docs"
# Files in docs/api that pdoc does not write.
OWN_FILES = frozenset({"generate.py"})


def render(directory: Path) -> None:
    """Write the reference for ``MODULES`` into ``directory``."""
    subprocess.run(  # noqa: S603 (pdoc of this interpreter on a fixed list of our modules)
        [
            sys.executable,
            "-m",
            "pdoc",
            "--output-directory",
            str(directory),
            "--no-show-source",
            "--no-search",
            "--footer-text",
            FOOTER,
            *MODULES,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )


def pages(directory: Path) -> dict[str, bytes]:
    """Every generated file under ``directory`` by relative path (the generator itself excluded)."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in OWN_FILES and "__pycache__" not in path.parts
    }


def main() -> None:
    """Replace the pages in docs/api with freshly rendered ones."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        render(fresh)
        for stale in pages(HERE):
            (HERE / stale).unlink()
        for name, data in pages(fresh).items():
            target = HERE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    for directory in sorted((p for p in HERE.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            shutil.rmtree(directory)
    print(f"wrote {len(pages(HERE))} pages to {HERE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
