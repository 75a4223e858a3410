"""``load_dataset``: one entry point from the agent's ``--data-path`` to a ``Dataset``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from client_agent.datasets.bundled import load_bundled
from client_agent.datasets.dataset import Dataset
from client_agent.datasets.images import load_image_folder
from client_agent.datasets.problems import DataProblems
from client_agent.datasets.tabular import load_csv, load_npz
from fedhe.data_schema import DataSchema
from fedhe.errors import DataProblem


def load_dataset(
    source: str,
    label_column: str = "label",
    schema: DataSchema | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    problems: DataProblems | None = None,
) -> Dataset:
    """``sklearn:NAME``, a ``.csv`` or ``.npz`` file, or an image folder (which needs ``schema``).

    With ``schema`` (the job's contract) features, shapes and labels are checked and mapped as
    the job says; without it, a CSV's every non-label column is a feature and labels must be
    integer class indices. ``columns`` maps the job's feature names to a CSV's own; ``problems``
    collects the warnings (and, on failure, every problem) for the caller to show.
    """
    if source.startswith("sklearn:"):
        return load_bundled(source.removeprefix("sklearn:"))
    path = Path(source)
    if path.is_dir():
        if schema is None:
            raise DataProblem(f"{source} is an image folder; reading it needs the job's input shape and classes")
        return load_image_folder(path, schema, problems)
    if not path.is_file():
        raise DataProblem(f"data path {source} does not exist")
    if path.suffix.lower() == ".csv":
        return load_csv(path, label_column, schema, columns=columns, problems=problems)
    if path.suffix.lower() == ".npz":
        return load_npz(path, schema)
    raise DataProblem(f"unsupported data file {source}: use .csv, .npz or a folder of images")
