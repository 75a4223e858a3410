"""Exporting a trained model for use outside fedhe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf
from numpy.typing import NDArray

from client_agent.training import load_model
from fedhe.modelspec import ModelSpec


def export_model(spec: ModelSpec, weights: NDArray[Any], path: Path) -> Path:
    """Save the model as a Keras file: normalisation inside, softmax output (probabilities)."""
    model = load_model(spec, weights)
    exported = tf.keras.Model(model.inputs, tf.keras.layers.Softmax()(model.outputs[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    exported.save(path)
    return path
