"""What the CLI prints: JSON for scripts (``--json``), rich tables for people, one value for shell variables.

A listing's table fits 80 columns: columns that only ``--wide`` shows are left out, public keys
are abbreviated and timestamps cut to their date; ids are always whole. ``--wide`` shows every
column and every value whole, however wide the table gets; ``--json`` always has every field whole.

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
from rich import box
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


# Wider than any table a listing makes: the width a --wide table is measured at.
_UNBOUNDED = 100_000


def abbreviated(value: str | None, keep: int) -> str | None:
    """The first ``keep`` characters of ``value`` and an ellipsis (a key is recognised by its start)."""
    return value if value is None or len(value) <= keep + 1 else value[:keep] + "…"


def day(value: datetime | None) -> str | None:
    """A timestamp's date alone, for tables that must fit 80 columns."""
    return None if value is None else value.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Column:
    """One table column: a header, how to read its cell from a row, and what the 80-column table shows.

    ``brief`` reads the shorter cell the default table shows (``None``: the same as ``read``);
    a ``wide_only`` column appears only with ``--wide``; an ``identifier`` column is never
    narrowed (the others wrap first), so an id stays whole on one line to be copied.
    """

    header: str
    read: Callable[[Any], Any]
    brief: Callable[[Any], Any] | None = None
    wide_only: bool = False
    identifier: bool = False


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Any], *, wide: bool = False) -> None:
    """Print ``rows`` as a table with ``columns``: brief cells, or with ``wide`` every column whole."""
    shown = [column for column in columns if wide or not column.wide_only]
    # No side borders and no outer padding: three characters between columns, none around them.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in shown:
        # Folded rather than cut with an ellipsis, so a narrow terminal never hides part of an id.
        table.add_column(column.header, overflow="fold", no_wrap=column.identifier)
    for row in rows:
        table.add_row(*(cell((column.read if wide or column.brief is None else column.brief)(row)) for column in shown))
    console = Console()
    if wide:
        # As wide as the widest row: a full key must stay on one line to be compared or copied.
        unbounded = console.options.update_width(_UNBOUNDED)
        console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)


def emit_listing(
    as_json: bool, title: str, columns: Sequence[Column], rows: Sequence[Any], *, wide: bool = False
) -> None:
    """A listing command's output: a table (every column whole with ``wide``), or JSON with ``--json``."""
    if as_json:
        print_json(list(rows))
    else:
        print_table(title, columns, rows, wide=wide)


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
