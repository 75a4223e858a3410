"""Per-site metrics, their sample-weighted combination, and server momentum."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aggregator.site_metrics import combine_metrics
from client_agent.evaluation import metrics_from_logits
from client_agent.server_momentum import apply_server_momentum, initial_state
from fedhe.errors import InvalidRequest


def test_binary_metrics_match_their_definitions() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.5], [0.0, 0.2]])  # predicts 0, 1, 1, 1, 1
    m = metrics_from_logits(labels, logits)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: precision 1, recall 1/3, F1 1/2; class 1: precision 1/2, recall 1, F1 2/3 (macro averages)
    assert m["precision"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["recall"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    p1 = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["loss"] == pytest.approx(-np.mean(np.log(np.where(labels == 1, p1, 1 - p1))))


def test_multiclass_auc_is_one_vs_rest_over_present_classes_and_absent_when_undefined() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 2, 2, 2, 0])  # class 1 never occurs at this site
    logits = rng.normal(size=(6, 3))
    m = metrics_from_logits(labels, logits)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 2)])
    assert m["roc_auc"] == pytest.approx(expected)
    only_one = metrics_from_logits(np.array([1, 1]), logits[:2])
    assert "roc_auc" not in only_one
    assert all(np.isfinite(v) for v in only_one.values())


def test_sites_combine_weighted_by_examples_and_missing_metrics_average_over_reporters() -> None:
    combined = combine_metrics(
        [({"accuracy": 0.9, "roc_auc": 0.8}, 100), ({"accuracy": 0.6}, 50), ({"accuracy": 0.0, "roc_auc": 0.5}, 0)]
    )
    assert combined["accuracy"] == pytest.approx((0.9 * 100 + 0.6 * 50) / 150)
    assert combined["roc_auc"] == pytest.approx(0.8)
    assert combine_metrics([]) == {}
    with pytest.raises(InvalidRequest):
        combine_metrics([({"accuracy": 1.0}, -1)])


def test_server_momentum_is_fedavg_at_zero_and_accumulates_otherwise() -> None:
    start = initial_state(np.array([1.0, 2.0]))
    average = np.array([0.0, 3.0])
    mean_update = average - start.weights
    plain = apply_server_momentum(start, mean_update, momentum=0.0, server_learning_rate=1.0)
    np.testing.assert_array_equal(plain.weights, average)
    one = apply_server_momentum(start, mean_update, momentum=0.9, server_learning_rate=0.5)
    np.testing.assert_allclose(one.weights, [0.5, 2.5])
    two = apply_server_momentum(one, np.array([1.0, 1.0]), momentum=0.9, server_learning_rate=0.5)
    np.testing.assert_allclose(two.velocity, 0.9 * np.array([-1.0, 1.0]) + 1.0)
    np.testing.assert_allclose(two.weights, one.weights + 0.5 * two.velocity)
    again = apply_server_momentum(one, np.array([1.0, 1.0]), momentum=0.9, server_learning_rate=0.5)
    assert again.weights.tobytes() == two.weights.tobytes()  # bit-identical at every site
    with pytest.raises(InvalidRequest):
        apply_server_momentum(start, mean_update, momentum=1.0, server_learning_rate=1.0)
    with pytest.raises(InvalidRequest):
        apply_server_momentum(start, np.zeros(3), momentum=0.5, server_learning_rate=1.0)


def test_a_diverged_model_is_named_as_such_not_left_to_a_library_error() -> None:
    logits = np.array([[0.0, 1.0], [np.nan, 0.0], [2.0, -np.inf]])
    with pytest.raises(InvalidRequest, match="not finite numbers: its training diverged") as caught:
        metrics_from_logits(np.array([1, 0, 0]), logits)
    assert caught.value.code == "model_diverged"
