"""Loading site data and splitting it non-IID."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhe.datasets import Dataset, load_bundled, load_dataset, partition_dirichlet, save_csv, split
from fedhe.errors import InvalidRequest


def test_csv_and_npz_round_trip(tmp_path: Path) -> None:
    data = Dataset(np.arange(12, dtype=float).reshape(4, 3) / 7, np.array([0, 1, 1, 0]))
    save_csv(data, tmp_path / "d.csv", label_column="outcome")
    loaded = load_dataset(str(tmp_path / "d.csv"), label_column="outcome")
    np.testing.assert_array_equal(loaded.x, data.x)
    np.testing.assert_array_equal(loaded.y, data.y)
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "d.npz")).x, data.x)


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("f0,f1\n1,2\n")
    with pytest.raises(InvalidRequest, match="no label column 'label'"):
        load_dataset(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("f0,label\n1,x\n")
    with pytest.raises(InvalidRequest, match=":2: not a row of numbers"):
        load_dataset(str(tmp_path / "b.csv"))
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(InvalidRequest, match="unknown bundled dataset"):
        load_dataset("sklearn:mnist")


def test_dirichlet_partition_covers_every_row_once_and_is_skewed() -> None:
    y = load_bundled("breast_cancer").y
    parts = partition_dirichlet(y, 3, alpha=0.3, seed=0, min_size=20)
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(y)))
    shares = [np.mean(y[p]) for p in parts]
    assert max(shares) - min(shares) > 0.2
    assert min(len(p) for p in parts) >= 20


def test_split_holds_out_the_fraction() -> None:
    data = load_bundled("iris")
    rest, held = split(data, 0.2, seed=1)
    assert (len(rest), len(held)) == (120, 30)
