"""Pre-training a job's backbone offline, on public data the operator holds (never a site's).

A federation fine-tunes under DP what it could not learn from scratch under DP: the backbone
starts from weights learnt without privacy on public data. ``pretrain`` trains the job spec's
model centrally (Adam, BatchNormalization in training mode as Keras fits), then measures every
BatchNormalization layer's statistics afresh on the public data in one pass (momentum 0):
Keras' running averages, still close to their start after a few epochs, would leave a deep
network collapsed once DP-SGD runs it in inference mode. The result is a ``.keras`` file (0600)
that ``fedhe job create --initial-weights`` turns into the job's round-0 weights.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.datasets import Dataset, split
from client_agent.evaluation import evaluate
from client_agent.models import flat_weights, initial_weights, weights_sha256
from client_agent.training import load_model
from fedhe.files import write_private
from fedhe.modelspec import ModelSpec

STATISTICS_ROWS = 512
"""Public rows the final BatchNormalization statistics are measured on."""


@dataclass(frozen=True)
class Pretrained:
    """What ``pretrain`` wrote and how well the model does on held-out public rows."""

    path: Path
    weights_sha256: str
    num_parameters: int
    train_rows: int
    validation_accuracy: float


def _measure_batch_statistics(model: tf.keras.Model, x: NDArray[Any]) -> None:
    layers = [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x[:STATISTICS_ROWS], training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def pretrain(
    spec: ModelSpec,
    data: Dataset,
    out: Path,
    *,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> Pretrained:
    """Train ``spec``'s whole model on public ``data`` without privacy and write it to ``out`` (.keras)."""
    bare = spec.model_copy(update={"trainable": None, "fingerprint": None, "initial_weights_sha256": None})
    train, validation = split(data, 0.1, seed=seed)
    model = load_model(bare, initial_weights(bare, seed))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    order = np.random.default_rng(seed)  # shuffles public data; protects nothing
    x = np.asarray(train.x, dtype=np.float32)
    for _ in range(epochs):
        rows = order.permutation(len(train))
        model.fit(x[rows], train.y[rows], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    _measure_batch_statistics(model, x[order.permutation(len(train))])
    weights = flat_weights(model)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        staged = Path(scratch) / out.name
        model.save(staged)
        write_private(out, staged.read_bytes())
    return Pretrained(
        path=out,
        weights_sha256=weights_sha256(weights),
        num_parameters=weights.size,
        train_rows=len(train),
        validation_accuracy=evaluate(bare, weights, validation)["accuracy"],
    )
