"""Exporting a trained model for use outside fedhe: Keras, SavedModel and TFLite, all checked.

Every export takes raw inputs (the spec's normalisation layer is inside) and outputs class
probabilities (a softmax after the logits). Written files are mode 0600 and SavedModel
directories 0700: a model trained on a site's data is the site's to share.

TFLite comes in two flavours: float16 weights, and dynamic-range int8 (weights int8,
activations float). Each is run on sample inputs and compared with the Keras model; if
the largest probability difference exceeds its tolerance or the predicted classes agree on
fewer than the stated share of samples, ``ExportMismatch`` is raised and nothing is kept.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.training import load_model
from fedhe.errors import FedheError
from fedhe.modelspec import ModelSpec


@dataclass(frozen=True)
class Tolerance:
    """How far a TFLite model's probabilities may stray from the Keras model's."""

    max_probability_difference: float
    min_argmax_agreement: float


FLOAT16_TOLERANCE = Tolerance(max_probability_difference=0.01, min_argmax_agreement=0.99)
INT8_TOLERANCE = Tolerance(max_probability_difference=0.1, min_argmax_agreement=0.95)


class ExportMismatch(FedheError):
    """An exported model does not agree with the model it was made from."""

    default_code = "export_mismatch"


@dataclass(frozen=True)
class ExportedModels:
    """Paths of every export of one model."""

    keras: Path
    saved_model: Path
    tflite_float16: Path
    tflite_int8: Path


def probability_model(
    spec: ModelSpec, weights: NDArray[Any], *, custom_modules: Collection[str] = ()
) -> tf.keras.Model:
    """``spec``'s model with ``weights``, raw inputs in, softmax probabilities out."""
    model = load_model(spec, weights, custom_modules=custom_modules)
    return tf.keras.Model(model.inputs, tf.keras.layers.Softmax()(model.outputs[0]))


def _private(path: Path) -> None:
    if path.is_dir():
        path.chmod(0o700)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                (Path(root) / name).chmod(0o700)
            for name in files:
                (Path(root) / name).chmod(0o600)
    else:
        path.chmod(0o600)


def export_model(spec: ModelSpec, weights: NDArray[Any], path: Path, *, custom_modules: Collection[str] = ()) -> Path:
    """Save the model as a Keras file: normalisation inside, softmax output (probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    probability_model(spec, weights, custom_modules=custom_modules).save(path)
    _private(path)
    return path


def tflite_probabilities(model_bytes: bytes, x: NDArray[Any]) -> NDArray[Any]:
    """Run a TFLite model on every row of ``x``, one at a time."""
    interpreter = tf.lite.Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for row in np.asarray(x, dtype=np.float32):
        interpreter.set_tensor(source["index"], row[np.newaxis])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(target["index"])[0])
    return np.stack(rows)


def check_agreement(name: str, expected: NDArray[Any], actual: NDArray[Any], tolerance: Tolerance) -> None:
    """Raise ``ExportMismatch`` unless ``actual`` probabilities agree with ``expected`` within ``tolerance``."""
    difference = float(np.abs(expected - actual).max())
    agreement = float((expected.argmax(axis=1) == actual.argmax(axis=1)).mean())
    if difference > tolerance.max_probability_difference or agreement < tolerance.min_argmax_agreement:
        raise ExportMismatch(
            f"{name} disagrees with the Keras model: largest probability difference {difference:.4f} "
            f"(allowed {tolerance.max_probability_difference}), same class on {agreement:.1%} of samples "
            f"(needed {tolerance.min_argmax_agreement:.0%})"
        )


def _tflite(model: tf.keras.Model, *, float16: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if float16:
        converter.target_spec.supported_types = [tf.float16]
    converted: bytes = converter.convert()
    return converted


def export_all(
    spec: ModelSpec,
    weights: NDArray[Any],
    directory: Path,
    sample_inputs: NDArray[Any],
    *,
    name: str = "model",
    custom_modules: Collection[str] = (),
) -> ExportedModels:
    """Write ``name``.keras, ``name``.savedmodel/, ``name``-float16.tflite and ``name``-int8.tflite.

    Both TFLite models are checked against the Keras model on ``sample_inputs`` (raw rows, e.g.
    the site's validation split) before they are written.
    """
    if len(sample_inputs) == 0:
        raise ExportMismatch("exports are checked on sample inputs; none were given")
    model = probability_model(spec, weights, custom_modules=custom_modules)
    expected = model.predict(np.asarray(sample_inputs, dtype=np.float32), batch_size=256, verbose=0)
    converted = {}
    for flavour, float16, tolerance in (("float16", True, FLOAT16_TOLERANCE), ("int8", False, INT8_TOLERANCE)):
        converted[flavour] = _tflite(model, float16=float16)
        actual = tflite_probabilities(converted[flavour], sample_inputs)
        check_agreement(f"the {flavour} TFLite model", expected, actual, tolerance)
    directory.mkdir(parents=True, exist_ok=True)
    exported = ExportedModels(
        keras=directory / f"{name}.keras",
        saved_model=directory / f"{name}.savedmodel",
        tflite_float16=directory / f"{name}-float16.tflite",
        tflite_int8=directory / f"{name}-int8.tflite",
    )
    model.save(exported.keras)
    tf.saved_model.save(model, str(exported.saved_model))
    exported.tflite_float16.write_bytes(converted["float16"])
    exported.tflite_int8.write_bytes(converted["int8"])
    for path in (exported.keras, exported.saved_model, exported.tflite_float16, exported.tflite_int8):
        _private(path)
    return exported
