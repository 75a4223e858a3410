"""Pooled normalisation from per-site statistics, and the model layer that applies it."""

from __future__ import annotations

import numpy as np
import pytest

from client_agent.datasets import digits_as_images, load_bundled, partition_dirichlet
from client_agent.normalisation import FeatureStatistics, local_statistics, pooled_normalisation
from fedhe.errors import InvalidRequest


def test_pooled_statistics_equal_the_statistics_of_the_pooled_data() -> None:
    data = load_bundled("breast_cancer")
    parts = partition_dirichlet(data.y, 3, alpha=0.5, seed=0)
    sites = [local_statistics(data.x[rows]) for rows in parts]
    # What the codec does: sum the sites' vectors.
    summed = FeatureStatistics.from_vector(np.sum([s.to_vector() for s in sites], axis=0))
    pooled = pooled_normalisation(summed)
    np.testing.assert_allclose(pooled.mean, data.x.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(pooled.std, data.x.std(axis=0), rtol=1e-8)
    assert pooled_normalisation(sites) == pooled


def test_images_are_normalised_per_channel_and_constant_features_get_std_one() -> None:
    images = digits_as_images().x[:100]
    stats = local_statistics(images)
    assert stats.count == 100 * 8 * 8
    pooled = pooled_normalisation(stats)
    assert pooled.mean == pytest.approx([images.mean()])
    assert pooled.std == pytest.approx([images.std()], rel=1e-6)
    constant = pooled_normalisation(local_statistics(np.ones((5, 2))))
    assert constant.std == [1.0, 1.0]


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        local_statistics(np.ones((3, 4, 4)))
    with pytest.raises(InvalidRequest):
        FeatureStatistics.from_vector(np.ones(4))
    with pytest.raises(InvalidRequest):
        pooled_normalisation([])
