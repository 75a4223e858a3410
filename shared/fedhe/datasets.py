"""Loading a site's data (CSV, NPZ, or a dataset bundled with scikit-learn) and splitting it.

Nothing here downloads: ``sklearn:breast_cancer``, ``sklearn:digits``, ``sklearn:wine`` and
``sklearn:iris`` ship inside scikit-learn; real sites point at their own files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest

BUNDLED = ("breast_cancer", "digits", "wine", "iris")


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float64, rows x features) and integer labels ``y``."""

    x: NDArray[Any]
    y: NDArray[Any]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: NDArray[Any]) -> Dataset:
        """The rows at ``index``."""
        return Dataset(self.x[index], self.y[index])


def load_bundled(name: str) -> Dataset:
    """One of scikit-learn's bundled datasets."""
    from sklearn import datasets as sk

    loaders = {
        "breast_cancer": sk.load_breast_cancer,
        "digits": sk.load_digits,
        "wine": sk.load_wine,
        "iris": sk.load_iris,
    }
    if name not in loaders:
        raise InvalidRequest(f"unknown bundled dataset {name!r}; choose one of {', '.join(BUNDLED)}")
    bunch = loaders[name]()
    return Dataset(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64))


def load_csv(path: Path, label_column: str) -> Dataset:
    """A CSV with a header row; every column but ``label_column`` is a numeric feature."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration as exc:
            raise InvalidRequest(f"{path} is empty") from exc
        if label_column not in header:
            raise InvalidRequest(f"{path} has no label column {label_column!r} (columns: {', '.join(header)})")
        label_at = header.index(label_column)
        features: list[list[float]] = []
        labels: list[int] = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                labels.append(int(float(row[label_at])))
                features.append([float(v) for i, v in enumerate(row) if i != label_at])
            except (ValueError, IndexError) as exc:
                raise InvalidRequest(f"{path}:{line_number}: not a row of numbers") from exc
    if not labels:
        raise InvalidRequest(f"{path} has no data rows")
    return Dataset(np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64))


def load_npz(path: Path) -> Dataset:
    """An NPZ archive with arrays ``x`` (rows x features) and ``y`` (labels)."""
    with np.load(path) as archive:
        if "x" not in archive or "y" not in archive:
            raise InvalidRequest(f"{path} must hold arrays named 'x' and 'y'")
        x = np.asarray(archive["x"], dtype=np.float64)
        y = np.asarray(archive["y"], dtype=np.int64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise InvalidRequest(f"{path}: x must be rows x features and y one label per row")
    return Dataset(x.reshape(x.shape[0], -1), y)


def load_dataset(source: str, label_column: str = "label") -> Dataset:
    """Load ``sklearn:NAME``, a ``.csv`` file or a ``.npz`` file."""
    if source.startswith("sklearn:"):
        return load_bundled(source.removeprefix("sklearn:"))
    path = Path(source)
    if not path.is_file():
        raise InvalidRequest(f"data path {source} does not exist")
    if path.suffix.lower() == ".csv":
        return load_csv(path, label_column)
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    raise InvalidRequest(f"unsupported data file {source}: use .csv or .npz")


def save_csv(dataset: Dataset, path: Path, label_column: str = "label") -> None:
    """Write a dataset as CSV (the format a site admin would point the agent at)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([f"f{i}" for i in range(dataset.x.shape[1])] + [label_column])
        for features, label in zip(dataset.x, dataset.y, strict=True):
            writer.writerow([repr(float(v)) for v in features] + [int(label)])


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A stratified-by-shuffle split into (rest, held_out) with ``fraction`` held out."""
    if not 0 < fraction < 1:
        raise InvalidRequest("split fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(dataset))
    cut = round(len(dataset) * (1 - fraction))
    return dataset.subset(order[:cut]), dataset.subset(order[cut:])


def partition_dirichlet(
    labels: NDArray[Any], num_sites: int, alpha: float, seed: int, min_size: int = 1
) -> list[NDArray[Any]]:
    """Non-IID row indices per site: each class is spread over sites with Dirichlet(alpha) shares.

    Small ``alpha`` gives skewed label mixes; large ``alpha`` approaches IID. Redraws until
    every site has at least ``min_size`` rows.
    """
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(alpha * np.ones(num_sites))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise InvalidRequest(f"could not give every one of {num_sites} sites {min_size} rows; raise alpha")
