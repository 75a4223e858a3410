"""A site's local training round on the Keras model a job's spec describes (DP-SGD in ``dp_sgd``).

Weights travel as flat float64 vectors (``client_agent.models.flat_weights``); the model carries its
own input normalisation, so training and evaluation feed it the site's raw inputs.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.datasets import Dataset
from client_agent.dp_sgd import DPParameters, DPSGDRun
from client_agent.models import build_model, flat_weights, set_flat_weights
from fedhe.modelspec import ModelSpec
from fedhe.privacy import DPSettings, TrainingPass


def load_model(spec: ModelSpec, weights: NDArray[Any], *, custom_modules: Collection[str] = ()) -> tf.keras.Model:
    """``spec``'s Keras model holding the flat ``weights``."""
    model = build_model(spec, custom_modules=custom_modules)
    set_flat_weights(model, weights)
    return model


@dataclass(frozen=True)
class LocalTraining:
    """How a site trains in one round: ``proximal_mu`` > 0 is FedProx, ``momentum`` > 0 local
    heavy-ball momentum (both post-processing of DP-SGD's noisy gradients: no privacy cost).
    ``test_stream`` names the run for the test-only seed switch (``client_agent.dp_randomness``)."""

    epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float = 0.0
    momentum: float = 0.0
    custom_modules: Collection[str] = ()
    test_stream: str = ""


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


def _train(
    spec: ModelSpec, weights: NDArray[Any], data: Dataset, local: LocalTraining, dp: DPSettings | None
) -> tuple[TrainResult, float]:
    """The result and q of one local run (DP when ``dp`` is given)."""
    started = time.perf_counter()
    model = load_model(spec, weights, custom_modules=local.custom_modules)
    run = DPSGDRun(
        model,
        dp=None if dp is None else DPParameters(l2_norm_clip=dp.l2_norm_clip, noise_multiplier=dp.noise_multiplier),
        batch_size=local.batch_size,
        num_examples=len(data),
        learning_rate=local.learning_rate,
        proximal_mu=local.proximal_mu,
        momentum=local.momentum,
        test_stream=local.test_stream,
    )
    summary = run.train(np.asarray(data.x, dtype=np.float32), data.y, local.epochs)
    result = TrainResult(
        weights=flat_weights(model),
        num_samples=len(data),
        steps=summary.steps,
        train_loss=summary.last_epoch_loss,
        seconds=time.perf_counter() - started,
    )
    return result, summary.sampling_probability


def train_dp_sgd(
    spec: ModelSpec, weights: NDArray[Any], data: Dataset, local: LocalTraining, *, dp: DPSettings
) -> DPTrainResult:
    """One round of local DP-SGD from ``weights`` (``client_agent.dp_sgd``: Poisson batches,
    per-example clipping, noise from this run's own OS entropy).

    ``training`` in the result is exactly what ``fedhe.privacy.local_training_pass`` plans.
    """
    result, q = _train(spec, weights, data, local, dp)
    training = TrainingPass(sampling_probability=q, noise_multiplier=dp.noise_multiplier, steps=result.steps)
    return DPTrainResult(**vars(result), training=training)


def train_non_private(spec: ModelSpec, weights: NDArray[Any], data: Dataset, local: LocalTraining) -> TrainResult:
    """The same local training without clipping or noise: for baselines, never for a site's data."""
    result, _ = _train(spec, weights, data, local, None)
    return result
