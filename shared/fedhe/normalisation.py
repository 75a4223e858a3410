"""Pooled input normalisation from statistics each site computes locally (no TensorFlow).

Each site sends count, per-feature sums and sums of squares (per channel for images, over
every pixel) through the encrypted codec; the summed statistics give the federation's mean
and std, which go into the spec's ``normalisation`` and from there into a fixed layer of the
model (``fedhe.models``). The sums are not differentially private: they tell everyone the
pooled mean and spread of each feature, and are not counted in any privacy ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.modelspec import InputNormalisation

# A feature whose pooled std is below this is constant: scaling it by 1 keeps it finite.
_MIN_STD = 1e-8


@dataclass(frozen=True)
class FeatureStatistics:
    """Count of values per feature and their sums and sums of squares."""

    count: float
    sums: NDArray[Any]
    sums_of_squares: NDArray[Any]

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(
            self.count + other.count, self.sums + other.sums, self.sums_of_squares + other.sums_of_squares
        )

    def to_vector(self) -> NDArray[Any]:
        """``[count, sums..., sums_of_squares...]`` for the codec (summing vectors sums statistics)."""
        return np.concatenate([[self.count], self.sums, self.sums_of_squares]).astype(np.float64)

    @classmethod
    def from_vector(cls, vector: NDArray[Any]) -> FeatureStatistics:
        """The inverse of ``to_vector``."""
        if vector.ndim != 1 or vector.size < 3 or vector.size % 2 != 1:
            raise InvalidRequest(f"a statistics vector has 1 + 2k values, not {vector.size}")
        features = (vector.size - 1) // 2
        return cls(float(vector[0]), vector[1 : 1 + features].copy(), vector[1 + features :].copy())


def local_statistics(x: NDArray[Any]) -> FeatureStatistics:
    """A site's statistics of rows ``x``: per feature (rows x features) or per channel (rows x H x W x C)."""
    if x.ndim not in (2, 4) or x.shape[0] == 0:
        raise InvalidRequest(f"statistics need rows x features or rows x H x W x C, not shape {x.shape}")
    values = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    return FeatureStatistics(float(values.shape[0]), values.sum(axis=0), np.square(values).sum(axis=0))


def pooled_normalisation(statistics: FeatureStatistics | Iterable[FeatureStatistics]) -> InputNormalisation:
    """Mean and std of everything the statistics cover (a summed total, or the sites' to be summed)."""
    if not isinstance(statistics, FeatureStatistics):
        parts = list(statistics)
        if not parts:
            raise InvalidRequest("no statistics to pool")
        statistics = sum(parts[1:], parts[0])
    if statistics.count < 1:
        raise InvalidRequest("pooled statistics cover no values")
    mean = statistics.sums / statistics.count
    variance = np.maximum(statistics.sums_of_squares / statistics.count - mean**2, 0.0)
    std = np.sqrt(variance)
    return InputNormalisation(mean=mean.tolist(), std=np.where(std > _MIN_STD, std, 1.0).tolist())


def statistics_upload(
    x: NDArray[Any], feature_bounds: Sequence[float], weight_scale: int
) -> tuple[NDArray[Any], float]:
    """A site's statistics vector for the encrypted statistics step, and the fraction of values clipped.

    Values are scaled by their public bound into z in [-1, 1] (beyond it they are clipped), and
    the vector ``[count, Σz, Σz²]`` is divided by S times the values each row holds per feature,
    so every entry lies in [-1, 1] whatever the site's size: the packed codec's range.
    """
    if x.ndim not in (2, 4) or x.shape[0] == 0:
        raise InvalidRequest(f"statistics need rows x features or rows x H x W x C, not shape {x.shape}")
    bounds = np.asarray(feature_bounds, dtype=np.float64)
    values = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    if values.shape[1] != bounds.size:
        raise InvalidRequest(f"the data has {values.shape[1]} features (channels), the job bounds {bounds.size}")
    scaled = values / bounds
    clipped = float(np.mean(np.abs(scaled) > 1.0))
    z = np.clip(scaled, -1.0, 1.0)
    per_row = values.shape[0] // x.shape[0]
    statistics = FeatureStatistics(float(values.shape[0]), z.sum(axis=0), np.square(z).sum(axis=0))
    return statistics.to_vector() / (weight_scale * per_row), clipped


def normalisation_from_sum(summed: NDArray[Any], feature_bounds: Sequence[float]) -> InputNormalisation:
    """The pooled mean and std from the decrypted sum of the sites' ``statistics_upload`` vectors."""
    statistics = FeatureStatistics.from_vector(np.asarray(summed, dtype=np.float64))
    bounds = np.asarray(feature_bounds, dtype=np.float64)
    if statistics.sums.size != bounds.size or not statistics.count > 0:
        raise InvalidRequest("the pooled statistics do not match the job's features or cover no values")
    mean_z = statistics.sums / statistics.count
    variance = np.maximum(statistics.sums_of_squares / statistics.count - mean_z**2, 0.0) * bounds**2
    std = np.sqrt(variance)
    return InputNormalisation(mean=(mean_z * bounds).tolist(), std=np.where(std > _MIN_STD, std, 1.0).tolist())
