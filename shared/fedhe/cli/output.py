"""What the CLI prints: JSON for scripts (``--json``), rich tables for people, one value for shell variables.

A command that answers with one object prints it as JSON; ``--quiet`` prints only its id and
``--field NAME`` only one field (``site.id`` reaches into a nested object), so a script can
write ``SITE=$(fedhe site register ... --quiet)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from fedhe.errors import InvalidRequest


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


def field_of(value: Any, path: str) -> Any:
    """The field at dotted ``path`` of ``value`` (a model or JSON object); ``InvalidRequest`` if absent."""
    data = to_jsonable(value)
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            fields = ", ".join(sorted(data)) if isinstance(data, dict) else "none"
            raise InvalidRequest(f"the answer has no field {path!r} (fields here: {fields})", code="unknown_field")
        data = data[part]
    return data


def plain(value: Any) -> str:
    """A value as a shell variable wants it: strings bare, ``null`` as nothing, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def emit_object(value: Any, *, quiet: bool = False, field: str | None = None, id_field: str = "id") -> None:
    """A one-object answer: JSON, or only its ``id_field`` (``quiet``), or only ``field``."""
    if field:
        print(plain(field_of(value, field)))
    elif quiet:
        print(plain(field_of(value, id_field)))
    else:
        print_json(value)
