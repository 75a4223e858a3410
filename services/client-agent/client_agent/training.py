"""Local training with DP-SGD (tensorflow-privacy) and evaluation, on Keras models from a spec."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from sklearn.metrics import f1_score, recall_score
from tensorflow_privacy import DPKerasSGDOptimizer

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
    """Train from ``weights`` with DP-SGD; every batch is full (a multiple of the microbatches)."""
    if batch_size % dp.num_microbatches != 0:
        raise InvalidRequest("batch_size must be a multiple of num_microbatches")
    steps_per_epoch = len(data) // batch_size
    if steps_per_epoch == 0:
        raise InvalidRequest(f"site has {len(data)} training rows, fewer than one batch of {batch_size}")
    started = time.perf_counter()
    tf.keras.utils.set_random_seed(seed)
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    optimizer = DPKerasSGDOptimizer(
        l2_norm_clip=dp.l2_norm_clip,
        noise_multiplier=dp.noise_multiplier,
        num_microbatches=dp.num_microbatches,
        learning_rate=learning_rate,
    )
    # Per-example losses: the DP optimizer clips and noises per microbatch itself.
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    model.compile(optimizer=optimizer, loss=loss)
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
