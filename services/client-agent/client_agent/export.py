"""Exporting a trained model for use outside fedhe: Keras, SavedModel and TFLite, each checked.

Every export takes raw inputs (the spec's normalisation layer is inside) and outputs class
probabilities (a softmax after the logits). Written files are mode 0600 and SavedModel
directories 0700: a model trained on a site's data is the site's to share.

The .keras file and the SavedModel are always written (they are the model itself). TFLite comes
in two flavours: float16 weights, and dynamic-range int8 (weights int8, activations float). Each
is run on sample inputs and compared with the Keras model; a flavour whose largest probability
difference exceeds its tolerance, or whose predicted classes agree on fewer than the stated
share of samples, is refused on its own: it is not written, the others are. What was measured
and decided for each flavour goes to a JSON report beside the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.training import load_model
from fedhe.modelspec import ModelSpec


@dataclass(frozen=True)
class Tolerance:
    """How far a TFLite model's probabilities may stray from the Keras model's."""

    max_probability_difference: float
    min_argmax_agreement: float


FLOAT16_TOLERANCE = Tolerance(max_probability_difference=0.01, min_argmax_agreement=0.99)
INT8_TOLERANCE = Tolerance(max_probability_difference=0.1, min_argmax_agreement=0.95)


@dataclass(frozen=True)
class VariantCheck:
    """One TFLite flavour measured against the Keras model, and whether it was kept."""

    flavour: str
    max_probability_difference: float | None
    argmax_agreement: float | None
    tolerance: Tolerance
    path: Path | None

    @property
    def kept(self) -> bool:
        return self.path is not None

    def summary(self) -> str:
        """One line a site admin reads: what was measured against what was allowed, and the outcome."""
        if self.max_probability_difference is None or self.argmax_agreement is None:
            return f"{self.flavour} TFLite refused: there were no sample inputs to check it on"
        verdict = f"kept as {self.path}" if self.path is not None else "refused (not written)"
        return (
            f"{self.flavour} TFLite {verdict}: largest probability difference "
            f"{self.max_probability_difference:.4f} (allowed {self.tolerance.max_probability_difference}), "
            f"same class on {self.argmax_agreement:.1%} of samples (needed {self.tolerance.min_argmax_agreement:.0%})"
        )


@dataclass(frozen=True)
class ExportedModels:
    """Every file one export wrote, and each TFLite flavour's check."""

    keras: Path
    saved_model: Path
    tflite: tuple[VariantCheck, ...]
    report: Path

    def files(self) -> list[Path]:
        """What was written: the model files first, then each kept TFLite file, then the report."""
        kept = [check.path for check in self.tflite if check.path is not None]
        return [self.keras, self.saved_model, *kept, self.report]


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


def within(expected: NDArray[Any], actual: NDArray[Any], tolerance: Tolerance) -> tuple[float, float, bool]:
    """The largest probability difference of ``actual`` from ``expected``, the share of rows whose
    predicted class agrees, and whether both are within ``tolerance``."""
    difference = float(np.abs(expected - actual).max())
    agreement = float((expected.argmax(axis=1) == actual.argmax(axis=1)).mean())
    ok = difference <= tolerance.max_probability_difference and agreement >= tolerance.min_argmax_agreement
    return difference, agreement, ok


def _tflite(model: tf.keras.Model, *, float16: bool) -> bytes:
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if float16:
        converter.target_spec.supported_types = [tf.float16]
    converted: bytes = converter.convert()
    return converted


_FLAVOURS = (("float16", True, FLOAT16_TOLERANCE), ("int8", False, INT8_TOLERANCE))
TFLITE_FLAVOURS = tuple(flavour for flavour, _, _ in _FLAVOURS)


def export_all(
    spec: ModelSpec,
    weights: NDArray[Any],
    directory: Path,
    sample_inputs: NDArray[Any],
    *,
    name: str = "model",
    custom_modules: Collection[str] = (),
    tflite: Collection[str] = TFLITE_FLAVOURS,
) -> ExportedModels:
    """Write ``name``.keras and ``name``.savedmodel/, then ``name``-float16.tflite and
    ``name``-int8.tflite (of the ``tflite`` flavours asked for; converting a large model takes
    a while) where each agrees with the Keras model on ``sample_inputs`` (raw rows, e.g. the
    site's validation split), and ``name``-export-report.json saying what each measured."""
    model = probability_model(spec, weights, custom_modules=custom_modules)
    directory.mkdir(parents=True, exist_ok=True)
    keras, saved_model = directory / f"{name}.keras", directory / f"{name}.savedmodel"
    model.save(keras)
    tf.saved_model.save(model, str(saved_model))
    samples = np.asarray(sample_inputs, dtype=np.float32)
    expected = model.predict(samples, batch_size=256, verbose=0) if len(samples) else None
    checks = []
    for flavour, float16, tolerance in (f for f in _FLAVOURS if f[0] in tflite):
        if expected is None:
            checks.append(VariantCheck(flavour, None, None, tolerance, None))
            continue
        converted = _tflite(model, float16=float16)
        difference, agreement, ok = within(expected, tflite_probabilities(converted, samples), tolerance)
        path = directory / f"{name}-{flavour}.tflite" if ok else None
        if path is not None:
            path.write_bytes(converted)
        checks.append(VariantCheck(flavour, difference, agreement, tolerance, path))
    report = directory / f"{name}-export-report.json"
    report.write_text(json.dumps(_report(keras, saved_model, checks, len(samples)), indent=2))
    exported = ExportedModels(keras=keras, saved_model=saved_model, tflite=tuple(checks), report=report)
    for path in exported.files():
        _private(path)
    return exported


def _report(keras: Path, saved_model: Path, checks: list[VariantCheck], num_samples: int) -> dict[str, Any]:
    return {
        "keras": str(keras),
        "saved_model": str(saved_model),
        "checked_on_samples": num_samples,
        "tflite": [
            {
                **asdict(check),
                "path": None if check.path is None else str(check.path),
                "kept": check.kept,
                "summary": check.summary(),
            }
            for check in checks
        ],
    }
