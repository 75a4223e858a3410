"""The DP-SGD mechanism: secret noise, Poisson batches, per-example clipping, FedProx, BatchNorm."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from numpy.typing import NDArray
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads

from client_agent.dp_randomness import SWITCH, draw_run_secrets
from client_agent.dp_sgd import ClippingPath, DPParameters, DPSGDRun, choose_clipping_path
from client_agent.layer_registry import fast_clipping_registry
from client_agent.models import build_model, initial_weights, set_flat_weights
from fedhe.errors import InvalidRequest
from fedhe.modelspec import ModelSpec


def _mlp(inputs: int = 12, classes: int = 3) -> tf.keras.Model:
    return tf.keras.Sequential(
        [tf.keras.layers.Input((inputs,)), tf.keras.layers.Dense(8, activation="tanh"), tf.keras.layers.Dense(classes)]
    )


def _cnn() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input((6, 6, 1)),
            tf.keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3),
        ]
    )


def _with_batch_norm() -> tf.keras.Model:
    inputs = tf.keras.layers.Input((6, 6, 1))
    hidden = tf.keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    hidden = tf.keras.layers.BatchNormalization()(hidden)
    outputs = tf.keras.layers.Dense(3)(tf.keras.layers.Flatten()(tf.keras.layers.ReLU()(hidden)))
    return tf.keras.Model(inputs, outputs)


def _with_data_statistics(model: tf.keras.Model) -> tf.keras.Model:
    """``model`` with every BatchNormalization's statistics taken from a batch of inputs and γ, β
    away from 1 and 0. Initial statistics (0 and 1) leave a MobileNet's output independent of its
    input in inference mode, so every example would have the same gradient and a norm computation
    could be wrong unnoticed."""
    rng = np.random.default_rng(7)
    batch_norms = [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in batch_norms:
        layer.momentum = 0.0  # the next training-mode pass sets the statistics to its batch's
    model(rng.normal(size=(64, *model.input_shape[1:])).astype(np.float32) * 3, training=True)
    for layer in batch_norms:
        channels = layer.moving_mean.shape
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
        if layer.center:
            layer.beta.assign(rng.normal(0, 0.3, channels))
    return model


def _strided_depthwise_cnn() -> tf.keras.Model:
    inputs = tf.keras.layers.Input((7, 7, 3))
    hidden = tf.keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2)(inputs)
    hidden = tf.keras.layers.BatchNormalization(center=False)(hidden)
    hidden = tf.keras.layers.DepthwiseConv2D(2, dilation_rate=2, use_bias=False, activation="relu")(hidden)
    hidden = tf.keras.layers.BatchNormalization(scale=False)(hidden)
    outputs = tf.keras.layers.Dense(3)(tf.keras.layers.Flatten()(hidden))
    return _with_data_statistics(tf.keras.Model(inputs, outputs))


def _channels_first_batch_norm() -> tf.keras.Model:
    inputs = tf.keras.layers.Input((6, 6, 2))
    hidden = tf.keras.layers.BatchNormalization(axis=1)(inputs)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3)(tf.keras.layers.Flatten()(hidden)))


def _zoo_model(architecture: str) -> tf.keras.Model:
    """The zoo's model as sites build it, with the job's seeded round-0 weights (so every run of
    this test sees the same network), then statistics from data."""
    spec = _zoo_spec(architecture)
    model = build_model(spec)
    set_flat_weights(model, _round_zero_weights(architecture))
    return _with_data_statistics(model)


def _zoo_spec(architecture: str) -> ModelSpec:
    return ModelSpec(architecture=architecture, input_shape=(32, 32, 3), alpha=0.35, num_classes=3)


@cache
def _round_zero_weights(architecture: str) -> NDArray[Any]:
    """Seeded weights are a pure function of the spec; measuring their statistics takes seconds."""
    weights = initial_weights(_zoo_spec(architecture), seed=3)
    weights.flags.writeable = False
    return weights


def _mobilenet_v2() -> tf.keras.Model:
    return _zoo_model("mobilenet_v2")


def _mobilenet_v3_small() -> tf.keras.Model:
    return _zoo_model("mobilenet_v3_small")


def _flat(model: tf.keras.Model) -> NDArray[Any]:
    return np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float64)


def _data(model: tf.keras.Model, rows: int, seed: int = 0) -> tuple[NDArray[Any], NDArray[Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, *model.input_shape[1:])).astype(np.float32) * 3
    return x, rng.integers(0, model.output_shape[-1], size=rows)


def _reference_clipped_sum(model: tf.keras.Model, x: NDArray[Any], y: NDArray[Any], clip: float) -> NDArray[Any]:
    """Σ of per-example gradients clipped to ``clip``, one example at a time with a plain tape."""
    total = np.zeros(sum(int(np.prod(v.shape)) for v in model.trainable_variables))
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            logits = model(x[i : i + 1], training=False)
            loss = tf.keras.losses.sparse_categorical_crossentropy(y[i : i + 1], logits, from_logits=True)[0]
        grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)])
        total += grad * min(1.0, clip / np.linalg.norm(grad))
    return total


@pytest.fixture
def test_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH, "test-only:1234")


def _strided_cnn() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input((7, 7, 2)),
            tf.keras.layers.Conv2D(3, (3, 2), strides=2, padding="valid", activation="relu"),
            tf.keras.layers.Conv2D(2, 2, dilation_rate=2, padding="same", use_bias=False),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3),
        ]
    )


def _grouped_cnn() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input((6, 6, 2)),
            tf.keras.layers.Conv2D(4, 3, groups=2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3),
        ]
    )


def _depthwise_cnn() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input((6, 6, 2)),
            tf.keras.layers.DepthwiseConv2D(3, activation="tanh"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3),
        ]
    )


def test_paths_follow_the_layer_registry() -> None:
    assert choose_clipping_path(_mlp()) is ClippingPath.FAST
    assert choose_clipping_path(_cnn()) is ClippingPath.FAST
    assert choose_clipping_path(_strided_cnn()) is ClippingPath.FAST
    assert choose_clipping_path(_depthwise_cnn()) is ClippingPath.FAST
    assert choose_clipping_path(_with_batch_norm()) is ClippingPath.FAST
    assert choose_clipping_path(_strided_depthwise_cnn()) is ClippingPath.FAST
    assert choose_clipping_path(_mobilenet_v2()) is ClippingPath.FAST
    assert choose_clipping_path(_mobilenet_v3_small()) is ClippingPath.FAST
    assert choose_clipping_path(_grouped_cnn()) is ClippingPath.VECTORIZED
    assert choose_clipping_path(_channels_first_batch_norm()) is ClippingPath.VECTORIZED


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (_mlp, ClippingPath.FAST),
        (_cnn, ClippingPath.FAST),
        (_strided_cnn, ClippingPath.FAST),
        (_depthwise_cnn, ClippingPath.FAST),
        (_with_batch_norm, ClippingPath.FAST),
        (_strided_depthwise_cnn, ClippingPath.FAST),
        (_mobilenet_v2, ClippingPath.FAST),
        (_mobilenet_v3_small, ClippingPath.FAST),
        (_grouped_cnn, ClippingPath.VECTORIZED),
        (_channels_first_batch_norm, ClippingPath.VECTORIZED),
    ],
    ids=[
        "dense",
        "conv",
        "strided_conv",
        "depthwise",
        "batch_norm",
        "strided_dilated_depthwise_and_batch_norm",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "vectorized_grouped_conv",
        "vectorized_channels_first_batch_norm",
    ],
)
def test_a_noiseless_step_is_the_clipped_sum_over_the_expected_batch(make: Any, path: ClippingPath) -> None:
    """At C = 0.05 nearly every example is clipped (a MobileNet row the model already predicts
    confidently may not be), so a wrong per-example norm on either path shows as a wrong step;
    the norms themselves are checked row by row in the next test."""
    model = make()
    x, y = _data(model, 6)  # the reference takes one eager gradient per row
    clip, lr, batch, n = 0.05, 1.0, 8, 40
    expected = _reference_clipped_sum(model, x, y, clip)
    before = _trainable(model)
    run = DPSGDRun(model, dp=DPParameters(clip, 0.0), batch_size=batch, num_examples=n, learning_rate=lr)
    assert run.path is path
    run.step(x, y)
    np.testing.assert_allclose(before - _trainable(model), lr * expected / batch, atol=1e-6)


def _loss(labels: Any, logits: tf.Tensor) -> tf.Tensor:
    return tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


@pytest.mark.parametrize(
    "make",
    [_cnn, _with_batch_norm, _strided_depthwise_cnn, _mobilenet_v2, _mobilenet_v3_small],
    ids=["conv", "batch_norm", "strided_dilated_depthwise_and_batch_norm", "mobilenet_v2", "mobilenet_v3_small"],
)
def test_fast_path_norms_are_each_rows_own_gradient_norm(make: Any) -> None:
    """The registry's per-row norms against one-row-at-a-time gradients. A large model's step
    coordinates are each far below the step test's tolerance; its norms are not."""
    model = make()
    x, y = _data(model, 8, seed=2)
    reference = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = _loss(y[i : i + 1], model(x[i : i + 1], training=False))[0]
        gradients = tape.gradient(loss, model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        reference.append(np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in gradients)))
    norms = clip_grads.compute_gradient_norms(
        model,
        fast_clipping_registry(),
        x,
        y,
        per_example_loss_fn=lambda labels, logits, _: _loss(labels, logits),
        trainable_vars=model.trainable_variables,
    )
    assert np.ptp(reference) > 0.1 * np.max(reference)  # rows differ: the model's output depends on its input
    # float32 rounding scales with the batch's largest gradients, so a row far below them is
    # compared against those; the two computations sum in different orders, with kernels that differ
    # between CPUs (2e-4 apart on an AMD EPYC), while a layer left out or counted twice is off by far more.
    np.testing.assert_allclose(norms.numpy(), reference, rtol=1e-3, atol=1e-6 * np.max(reference))


def _trainable(model: tf.keras.Model) -> NDArray[Any]:
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).astype(np.float64)


@pytest.mark.parametrize("make", [_mlp, _cnn, _depthwise_cnn], ids=["fast_dense", "fast_conv", "vectorized"])
def test_one_example_moves_the_update_by_at_most_lr_clip_over_expected_batch(make: Any) -> None:
    """Adding an example with a huge gradient changes a noiseless step by at most lr·C/(q·n)."""
    model = make()
    x, y = _data(model, 9, seed=3)
    huge = x[:1] * 1e6
    clip, lr, batch, n = 0.1, 50.0, 8, 64
    start = model.get_weights()
    updates = []
    for xs, ys in ((x, y), (np.concatenate([x, huge]), np.concatenate([y, y[:1]]))):
        model.set_weights(start)
        DPSGDRun(model, dp=DPParameters(clip, 0.0), batch_size=batch, num_examples=n, learning_rate=lr).step(xs, ys)
        updates.append(_flat(model))
    bound = lr * clip / batch
    moved = np.linalg.norm(updates[1] - updates[0])
    assert bound * 0.5 < moved <= bound * (1 + 1e-4)


def test_batch_norm_statistics_stay_frozen_and_examples_stay_independent() -> None:
    model = _with_batch_norm()
    bn = next(layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization))
    x, y = _data(model, 16, seed=5)
    clip = 1e3  # nothing clipped: the step is then the plain sum of per-example gradients
    start = model.get_weights()
    DPSGDRun(model, dp=DPParameters(clip, 0.0), batch_size=8, num_examples=16, learning_rate=1.0).step(x, y)
    together = _flat(model)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), 1.0)
    # Example by example, summing the updates, gives the same step: no example sees another.
    deltas = []
    for i in range(len(y)):
        model.set_weights(start)
        DPSGDRun(model, dp=DPParameters(clip, 0.0), batch_size=8, num_examples=16, learning_rate=1.0).step(
            x[i : i + 1], y[i : i + 1]
        )
        deltas.append(_flat(model) - np.concatenate([w.ravel() for w in start]))
    np.testing.assert_allclose(together, np.concatenate([w.ravel() for w in start]) + np.sum(deltas, 0), atol=1e-5)


def test_noise_differs_between_runs_without_the_test_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWITCH, raising=False)
    assert not draw_run_secrets().reproducible
    x, y = _data(_mlp(), 64)
    results = []
    for _ in range(2):
        model = _mlp()
        model.set_weights(_mlp_weights())
        DPSGDRun(model, dp=DPParameters(1.0, 1.0), batch_size=16, num_examples=64, learning_rate=0.1).train(x, y, 1)
        results.append(_flat(model))
    assert np.abs(results[0] - results[1]).min() > 0  # every coordinate got different noise


def _mlp_weights() -> list[NDArray[Any]]:
    return [np.full(w.shape, 0.1, dtype=np.float32) for w in _mlp().get_weights()]


def test_the_test_seed_reproduces_noise_and_sampling(test_seed: None) -> None:
    x, y = _data(_mlp(), 64)
    results = []
    for _ in range(2):
        model = _mlp()
        model.set_weights(_mlp_weights())
        run = DPSGDRun(model, dp=DPParameters(1.0, 1.0), batch_size=16, num_examples=64, learning_rate=0.1)
        summary = run.train(x, y, 2)
        results.append((_flat(model), summary.last_epoch_loss))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert draw_run_secrets().reproducible


@pytest.mark.parametrize("value", ["1234", "test-only:", "test-only:12x", "TEST-ONLY:1", " test-only:1"])
def test_the_switch_refuses_anything_but_test_only_integer(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(SWITCH, value)
    with pytest.raises(InvalidRequest, match="test-only") as caught:
        draw_run_secrets()
    assert caught.value.code == "insecure_dp_seed_refused"


def test_secrets_print_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWITCH, raising=False)
    drawn = draw_run_secrets()
    shown = repr(drawn) + str(drawn)
    assert str(drawn.sampling_seed) not in shown
    assert all(str(word) not in shown for word in drawn.noise_state)


def test_noise_std_is_sigma_clip_over_expected_batch(test_seed: None) -> None:
    """Same seed, same batches: the difference of a noisy and a noiseless run is the noise alone.

    Tolerance 6%: the std of ~2,500 Gaussian draws is estimated to ±1.4% (one standard error).
    """
    model = tf.keras.Sequential([tf.keras.layers.Input((40,)), tf.keras.layers.Dense(50), tf.keras.layers.Dense(10)])
    x, y = _data(model, 64)
    clip, sigma, lr, batch = 0.5, 2.0, 1.0, 16
    start = model.get_weights()
    runs = []
    for noise in (sigma, 0.0):
        model.set_weights(start)
        DPSGDRun(model, dp=DPParameters(clip, noise), batch_size=batch, num_examples=64, learning_rate=lr).step(x, y)
        runs.append(_flat(model))
    noise_values = runs[1] - runs[0]
    assert noise_values.size == 2560
    assert noise_values.std() == pytest.approx(lr * sigma * clip / batch, rel=0.06)
    assert abs(noise_values.mean()) < 4 * noise_values.std() / np.sqrt(noise_values.size)


def test_poisson_batches_average_q_times_n() -> None:
    n, batch = 500, 20
    run = DPSGDRun(_mlp(), dp=DPParameters(1.0, 1.0), batch_size=batch, num_examples=n, learning_rate=0.1)
    sizes = np.array([run.poisson_batch(n).size for _ in range(4000)])
    q = batch / n
    assert abs(sizes.mean() - batch) < 4 * np.sqrt(n * q * (1 - q) / sizes.size)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)
    assert len(set(sizes.tolist())) > 10  # the batch size really varies


def test_varying_batch_sizes_trace_the_step_once() -> None:
    model = _cnn()
    x, y = _data(model, 100)
    run = DPSGDRun(model, dp=DPParameters(1.0, 1.0), batch_size=10, num_examples=100, learning_rate=0.1)
    for size in (0, 1, 7, 10, 33):
        run.step(x[:size], y[:size])
    assert run.tracing_count() == 1


def test_fedprox_pulls_towards_the_global_model_outside_clipping() -> None:
    model = _mlp()
    global_weights = model.get_weights()
    x, y = _data(model, 4)
    run = DPSGDRun(model, dp=DPParameters(1e-9, 0.0), batch_size=4, num_examples=8, learning_rate=0.1, proximal_mu=2.0)
    drift = [np.full_like(w, 0.5) for w in global_weights]
    model.set_weights([w + d for w, d in zip(global_weights, drift, strict=True)])
    run.step(x, y)
    # w' = w - lr·μ·(w - w_global): the drift shrinks by 1 - 0.1·2 (the clipped gradient is ~0).
    for after, start, d in zip(model.get_weights(), global_weights, drift, strict=True):
        np.testing.assert_allclose(after, start + 0.8 * d, atol=1e-6)


def test_a_site_needs_one_expected_batch() -> None:
    with pytest.raises(InvalidRequest, match="fewer than one batch"):
        DPSGDRun(_mlp(), dp=DPParameters(1.0, 1.0), batch_size=16, num_examples=10, learning_rate=0.1)
    with pytest.raises(InvalidRequest, match="proximal_mu"):
        DPSGDRun(_mlp(), dp=DPParameters(1.0, 1.0), batch_size=4, num_examples=10, learning_rate=0.1, proximal_mu=-1)


def test_local_momentum_accumulates_the_noisy_step() -> None:
    model = _mlp()
    global_weights = model.get_weights()
    x, y = _data(model, 4)
    lr, mu, beta, drift = 0.1, 2.0, 0.5, 0.5
    run = DPSGDRun(
        model,
        dp=DPParameters(1e-9, 0.0),
        batch_size=4,
        num_examples=8,
        learning_rate=lr,
        proximal_mu=mu,
        momentum=beta,
    )
    model.set_weights([w + drift for w in global_weights])
    run.step(x, y)
    run.step(x, y)
    # With a ~0 clipped gradient the step is the proximal term alone: g1 = μd, g2 = μd(1 - lr·μ).
    g1 = mu * drift
    after_one = drift - lr * g1
    g2 = mu * after_one
    expected = after_one - lr * (beta * g1 + g2)
    for after, start in zip(model.get_weights(), global_weights, strict=True):
        np.testing.assert_allclose(after - start, expected, atol=1e-6)
    with pytest.raises(InvalidRequest, match="momentum"):
        DPSGDRun(_mlp(), dp=DPParameters(1.0, 1.0), batch_size=4, num_examples=10, learning_rate=0.1, momentum=1.0)


def test_the_test_seed_gives_each_named_run_its_own_stream(test_seed: None) -> None:
    """Sites and rounds of a seeded test draw independent noise, as a deployment's runs do:
    one shared stream would make every site's noise identical and never average out."""
    site_a, again, site_b = (draw_run_secrets(stream) for stream in ("site0/round0", "site0/round0", "site1/round0"))
    assert (site_a.noise_state, site_a.sampling_seed) == (again.noise_state, again.sampling_seed)
    assert site_a.noise_state != site_b.noise_state
    assert site_a.sampling_seed != site_b.sampling_seed
