"""A site's local training round and evaluation, on Keras models from a spec (DP-SGD in ``dp_sgd``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from sklearn.metrics import f1_score, recall_score

from client_agent.dp_sgd import DPParameters, DPSGDRun
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
    steps: int
    train_loss: float
    seconds: float


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    """A DP-SGD round's result, with the pass the privacy ledger must record."""

    training: TrainingPass


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


def _train(
    spec: ModelSpec,
    weights: NDArray[Any],
    data: Dataset,
    *,
    dp: DPSettings | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float,
) -> tuple[TrainResult, float]:
    """The result and q of one local run (DP when ``dp`` is given)."""
    started = time.perf_counter()
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    run = DPSGDRun(
        model,
        dp=None if dp is None else DPParameters(l2_norm_clip=dp.l2_norm_clip, noise_multiplier=dp.noise_multiplier),
        batch_size=batch_size,
        num_examples=len(data),
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
    )
    summary = run.train(normalise(spec, data.x).astype(np.float32), data.y, epochs)
    result = TrainResult(
        weights=flatten_weights(model.get_weights()),
        num_samples=len(data),
        steps=summary.steps,
        train_loss=summary.last_epoch_loss,
        seconds=time.perf_counter() - started,
    )
    return result, summary.sampling_probability


def train_dp_sgd(
    spec: ModelSpec,
    weights: NDArray[Any],
    data: Dataset,
    *,
    dp: DPSettings,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
) -> DPTrainResult:
    """One round of local DP-SGD from ``weights`` (``client_agent.dp_sgd``: Poisson batches,
    per-example clipping, noise from this run's own OS entropy); ``proximal_mu`` > 0 is FedProx.

    ``training`` in the result is exactly what ``fedhe.privacy.local_training_pass`` plans.
    """
    result, q = _train(
        spec,
        weights,
        data,
        dp=dp,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
    )
    training = TrainingPass(sampling_probability=q, noise_multiplier=dp.noise_multiplier, steps=result.steps)
    return DPTrainResult(**vars(result), training=training)


def train_non_private(
    spec: ModelSpec,
    weights: NDArray[Any],
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """The same local training without clipping or noise: for baselines, never for a site's data."""
    result, _ = _train(
        spec,
        weights,
        data,
        dp=None,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
    )
    return result


def export_model(spec: ModelSpec, weights: NDArray[Any], path: Path) -> Path:
    """Save the model as a Keras file (with a softmax head so it outputs probabilities)."""
    model = build_model(spec)
    model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
    exported = tf.keras.Sequential([model, tf.keras.layers.Softmax()])
    path.parent.mkdir(parents=True, exist_ok=True)
    exported.save(path)
    return path
