"""A site's local training round on a Keras model built from a spec."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from client_agent.datasets import load_bundled, split
from client_agent.dp_randomness import SWITCH
from client_agent.evaluation import evaluate
from client_agent.models import build_model
from client_agent.training import LocalTraining, train_dp_sgd
from fedhe.errors import InvalidRequest
from fedhe.modelspec import InputNormalisation, ModelSpec, flatten_weights
from fedhe.privacy import DPSettings, local_training_pass


def _spec(x: NDArray[Any]) -> ModelSpec:
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


def test_dp_sgd_learns_breast_cancer_and_reports_the_planned_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH, "test-only:7")
    train, test = split(load_bundled("breast_cancer"), 0.25, seed=0)
    spec = _spec(train.x)
    start = flatten_weights(spec.initial_weights(0))
    before = evaluate(spec, start, test)["accuracy"]
    dp = DPSettings(l2_norm_clip=1.0, noise_multiplier=1.0)
    result = train_dp_sgd(spec, start, train, LocalTraining(epochs=5, batch_size=32, learning_rate=0.5), dp=dp)
    after = evaluate(spec, result.weights, test)["accuracy"]
    assert after > 0.9
    assert after > before
    assert result.num_samples == len(train)
    planned = local_training_pass(num_samples=len(train), batch_size=32, epochs=5, noise_multiplier=1.0)
    assert result.training == planned
    assert result.training.steps == 5 * round(len(train) / 32)
    assert result.training.sampling_probability == pytest.approx(32 / len(train))
    assert 0 < result.train_loss < 1.0


def test_too_little_data_for_one_batch_is_a_clear_error() -> None:
    train, _ = split(load_bundled("breast_cancer"), 0.5, seed=0)
    tiny = train.subset(np.arange(10))
    spec = _spec(train.x)
    with pytest.raises(InvalidRequest, match="fewer than one batch"):
        train_dp_sgd(
            spec,
            flatten_weights(spec.initial_weights(0)),
            tiny,
            LocalTraining(epochs=1, batch_size=16, learning_rate=0.1),
            dp=DPSettings(),
        )
