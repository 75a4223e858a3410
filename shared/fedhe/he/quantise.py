"""Unbiased stochastic quantisation of an update onto the packing grid, and its clipping report.

Each value x is clipped to [-R, R], scaled to v = x / R * L and rounded to floor(v) + 1 with
probability v - floor(v), else to floor(v): the expected level is exactly v, so quantisation
adds zero-mean noise of less than one step Δ = R / L per value and sums stay unbiased. ±R map
to ±L exactly (x / R is exactly ±1 there). What lies beyond ±R is clipped, which *is* biased;
``quantisation_report`` tells the caller how much was.

Rounding draws come from a fresh ``numpy.random.default_rng()`` per call, seeded from OS
entropy; a caller passes its own generator only in tests, to make a draw reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.he.packing import PackingSettings


def quantise(values: NDArray[Any], settings: PackingSettings, rng: np.random.Generator | None = None) -> NDArray[Any]:
    """Integer levels in [-L, L] whose expectation is ``values / R * L`` (after clipping)."""
    bound = settings.clip_range
    scaled = np.clip(np.asarray(values, dtype=np.float64), -bound, bound)
    scaled /= bound
    scaled *= settings.levels
    floor = np.floor(scaled)
    scaled -= floor
    draws = (rng if rng is not None else np.random.default_rng()).random(scaled.size)
    return (floor + (draws < scaled)).astype(np.int64)


def dequantise(levels: NDArray[Any], settings: PackingSettings) -> NDArray[Any]:
    """Values of (summed) integer levels: levels * R / L."""
    return np.asarray(levels, dtype=np.float64) * settings.step


def quantisation_report(values: NDArray[Any], settings: PackingSettings) -> dict[str, float]:
    """What quantising ``values`` will lose to clipping: the fraction of values beyond ±R."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    clipped = int(np.count_nonzero(np.abs(flat) > settings.clip_range))
    return {"clipped_fraction": clipped / flat.size if flat.size else 0.0}
