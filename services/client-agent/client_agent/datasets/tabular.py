"""Tabular site data: CSV files with named columns, and NPZ archives.

CSV rules (a site admin's export from any tool should load, a broken one should say where):

* a header row names the columns; names must be unique;
* the delimiter is detected: comma, semicolon, tab or bar (a warning names any but the comma);
  with a semicolon, tab or bar a decimal comma (``12,5``) reads as a decimal point;
* the file is UTF-8 (a byte-order mark is allowed); any other encoding is refused, naming the
  line, with the fix;
* the job's feature columns (``DataSchema.feature_columns``) are read in the job's order,
  wherever they sit in the file; a site whose export names them otherwise maps them
  (``columns``: job feature name → the site's column). Every other column except the label is
  **ignored** (record ids, dates and notes need not be stripped first, and are never read into
  the model). A job without feature names uses every column but the label, in file order;
* the label column holds class names or indices, mapped through the job's class list;
* an empty cell, or ``NA``, ``NaN``, ``null``, ``?``, is a missing value: refused, naming the
  row and column (imputing would be a modelling choice the job did not make);
* a cell that is not a finite number is refused, naming row, column and value.

Every problem in the file is reported at once (``client_agent.datasets.problems``). Rows are numbered
as lines of the file (the header is line 1); blank lines are skipped.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.datasets.dataset import Dataset
from client_agent.datasets.problems import DataProblems
from fedhe.data_schema import ClassList, DataSchema
from fedhe.errors import DataProblem

_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_DELIMITERS = ",;\t|"
_DECIMAL_COMMA = re.compile(r"^\s*[-+]?\d*,\d+(?:[eE][-+]?\d+)?\s*$")
_DELIMITER_NAMES = {";": "semicolons", "\t": "tabs", "|": "bars"}


def _text(path: Path, problems: DataProblems) -> str:
    """The file as text; anything but UTF-8 is refused with the line it breaks on and the fix."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise problems.stop(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8 "
            "(in Excel: Save As, 'CSV UTF-8')"
        ) from exc


def _delimiter(path: Path, text: str, problems: DataProblems) -> str:
    """The delimiter the header and first rows use (a comma unless they plainly use another)."""
    sample = "\n".join(text.splitlines()[:20])
    try:
        found = csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        return ","
    if found != ",":
        problems.warn(f"{path}: columns are separated by {_DELIMITER_NAMES[found]}; decimal commas read as points")
    return found


def _columns(
    path: Path,
    header: list[str],
    label_column: str,
    schema: DataSchema | None,
    columns: Mapping[str, str],
    problems: DataProblems,
) -> list[int]:
    """Positions of the feature columns in the file, in the job's order."""
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        problems.add(f"{path}: column names appear more than once: {', '.join(duplicates)}")
    if label_column not in header:
        problems.add(f"{path} has no label column {label_column!r} (columns: {', '.join(header)})")
    if schema is None or schema.feature_columns is None:
        positions = [i for i, name in enumerate(header) if name != label_column]
    else:
        wanted = [columns.get(name, name) for name in schema.feature_columns]
        missing = [
            name if name == site else f"{name} (mapped to {site!r})"
            for name, site in zip(schema.feature_columns, wanted, strict=True)
            if site not in header
        ]
        if missing:
            problems.add(f"{path} lacks the job's feature columns {', '.join(missing)}")
        positions = [header.index(name) for name in wanted if name in header]
    if schema is not None and (len(schema.input_shape) != 1 or len(positions) != schema.input_shape[0]):
        problems.add(f"{path} has {len(positions)} feature columns, the job's model expects {schema.input_shape}")
    problems.raise_if_any()  # the rows cannot be read without their columns
    return positions


def _number(where: str, cell: str, delimiter: str, problems: DataProblems) -> float:
    if cell.strip().lower() in _MISSING:
        problems.add(f"{where}: missing value")
        return math.nan
    if delimiter != "," and _DECIMAL_COMMA.match(cell):
        cell = cell.replace(",", ".")
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.add(f"{where}: {cell!r} is not a finite number")
    return value


def load_csv(
    path: Path,
    label_column: str = "label",
    schema: DataSchema | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    problems: DataProblems | None = None,
) -> Dataset:
    """A CSV of numeric features and a label column (module docstring: the rules)."""
    problems = problems if problems is not None else DataProblems()
    classes = schema.classes if schema is not None else None
    text = _text(path, problems)
    delimiter = _delimiter(path, text, problems)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration as exc:
        raise problems.stop(f"{path} is empty") from exc
    positions = _columns(path, header, label_column, schema, columns or {}, problems)
    label_at = header.index(label_column)
    features: list[list[float]] = []
    labels: list[int] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.add(f"{path}: row {line} has {len(row)} cells, the header {len(header)}")
            continue
        features.append(
            [_number(f"{path}: row {line}, column {header[i]!r}", row[i], delimiter, problems) for i in positions]
        )
        labels.append(_label(path, line, label_column, row[label_at], classes, problems))
    if not labels and not problems.problems:
        problems.add(f"{path} has no data rows")
    problems.raise_if_any()
    return Dataset(np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64))


def _label(path: Path, line: int, column: str, cell: str, classes: ClassList | None, problems: DataProblems) -> int:
    where = f"{path}: row {line}, column {column!r}"
    if cell.strip().lower() in _MISSING:
        problems.add(f"{where}: missing label")
        return -1
    try:
        if classes is not None:
            return classes.index(cell, where)
    except DataProblem as exc:
        problems.add(exc.message)
        return -1
    number = _number(where, cell, ",", problems)
    if math.isfinite(number) and (number != int(number) or number < 0):
        problems.add(f"{where}: label {cell!r} is not a class index")
    return int(number) if math.isfinite(number) else -1


def load_npz(path: Path, schema: DataSchema | None = None) -> Dataset:
    """An NPZ archive with ``x`` (one row per example) and ``y`` (class names or indices)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataProblem(f"{path} must hold arrays named 'x' and 'y' (it has {', '.join(archive.files)})")
            x = np.asarray(archive["x"])
            y = np.asarray(archive["y"])
    except (OSError, ValueError) as exc:
        raise DataProblem(f"{path} is not a readable NPZ archive: {exc}") from exc
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataProblem(f"{path}: y must hold one label per row of x ({x.shape[0]} rows, y has shape {y.shape})")
    if not np.issubdtype(x.dtype, np.number):
        raise DataProblem(f"{path}: x holds {x.dtype} values, not numbers")
    x = _shaped(path, x.astype(np.float32 if x.ndim > 2 else np.float64), schema)
    bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
    if bad.size:
        raise DataProblem(f"{path}: x row {int(bad[0])} has a missing or infinite value")
    if schema is not None:
        labels = [schema.classes.index(value, f"{path}: y[{i}]") for i, value in enumerate(y.tolist())]
    elif np.issubdtype(y.dtype, np.integer):
        labels = y.tolist()
    else:
        raise DataProblem(f"{path}: y holds {y.dtype} labels; without the job's class list they must be integers")
    return Dataset(x, np.asarray(labels, dtype=np.int64))


def _shaped(path: Path, x: NDArray[Any], schema: DataSchema | None) -> NDArray[Any]:
    """``x`` as rows x the job's input shape (a missing channel axis of 1 is added)."""
    if schema is None:
        return x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    shape = schema.input_shape
    if x.shape[1:] == shape:
        return x
    if len(shape) == 3 and shape[2] == 1 and x.shape[1:] == shape[:2]:
        return x[..., np.newaxis]
    raise DataProblem(f"{path}: x rows have shape {x.shape[1:]}, the job's model expects {shape}")


def save_csv(dataset: Dataset, path: Path, label_column: str = "label", feature_names: list[str] | None = None) -> None:
    """Write a tabular dataset as CSV (the format a site admin would point the agent at)."""
    names = feature_names or [f"f{i}" for i in range(dataset.x.shape[1])]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, label_column])
        for features, label in zip(dataset.x, dataset.y, strict=True):
            writer.writerow([repr(float(v)) for v in features] + [int(label)])
