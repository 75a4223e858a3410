"""Pooled input normalisation from statistics each site computes locally (no TensorFlow).

Each site sends per-feature sums and sums of squares (per channel for images, over every
pixel), with Gaussian noise, through the encrypted codec; the summed statistics and the row
count Σ n_k give the federation's mean and std, which go into the spec's ``normalisation`` and
from there into a fixed layer of the model (``client_agent.models``). Each site's vector is a
Gaussian mechanism charged to its privacy ledger like a DP-SGD pass.
"""

from __future__ import annotations

import math
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
    x: NDArray[Any],
    feature_bounds: Sequence[float],
    weight_scale: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[NDArray[Any], dict[str, float]]:
    """A site's noised statistics vector for the encrypted statistics step, and what was clipped.

    Values are scaled by their public bound into z in [-1, 1] (beyond it they are clipped); each
    row contributes ``(z, z²)`` per feature (averaged over the pixels of an image, per channel),
    scaled down to L2 norm ``clip_norm`` if it is longer, as DP-SGD clips a gradient. The sum
    over rows, divided by S, has entries within [-1, 1] whatever the site's size (the packed
    codec's range), and adding or removing one row moves it by at most ``clip_norm / S``:
    Gaussian noise of ``noise_multiplier`` times that makes it a Gaussian mechanism the site's
    ledger charges. The count needs no noise: n_k is sent in the clear with every upload.
    """
    if x.ndim not in (2, 4) or x.shape[0] == 0:
        raise InvalidRequest(f"statistics need rows x features or rows x H x W x C, not shape {x.shape}")
    bounds = np.asarray(feature_bounds, dtype=np.float64)
    values = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1, x.shape[-1])
    if values.shape[2] != bounds.size:
        raise InvalidRequest(f"the data has {values.shape[2]} features (channels), the job bounds {bounds.size}")
    scaled = values / bounds
    clipped = float(np.mean(np.abs(scaled) > 1.0))
    z = np.clip(scaled, -1.0, 1.0)
    rows = np.concatenate([z.mean(axis=1), np.square(z).mean(axis=1)], axis=1)
    norms = np.linalg.norm(rows, axis=1)
    rows *= np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))[:, None]
    vector = rows.sum(axis=0) / weight_scale
    noised = vector + rng.normal(0.0, noise_multiplier * clip_norm / weight_scale, vector.size)
    return noised, {"clipped_fraction": clipped, "rows_clipped_fraction": float(np.mean(norms > clip_norm))}


@dataclass(frozen=True)
class StatisticsNoise:
    """What the sum of the sites' statistics vectors is made of, beyond the data: how many
    noised vectors, their noise and clip norm, and S; all public, so every site can tell how
    precise the pooled variance is."""

    num_inputs: int
    noise_multiplier: float
    clip_norm: float


def normalisation_from_sum(
    summed: NDArray[Any], feature_bounds: Sequence[float], total_samples: int, weight_scale: int, noise: StatisticsNoise
) -> InputNormalisation:
    """The pooled mean and std from the decrypted sum of the sites' ``statistics_upload`` vectors,
    for ``total_samples`` = Σ n_k rows.

    A variance below the noise's own standard deviation cannot be told from zero: it is raised
    to that level, so a noisy estimate never scales a feature up by orders of magnitude.
    """
    bounds = np.asarray(feature_bounds, dtype=np.float64)
    vector = np.asarray(summed, dtype=np.float64)
    if vector.size != 2 * bounds.size or total_samples <= 0:
        raise InvalidRequest("the pooled statistics do not match the job's features or cover no rows")
    rows = total_samples / weight_scale
    mean_z = vector[: bounds.size] / rows
    floor = noise.noise_multiplier * noise.clip_norm * math.sqrt(noise.num_inputs) / total_samples
    variance = np.maximum(vector[bounds.size :] / rows - mean_z**2, floor) * bounds**2
    std = np.sqrt(variance)
    return InputNormalisation(mean=(mean_z * bounds).tolist(), std=np.where(std > _MIN_STD, std, 1.0).tolist())
