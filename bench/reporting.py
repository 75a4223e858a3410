"""Writing benchmark results: a markdown table with the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_description() -> str:
    """CPU model, core count and memory of this machine."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    return f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """``rows`` as the lines of a markdown table (a skipped row shows its reason)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "skipped" in row:
            cells = [_format(row.get(c, "")) for c in columns[:3]] + [f"skipped: {row['skipped']}"]
            cells += [""] * (len(columns) - len(cells))
        else:
            cells = [_format(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, title: str, machine: str, blocks: list[list[str]]) -> None:
    """A result page: its title, the machine, then ``blocks`` (tables, notes) separated by blank lines."""
    lines = [f"# {title}", "", f"Machine: {machine}"]
    for block in blocks:
        lines += ["", *block]
    path.write_text("\n".join(lines) + "\n")


def write_markdown_table(
    path: Path, title: str, machine: str, rows: list[dict[str, Any]], columns: list[str], notes: list[str] | None = None
) -> None:
    """Write ``rows`` as a markdown table (a skipped row shows its reason)."""
    lines = [f"# {title}", "", f"Machine: {machine}", "", *markdown_table(rows, columns)]
    lines += ["", *(notes or [])]
    path.write_text("\n".join(lines) + "\n")
