"""DP-SGD training on a Keras model built from a spec (real TensorFlow, tensorflow-privacy)."""

from __future__ import annotations

import numpy as np
import pytest

from client_agent.training import build_model, evaluate, train_dp_sgd
from fedhe.datasets import load_bundled, split
from fedhe.errors import InvalidRequest
from fedhe.modelspec import InputNormalisation, ModelSpec, flatten_weights
from fedhe.privacy import DPSettings


def _spec(x: np.ndarray) -> ModelSpec:
    return ModelSpec(
        input_dim=x.shape[1],
        hidden_units=[8],
        num_classes=2,
        normalisation=InputNormalisation(mean=x.mean(0).tolist(), std=x.std(0).tolist()),
    )


def test_numpy_initial_weights_fit_the_keras_model() -> None:
    spec = ModelSpec(input_dim=5, hidden_units=[4, 3], num_classes=3)
    model = build_model(spec)
    assert [w.shape for w in model.get_weights()] == spec.weight_shapes()
    assert flatten_weights(spec.initial_weights(0)).size == spec.num_parameters() == model.count_params()


def test_dp_sgd_learns_breast_cancer() -> None:
    train, test = split(load_bundled("breast_cancer"), 0.25, seed=0)
    spec = _spec(train.x)
    start = flatten_weights(spec.initial_weights(0))
    before = evaluate(spec, start, test)["accuracy"]
    result = train_dp_sgd(
        spec,
        start,
        train,
        dp=DPSettings(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=16),
        epochs=5,
        batch_size=32,
        learning_rate=0.2,
        seed=0,
    )
    after = evaluate(spec, result.weights, test)["accuracy"]
    assert after > 0.85
    assert after > before
    assert result.num_samples == len(train)
    assert result.training.steps == 5 * (len(train) // 32)
    assert result.training.sampling_probability == pytest.approx(32 / len(train))


def test_too_little_data_for_one_batch_is_a_clear_error() -> None:
    train, _ = split(load_bundled("breast_cancer"), 0.5, seed=0)
    tiny = train.subset(np.arange(10))
    spec = _spec(train.x)
    with pytest.raises(InvalidRequest, match="fewer than one batch"):
        train_dp_sgd(
            spec,
            flatten_weights(spec.initial_weights(0)),
            tiny,
            dp=DPSettings(num_microbatches=16),
            epochs=1,
            batch_size=16,
            learning_rate=0.1,
            seed=0,
        )
