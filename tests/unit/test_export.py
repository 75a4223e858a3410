"""Exports carry normalisation and softmax, agree with the Keras model, and are private files; a
TFLite flavour out of tolerance is refused alone, with what was measured."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from client_agent import export
from client_agent.datasets import digits_as_images
from client_agent.export import (
    FLOAT16_TOLERANCE,
    Tolerance,
    export_all,
    probability_model,
    tflite_probabilities,
    within,
)
from client_agent.models import initial_weights
from fedhe.modelspec import ModelSpec


def _cnn() -> tuple[ModelSpec, np.ndarray, np.ndarray]:
    images = digits_as_images()
    spec = ModelSpec(
        architecture="cnn",
        input_shape=(8, 8, 1),
        conv_filters=[4],
        num_classes=10,
        normalisation={"mean": [float(images.x.mean())], "std": [float(images.x.std())]},
    )
    return spec, initial_weights(spec, 0), images.x[:64]


@pytest.mark.slow
def test_every_export_takes_raw_inputs_and_agrees_with_keras(tmp_path: Path) -> None:
    spec, weights, sample = _cnn()
    exported = export_all(spec, weights, tmp_path / "out", sample)
    assert [(c.flavour, c.kept) for c in exported.tflite] == [("float16", True), ("int8", True)]
    expected = probability_model(spec, weights).predict(sample, verbose=0)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)
    reloaded = tf.keras.models.load_model(exported.keras)
    np.testing.assert_allclose(reloaded.predict(sample, verbose=0), expected, atol=1e-6)
    served = tf.saved_model.load(str(exported.saved_model))
    np.testing.assert_allclose(served(tf.constant(sample)).numpy(), expected, atol=1e-5)
    for check in exported.tflite:
        assert check.path is not None
        probabilities = tflite_probabilities(check.path.read_bytes(), sample)
        assert np.abs(probabilities - expected).max() == pytest.approx(check.max_probability_difference)
        assert check.max_probability_difference is not None
        assert check.max_probability_difference <= check.tolerance.max_probability_difference
        assert stat.S_IMODE(check.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(exported.keras.stat().st_mode) == 0o600
    assert stat.S_IMODE(exported.report.stat().st_mode) == 0o600
    assert stat.S_IMODE(exported.saved_model.stat().st_mode) == 0o700
    inside = [p for p in exported.saved_model.rglob("*") if p.is_file()]
    assert inside
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in inside)


@pytest.mark.slow
def test_a_flavour_out_of_tolerance_is_refused_alone_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bar no int8 model can meet: the flavour must be refused by itself, with its figures.
    strict = Tolerance(max_probability_difference=0.0, min_argmax_agreement=1.0)
    monkeypatch.setattr(export, "_FLAVOURS", (("float16", True, FLOAT16_TOLERANCE), ("int8", False, strict)))
    spec, weights, sample = _cnn()
    out = tmp_path / "out"
    exported = export_all(spec, weights, out, sample, name="m")
    assert sorted(p.name for p in out.iterdir()) == [
        "m-export-report.json",
        "m-float16.tflite",
        "m.keras",
        "m.savedmodel",
    ]
    float16, int8 = exported.tflite
    assert (float16.kept, int8.kept) == (True, False)
    assert int8.max_probability_difference is not None
    assert int8.max_probability_difference > 0
    assert "int8 TFLite refused (not written): largest probability difference" in int8.summary()
    assert "(allowed 0.0)" in int8.summary()
    report = json.loads(exported.report.read_text())
    assert report["checked_on_samples"] == 64
    assert [(v["flavour"], v["kept"], v["path"]) for v in report["tflite"]] == [
        ("float16", True, str(out / "m-float16.tflite")),
        ("int8", False, None),
    ]
    assert report["tflite"][1]["max_probability_difference"] == pytest.approx(int8.max_probability_difference)


def test_without_sample_inputs_the_model_is_kept_and_tflite_refused(tmp_path: Path) -> None:
    spec = ModelSpec(architecture="logistic", input_shape=(3,), num_classes=2)
    exported = export_all(spec, initial_weights(spec, 0), tmp_path, np.zeros((0, 3)), name="m")
    assert exported.keras.is_file()
    assert exported.saved_model.is_dir()
    assert [c.kept for c in exported.tflite] == [False, False]
    assert exported.tflite[0].summary() == "float16 TFLite refused: there were no sample inputs to check it on"


def test_agreement_is_measured_against_the_tolerance() -> None:
    expected = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert within(expected, expected + 0.001, FLOAT16_TOLERANCE) == (pytest.approx(0.001), 1.0, True)
    difference, agreement, ok = within(expected, expected + np.array([0.05, -0.05]), FLOAT16_TOLERANCE)
    assert (difference, agreement, ok) == (pytest.approx(0.05), 1.0, False)
    assert within(expected, np.array([[0.9, 0.1], [0.8, 0.2]]), FLOAT16_TOLERANCE)[1:] == (0.5, False)


def test_only_the_tflite_flavours_asked_for_are_converted(tmp_path: Path) -> None:
    spec, weights, sample = _cnn()
    exported = export_all(spec, weights, tmp_path / "int8", sample, tflite=("int8",))
    assert [(c.flavour, c.kept) for c in exported.tflite] == [("int8", True)]
    assert sorted(p.name for p in (tmp_path / "int8").glob("*.tflite")) == ["model-int8.tflite"]
    none = export_all(spec, weights, tmp_path / "none", sample, tflite=())
    assert none.tflite == ()
    assert json.loads(none.report.read_text(encoding="utf-8"))["tflite"] == []
    assert none.files() == [none.keras, none.saved_model, none.report]
