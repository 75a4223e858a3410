"""DP-SGD training on a Keras model built from a spec (real TensorFlow, tensorflow-privacy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.training import (
    DPTrainingPath,
    build_dp_model,
    build_model,
    choose_dp_path,
    evaluate,
    train_dp_sgd,
)
from fedhe.datasets import Dataset, load_bundled, split
from fedhe.errors import InvalidRequest
from fedhe.modelspec import InputNormalisation, ModelSpec, flatten_weights, unflatten_weights
from fedhe.privacy import DPSettings


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


def _dp(*, clip: float, noise: float, microbatches: int) -> DPSettings:
    """DP settings that may go below the schema's noise minimum (for checking the mechanism)."""
    return DPSettings.model_construct(
        l2_norm_clip=clip, noise_multiplier=noise, num_microbatches=microbatches, delta=1e-5
    )


def _toy_batch(rows: int, spec: ModelSpec, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, spec.input_dim)) * 3
    return Dataset(x, rng.integers(0, spec.num_classes, size=rows))


def _clipped_mean_gradient(
    spec: ModelSpec, weights: NDArray[Any], batch: Dataset, *, clip: float, microbatches: int
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Reference DP-SGD gradient without noise, one microbatch at a time with a plain GradientTape.

    Returns the mean of the clipped microbatch gradients and the unclipped gradient norms.
    """
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    size = len(batch) // microbatches
    clipped, norms = [], []
    for j in range(microbatches):
        x = batch.x[j * size : (j + 1) * size].astype(np.float32)
        with tf.GradientTape() as tape:
            value = loss(batch.y[j * size : (j + 1) * size], model(x))
        grad = flatten_weights([g.numpy() for g in tape.gradient(value, model.trainable_variables)])
        norms.append(float(np.linalg.norm(grad)))
        clipped.append(grad / max(1.0, norms[-1] / clip))
    return np.mean(clipped, axis=0), np.array(norms)


def test_every_mlp_trains_on_the_fast_clipping_path() -> None:
    spec = ModelSpec(input_dim=30, hidden_units=[16], num_classes=2)
    for microbatches, batch_size in ((32, 32), (16, 32), (1, 8)):
        dp = DPSettings(num_microbatches=microbatches)
        assert choose_dp_path(spec, dp, batch_size) is DPTrainingPath.FAST_CLIPPING


@pytest.mark.parametrize("microbatches", [16, 4])
def test_every_path_takes_the_same_clipped_step(microbatches: int) -> None:
    """One noiseless step on one fixed batch: each path's update is lr x the reference clipped mean."""
    spec = ModelSpec(input_dim=12, hidden_units=[8, 5], num_classes=3)
    start = flatten_weights(spec.initial_weights(1))
    batch = _toy_batch(16, spec)
    clip = 0.05
    expected, norms = _clipped_mean_gradient(spec, start, batch, clip=clip, microbatches=microbatches)
    assert norms.min() > 10 * clip  # every microbatch gradient really is clipped
    for path in DPTrainingPath:
        model = build_dp_model(
            spec,
            start,
            dp=_dp(clip=clip, noise=0.0, microbatches=microbatches),
            batch_size=16,
            learning_rate=1.0,
            path=path,
        )
        model.fit(batch.x.astype(np.float32), batch.y, batch_size=16, shuffle=False, epochs=1, verbose=0)
        update = start - flatten_weights(model.get_weights())
        np.testing.assert_allclose(update, expected, atol=1e-6, err_msg=path.value)
        assert [w.shape for w in model.get_weights()] == spec.weight_shapes()


@pytest.mark.parametrize("microbatches", [32, 8])
def test_dp_sgd_step_is_bounded_by_learning_rate_times_clip(microbatches: int) -> None:
    """A huge learning rate cannot move the weights further than lr x clip in one (noise-free) step."""
    spec = ModelSpec(input_dim=12, hidden_units=[8], num_classes=3)
    start = flatten_weights(spec.initial_weights(2))
    batch = _toy_batch(32, spec, seed=1)
    clip, learning_rate = 0.01, 1000.0
    _, norms = _clipped_mean_gradient(spec, start, batch, clip=clip, microbatches=1)
    result = train_dp_sgd(
        spec,
        start,
        batch,
        dp=_dp(clip=clip, noise=1e-9, microbatches=microbatches),
        epochs=1,
        batch_size=32,
        learning_rate=learning_rate,
        seed=0,
    )
    assert result.training.steps == 1
    step = np.linalg.norm(result.weights - start)
    assert 0 < step <= learning_rate * clip * (1 + 1e-5)
    assert learning_rate * norms[0] > 100 * step  # unclipped SGD would have moved 100x further


@pytest.mark.parametrize("microbatches", [64, 16])
def test_dp_sgd_noise_has_std_clip_times_multiplier_over_microbatches(microbatches: int) -> None:
    spec = ModelSpec(input_dim=40, hidden_units=[50], num_classes=10)
    start = flatten_weights(spec.initial_weights(3))
    batch = _toy_batch(64, spec, seed=2)
    clip, sigma, learning_rate = 0.5, 2.0, 1.0

    def one_step(noise: float) -> NDArray[Any]:
        return train_dp_sgd(
            spec,
            start,
            batch,
            dp=_dp(clip=clip, noise=noise, microbatches=microbatches),
            epochs=1,
            batch_size=64,
            learning_rate=learning_rate,
            seed=7,
        ).weights

    noise = one_step(1e-9) - one_step(sigma)  # same seed, so the same shuffle and microbatches
    assert noise.size == spec.num_parameters() == 2560
    assert noise.std() == pytest.approx(learning_rate * clip * sigma / microbatches, rel=0.06)
    assert abs(noise.mean()) < 4 * noise.std() / np.sqrt(noise.size)


@pytest.mark.parametrize("microbatches", [16, 32])
def test_dp_sgd_learns_breast_cancer(microbatches: int) -> None:
    train, test = split(load_bundled("breast_cancer"), 0.25, seed=0)
    spec = _spec(train.x)
    start = flatten_weights(spec.initial_weights(0))
    before = evaluate(spec, start, test)["accuracy"]
    result = train_dp_sgd(
        spec,
        start,
        train,
        dp=DPSettings(l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=microbatches),
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
    assert result.training.noise_multiplier == 1.0
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
            dp=DPSettings(num_microbatches=16),
            epochs=1,
            batch_size=16,
            learning_rate=0.1,
            seed=0,
        )
