"""Exports carry normalisation and softmax, agree with the Keras model, and are private files."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from client_agent.export import (
    FLOAT16_TOLERANCE,
    ExportMismatch,
    check_agreement,
    export_all,
    probability_model,
    tflite_probabilities,
)
from fedhe.datasets import digits_as_images
from fedhe.models import initial_weights
from fedhe.modelspec import ModelSpec


@pytest.mark.slow
def test_every_export_takes_raw_inputs_and_agrees_with_keras(tmp_path: Path) -> None:
    images = digits_as_images()
    spec = ModelSpec(
        architecture="cnn",
        input_shape=(8, 8, 1),
        conv_filters=[4],
        num_classes=10,
        normalisation={"mean": [float(images.x.mean())], "std": [float(images.x.std())]},
    )
    weights = initial_weights(spec, 0)
    sample = images.x[:64]
    exported = export_all(spec, weights, tmp_path / "out", sample)
    expected = probability_model(spec, weights).predict(sample, verbose=0)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)
    reloaded = tf.keras.models.load_model(exported.keras)
    np.testing.assert_allclose(reloaded.predict(sample, verbose=0), expected, atol=1e-6)
    served = tf.saved_model.load(str(exported.saved_model))
    np.testing.assert_allclose(served(tf.constant(sample)).numpy(), expected, atol=1e-5)
    for path in (exported.tflite_float16, exported.tflite_int8):
        probabilities = tflite_probabilities(path.read_bytes(), sample)
        assert np.abs(probabilities - expected).max() < 0.1
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(exported.keras.stat().st_mode) == 0o600
    assert stat.S_IMODE(exported.saved_model.stat().st_mode) == 0o700
    inside = [p for p in exported.saved_model.rglob("*") if p.is_file()]
    assert inside
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in inside)


def test_a_disagreeing_export_is_refused() -> None:
    expected = np.array([[0.9, 0.1], [0.2, 0.8]])
    check_agreement("ok", expected, expected + 0.001, FLOAT16_TOLERANCE)
    with pytest.raises(ExportMismatch, match=r"largest probability difference 0\.0500"):
        check_agreement("the float16 TFLite model", expected, expected + np.array([0.05, -0.05]), FLOAT16_TOLERANCE)
    with pytest.raises(ExportMismatch, match=r"same class on 50\.0% of samples"):
        check_agreement("x", expected, np.array([[0.9, 0.1], [0.8, 0.2]]), FLOAT16_TOLERANCE)
