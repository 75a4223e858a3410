"""The in-memory dataset every loader returns, and how it is split and spread over sites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (rows first: rows x features, or rows x H x W x C) and class indices ``y``."""

    x: NDArray[Any]
    y: NDArray[Any]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: NDArray[Any]) -> Dataset:
        """The rows at ``index``."""
        return Dataset(self.x[index], self.y[index])


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A shuffled split into (rest, held_out) with ``fraction`` held out."""
    if not 0 < fraction < 1:
        raise InvalidRequest("split fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(dataset))
    cut = round(len(dataset) * (1 - fraction))
    return dataset.subset(order[:cut]), dataset.subset(order[cut:])


def partition_iid(num_rows: int, num_sites: int, seed: int) -> list[NDArray[Any]]:
    """IID row indices per site: a shuffle cut into ``num_sites`` parts of (nearly) equal size."""
    if not 1 <= num_sites <= num_rows:
        raise InvalidRequest(f"cannot spread {num_rows} rows over {num_sites} sites")
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_sites)]


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
