"""What the CLI prints: JSON for scripts (``--json``), rich tables for people."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table


def to_jsonable(value: Any) -> Any:
    """Models and lists of models as plain JSON values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON."""
    print(json.dumps(to_jsonable(value), indent=2, default=str))


def cell(value: Any) -> str:
    """A table cell: short timestamps, '-' for nothing."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(getattr(value, "value", value))


@dataclass(frozen=True)
class Column:
    """One table column: a header and how to read its cell from a row."""

    header: str
    read: Callable[[Any], Any]


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Any], console: Console | None = None) -> None:
    """Print ``rows`` as a table with ``columns``."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.header)
    for row in rows:
        table.add_row(*(cell(column.read(row)) for column in columns))
    (console or Console()).print(table)


def emit_listing(as_json: bool, title: str, columns: Sequence[Column], rows: Sequence[Any]) -> None:
    """A listing command's output: a table, or JSON with ``--json``."""
    if as_json:
        print_json(list(rows))
    else:
        print_table(title, columns, rows)
