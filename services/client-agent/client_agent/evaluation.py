"""Scoring a model on a site's data."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from sklearn.metrics import f1_score, recall_score

from client_agent.training import load_model
from fedhe.datasets import Dataset
from fedhe.modelspec import ModelSpec


def evaluate(
    spec: ModelSpec, weights: NDArray[Any], data: Dataset, *, custom_modules: Collection[str] = ()
) -> dict[str, float]:
    """Loss, accuracy, macro recall and macro F1 of ``weights`` on ``data``."""
    model = load_model(spec, weights, custom_modules=custom_modules)
    logits = model.predict(np.asarray(data.x, dtype=np.float32), batch_size=256, verbose=0)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(data.y, logits).numpy()
    predicted = logits.argmax(axis=1)
    return {
        "loss": float(loss),
        "accuracy": float((predicted == data.y).mean()),
        "recall": float(recall_score(data.y, predicted, average="macro", zero_division=0)),
        "f1": float(f1_score(data.y, predicted, average="macro", zero_division=0)),
    }
