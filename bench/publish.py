"""Copy the benchmark tables from ``bench/results/`` into docs/performance.md.

Each result file's body (everything after its title) replaces the text between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in the page, and the HE plot is copied to
``docs/img/``; ``tests/unit/test_docs.py`` checks the page still matches the committed results.

    python -m bench.publish
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

BENCHMARKS = ("he_bench", "precision", "secagg", "load", "e2e", "dp_speed", "dp_accuracy", "transfer")
PAGE = Path("docs/performance.md")


def result_body(results: Path, name: str) -> str:
    """A result file without its title line, as the page shows it."""
    return (results / f"{name}.md").read_text(encoding="utf-8").split("\n", 1)[1].strip("\n")


def section(page: str, name: str) -> str | None:
    """The text the page holds between the markers of ``name``, or None if it has none."""
    found = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", page, flags=re.S)
    return None if found is None else found.group(1).rstrip("\n")


def publish(results: Path, page_path: Path, images: Path) -> None:
    page = page_path.read_text(encoding="utf-8")
    for name in BENCHMARKS:
        if section(page, name) is None:
            raise SystemExit(f"{page_path}: no <!-- bench:{name} --> section")
        body = result_body(results, name)
        found = re.search(rf"<!-- bench:{name} -->\n.*?<!-- /bench:{name} -->", page, flags=re.S)
        assert found is not None  # section() found it above
        page = page[: found.start()] + f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->" + page[found.end() :]
    page_path.write_text(page, encoding="utf-8")
    shutil.copyfile(results / "he_bench.png", images / "he_bench.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    publish(args.results, PAGE, Path("docs/img"))
    print(f"updated {PAGE} from {args.results}")


if __name__ == "__main__":
    main()
