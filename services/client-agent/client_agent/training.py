"""Local training with DP-SGD (tensorflow-privacy) and evaluation, on Keras models from a spec."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from sklearn.metrics import f1_score, recall_score
from tensorflow_privacy import DPKerasSGDOptimizer, DPModel, VectorizedDPKerasSGDOptimizer
from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import make_default_layer_registry

from fedhe.datasets import Dataset
from fedhe.errors import InvalidRequest
from fedhe.modelspec import ModelSpec, flatten_weights, unflatten_weights
from fedhe.privacy import DPSettings, TrainingPass


def build_model(spec: ModelSpec) -> tf.keras.Model:
    """The Keras model a spec describes (outputs logits)."""
    layers: list[tf.keras.layers.Layer] = [tf.keras.layers.Input(shape=(spec.input_dim,))]
    layers += [tf.keras.layers.Dense(units, activation=spec.activation) for units in spec.hidden_units]
    layers.append(tf.keras.layers.Dense(spec.num_classes))
    model = tf.keras.Sequential(layers)
    shapes = [tuple(w.shape) for w in model.get_weights()]
    if shapes != spec.weight_shapes():
        raise InvalidRequest(f"Keras built weight shapes {shapes}, the spec says {spec.weight_shapes()}")
    return model


def normalise(spec: ModelSpec, x: NDArray[Any]) -> NDArray[Any]:
    """Apply the federation's agreed input scaling."""
    if x.shape[1] != spec.input_dim:
        raise InvalidRequest(f"data has {x.shape[1]} features, the model expects {spec.input_dim}")
    if spec.normalisation is None:
        return x
    scaled: NDArray[Any] = (x - np.asarray(spec.normalisation.mean)) / np.asarray(spec.normalisation.std)
    return scaled


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced."""

    weights: NDArray[Any]
    num_samples: int
    training: TrainingPass
    train_loss: float
    seconds: float


def evaluate(spec: ModelSpec, weights: NDArray[Any], data: Dataset) -> dict[str, float]:
    """Loss, accuracy, macro recall and macro F1 of ``weights`` on ``data``."""
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    x = normalise(spec, data.x)
    logits = model(x, training=False).numpy()
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(data.y, logits).numpy()
    predicted = logits.argmax(axis=1)
    return {
        "loss": float(loss),
        "accuracy": float((predicted == data.y).mean()),
        "recall": float(recall_score(data.y, predicted, average="macro", zero_division=0)),
        "f1": float(f1_score(data.y, predicted, average="macro", zero_division=0)),
    }


class DPTrainingPath(enum.StrEnum):
    """How a DP-SGD step computes its clipped, noised gradient (all three are the same mechanism).

    Every path clips each microbatch's gradient (a microbatch is one example when
    ``num_microbatches == batch_size``) to L2 norm ``l2_norm_clip``, sums them, adds Gaussian
    noise of std ``l2_norm_clip * noise_multiplier`` and divides by ``num_microbatches``. They
    differ only in how the per-microbatch gradient norms are obtained:

    ``FAST_CLIPPING``
        tensorflow-privacy's ``DPModel`` with a layer registry ("ghost" / fast gradient clipping,
        Goodfellow 2015, arXiv:1510.01799; Lee & Kifer 2020, arXiv:2009.03106): one ordinary
        forward and backward pass yields every per-example (or per-microbatch) gradient norm
        from each Dense layer's inputs and output gradients, without materialising per-example
        gradients; a second pass over the loss reweighted by the clip factors yields the sum of
        the clipped gradients. Needs every trainable layer in the registry (Dense and Embedding
        in 0.9.0) and a functional/Sequential model.
    ``VECTORIZED``
        ``VectorizedDPKerasSGDOptimizer``: per-microbatch gradients as a Jacobian
        (``tape.jacobian``, pfor-vectorised), clipped with ``tf.vectorized_map``. Works for any
        layer, but materialises ``num_microbatches x num_parameters`` gradients.
    ``MICROBATCH_LOOP``
        ``DPKerasSGDOptimizer``, the previous implementation: the same Jacobian, then a
        ``tf.while_loop`` over microbatches through a ``GaussianSumQuery``. Kept as the reference
        the benchmark (``bench/dp_speed.py``) and the tests compare against.
    """

    FAST_CLIPPING = "fast_clipping"
    VECTORIZED = "vectorized"
    MICROBATCH_LOOP = "microbatch_loop"


# Architectures whose trainable layers are all in tensorflow-privacy's default layer registry:
# an "mlp" spec is Dense layers only (build_model), and Dense has a fast-clipping rule.
_FAST_CLIPPING_ARCHITECTURES = frozenset({"mlp"})

# XLA-compile the fast-clipping train step (DPModel's ``use_xla``)? No: on CPU it saved at most
# a fraction of a millisecond per step on our MLPs (bench/dp_speed.py), but the compile costs
# 1-7 s, paid every round because each round builds a fresh model; a round is ~10-100 steps.
_FAST_CLIPPING_XLA = False


def choose_dp_path(spec: ModelSpec, dp: DPSettings, batch_size: int) -> DPTrainingPath:
    """The fastest DP-SGD path that computes exactly the mechanism ``dp`` describes for ``spec``.

    * Fast gradient clipping (``DPModel`` + layer registry) whenever every trainable layer of the
      model has a registry rule, i.e. for every "mlp" spec (Dense layers only). Its cost is about
      two ordinary forward/backward passes, independent of how many examples or microbatches
      are clipped, where the optimizer paths back-propagate once per microbatch. In
      ``bench/dp_speed.py`` (2-core CPU) it costs 1.2-2x a non-DP step against 3-90x for the
      previous microbatch loop and 1.7-90x for the vectorised optimizer with per-example
      clipping, and it is never slower per step than either with 16 microbatches (tied on the
      tiny models, 2-3x faster on 784-256-10). It serves per-example clipping
      (``num_microbatches == batch_size``, run with ``num_microbatches=None``) and microbatch
      clipping (the loss is sparse categorical cross-entropy averaged over each microbatch,
      which is what tensorflow-privacy's microbatched fast clipping assumes; the unit tests
      check it against a microbatch-by-microbatch reference).
    * Otherwise (a future architecture with a layer the registry lacks) the vectorised optimizer,
      which handles any layer and, per example, is up to 2.5x faster than the microbatch loop on
      the small models (on par with it on 784-256-10).

    ``dp`` and ``batch_size`` do not change the choice today; they are part of the signature
    because the microbatch geometry is what would (the vectorised path's cost grows with the
    number of microbatches, the fast path's barely does).
    """
    del dp, batch_size
    if spec.architecture in _FAST_CLIPPING_ARCHITECTURES:
        return DPTrainingPath.FAST_CLIPPING
    return DPTrainingPath.VECTORIZED


def build_dp_model(
    spec: ModelSpec,
    weights: NDArray[Any],
    *,
    dp: DPSettings,
    batch_size: int,
    learning_rate: float,
    path: DPTrainingPath,
    xla: bool = _FAST_CLIPPING_XLA,
) -> tf.keras.Model:
    """``build_model(spec)`` loaded with ``weights`` and compiled to train with DP-SGD via ``path``.

    The returned model's ``get_weights()`` has the order of ``spec.weight_shapes()`` on every
    path (the fast path wraps the very layers ``build_model`` made in a functional ``DPModel``).
    ``xla`` only affects ``FAST_CLIPPING`` (the benchmark compares both settings).
    """
    if batch_size % dp.num_microbatches != 0:
        raise InvalidRequest("batch_size must be a multiple of num_microbatches")
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    if path is DPTrainingPath.FAST_CLIPPING:
        dp_model = DPModel(
            l2_norm_clip=dp.l2_norm_clip,
            noise_multiplier=dp.noise_multiplier,
            # None means one microbatch per example; it also lets the Dense rule use its
            # cheaper row-norm formula instead of per-microbatch Gram matrices.
            num_microbatches=None if dp.num_microbatches == batch_size else dp.num_microbatches,
            use_xla=xla,
            layer_registry=make_default_layer_registry(),
            inputs=model.inputs,
            outputs=model.outputs,
        )
        # DPModel silently falls back to its own per-example vectorized_map when a layer is not
        # registered; that would still be DP but not the path we chose, so fail loudly instead.
        if not dp_model._enable_fast_peg_computation:  # private: 0.9.0 has no public accessor
            raise RuntimeError(f"fast gradient clipping is not available for {spec.architecture!r}")
        # A *reduced* (mean) loss: DPModel re-derives the per-example loss itself, then weights
        # each example's (or microbatch's) loss by its clip factor and adds noise / num_microbatches.
        dp_model.compile(
            optimizer=tf.keras.optimizers.legacy.SGD(learning_rate=learning_rate),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return dp_model
    optimizer_class = VectorizedDPKerasSGDOptimizer if path is DPTrainingPath.VECTORIZED else DPKerasSGDOptimizer
    optimizer = optimizer_class(
        l2_norm_clip=dp.l2_norm_clip,
        noise_multiplier=dp.noise_multiplier,
        num_microbatches=dp.num_microbatches,
        learning_rate=learning_rate,
    )
    # Per-example losses: the DP optimizer clips and noises per microbatch itself.
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    model.compile(optimizer=optimizer, loss=loss)
    return model


def train_dp_sgd(
    spec: ModelSpec,
    weights: NDArray[Any],
    data: Dataset,
    *,
    dp: DPSettings,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> TrainResult:
    """Train from ``weights`` with DP-SGD; every batch is full (a multiple of the microbatches).

    The step runs on the path ``choose_dp_path`` picks (fast gradient clipping for every MLP);
    whichever it is, each step clips per microbatch to ``dp.l2_norm_clip``, adds Gaussian noise
    of std ``dp.l2_norm_clip * dp.noise_multiplier`` to the sum and divides by the number of
    microbatches, so the privacy accounting below is the same for every path.
    """
    if batch_size % dp.num_microbatches != 0:
        raise InvalidRequest("batch_size must be a multiple of num_microbatches")
    steps_per_epoch = len(data) // batch_size
    if steps_per_epoch == 0:
        raise InvalidRequest(f"site has {len(data)} training rows, fewer than one batch of {batch_size}")
    started = time.perf_counter()
    tf.keras.utils.set_random_seed(seed)
    model = build_dp_model(
        spec,
        weights,
        dp=dp,
        batch_size=batch_size,
        learning_rate=learning_rate,
        path=choose_dp_path(spec, dp, batch_size),
    )
    batches = (
        tf.data.Dataset.from_tensor_slices((normalise(spec, data.x).astype(np.float32), data.y))
        .shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
    )
    history = model.fit(batches, epochs=epochs, verbose=0)
    return TrainResult(
        weights=flatten_weights(model.get_weights()),
        num_samples=len(data),
        training=TrainingPass(
            sampling_probability=batch_size / len(data),
            noise_multiplier=dp.noise_multiplier,
            steps=epochs * steps_per_epoch,
        ),
        train_loss=float(history.history["loss"][-1]),
        seconds=time.perf_counter() - started,
    )


def export_model(spec: ModelSpec, weights: NDArray[Any], path: Path) -> Path:
    """Save the model as a Keras file (with a softmax head so it outputs probabilities)."""
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    exported = tf.keras.Sequential([model, tf.keras.layers.Softmax()])
    path.parent.mkdir(parents=True, exist_ok=True)
    exported.save(path)
    return path
