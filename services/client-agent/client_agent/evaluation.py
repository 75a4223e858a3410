"""Scoring a model on a site's data, and combining the sites' scores.

Per site: ``loss`` (mean cross-entropy), ``accuracy``, and macro ``precision``, ``recall``,
``f1`` and ``roc_auc``. Macro averages run over the classes present at the site (in its
labels or its predictions), so a site that never sees a class is not scored on it: a class
that is neither true nor predicted anywhere at a site has no precision or recall there.

ROC AUC: binary, the positive class's probability; multi-class, one-vs-rest macro over the
classes present in the site's labels (each needs positives and negatives). With a single
class present it is undefined and **left out** of the site's metrics (metrics must be finite
numbers on the wire), and ``aggregator.site_metrics.combine_metrics`` then averages it over the sites that have it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from client_agent.datasets import Dataset
from client_agent.training import load_model
from fedhe.errors import InvalidRequest
from fedhe.modelspec import ModelSpec

_PREDICT_BATCH = 256


def _probabilities(logits: NDArray[Any]) -> NDArray[Any]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: NDArray[Any] = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def _roc_auc(labels: NDArray[Any], probabilities: NDArray[Any]) -> float | None:
    present = np.unique(labels)
    if present.size < 2:
        return None
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in present]))


def metrics_from_logits(labels: NDArray[Any], logits: NDArray[Any]) -> dict[str, float]:
    """Every metric of the module docstring from true labels and the model's logits."""
    if labels.size == 0:
        raise InvalidRequest("cannot evaluate on no examples")
    logits = np.asarray(logits, dtype=np.float64)
    if not np.all(np.isfinite(logits)):
        raise InvalidRequest(
            "the model's outputs are not finite numbers: its training diverged (lower the job's learning_rate)",
            code="model_diverged",
        )
    predicted = logits.argmax(axis=1)
    probabilities = _probabilities(logits)
    loss = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy().mean()
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    metrics = {
        "loss": float(loss),
        "accuracy": float((predicted == labels).mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    auc = _roc_auc(labels, probabilities)
    if auc is not None:
        metrics["roc_auc"] = auc
    return metrics


def evaluate_model(model: tf.keras.Model, data: Dataset) -> dict[str, float]:
    """Metrics of a Keras model (outputting logits) on ``data``."""
    # Called batch by batch rather than through Model.predict, whose per-call set-up (a data
    # adapter, a traced function per new model) cost ten times the forward pass on a site's
    # validation rows, on the path between two rounds.
    x = np.asarray(data.x, dtype=np.float32)
    logits = np.concatenate(
        [model(x[start : start + _PREDICT_BATCH], training=False).numpy() for start in range(0, len(x), _PREDICT_BATCH)]
    )
    return metrics_from_logits(data.y, logits)


def evaluate(
    spec: ModelSpec, weights: NDArray[Any], data: Dataset, *, custom_modules: Collection[str] = ()
) -> dict[str, float]:
    """Metrics of the flat ``weights`` of ``spec``'s model on ``data``."""
    return evaluate_model(load_model(spec, weights, custom_modules=custom_modules), data)
