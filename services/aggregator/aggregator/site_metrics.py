"""Combining the plaintext metrics sites report into one figure per round (no TensorFlow).

Sites score each published model on their own validation split and send numbers only; the
aggregator shows their sample-weighted mean, and the in-process simulation uses the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedhe.errors import InvalidRequest


def combine_metrics(per_site: Iterable[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the sites reporting it: Σ n_k m_k / Σ n_k.

    This weights sites as FedAvg does; for accuracy and loss it equals the pooled value, for
    macro scores it is the weighted mean of the sites' macro scores, not a pooled macro score.
    """
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, examples in per_site:
        if examples < 0:
            raise InvalidRequest("a site cannot report a negative number of examples")
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + examples * value
            weights[name] = weights.get(name, 0) + examples
    return {name: totals[name] / weights[name] for name in sorted(totals) if weights[name] > 0}
