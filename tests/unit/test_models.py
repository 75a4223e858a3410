"""The model zoo: specs without TensorFlow, Keras builds, fingerprints and deterministic round-0 weights."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from client_agent.models import (
    architecture_sha256,
    build_model,
    fingerprint,
    flat_weights,
    initial_weights,
    num_parameters,
    set_flat_weights,
)
from fedhe.errors import InvalidRequest, PermissionDenied
from fedhe.modelspec import InputNormalisation, ModelSpec

CUSTOM = "tests.unit.custom_models"
SPECS: dict[str, dict[str, Any]] = {
    "logistic": {"architecture": "logistic", "input_shape": [30], "num_classes": 2},
    "mlp": {"architecture": "mlp", "input_dim": 64, "hidden_units": [32], "num_classes": 10},
    "cnn": {"architecture": "cnn", "input_shape": [8, 8, 1], "conv_filters": [8, 16], "num_classes": 10},
    "mobilenet_v2": {"architecture": "mobilenet_v2", "input_shape": [32, 32, 3], "alpha": 0.35, "num_classes": 5},
    "mobilenet_v3_small": {
        "architecture": "mobilenet_v3_small",
        "input_shape": [32, 32, 3],
        "alpha": 0.35,
        "num_classes": 5,
    },
    "custom": {
        "architecture": "custom",
        "input_shape": [6, 6, 2],
        "num_classes": 3,
        "import_path": f"{CUSTOM}:tiny",
        "options": {"units": 5},
    },
}


def _spec(name: str, **changes: Any) -> ModelSpec:
    return ModelSpec.model_validate({**SPECS[name], **changes})


def test_input_dim_is_shorthand_for_a_one_dimensional_input_shape() -> None:
    spec = ModelSpec.model_validate({"input_dim": 4, "num_classes": 2})
    assert spec.input_shape == (4,)
    assert spec.input_dim == 4
    assert "input_dim" not in spec.model_dump()
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.num_parameters() == 10
    with pytest.raises(InvalidRequest):
        _ = _spec("cnn").input_dim


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "logistic", "hidden_units": [4]}, "hidden_units does not apply to the logistic"),
        ({"architecture": "mlp", "alpha": 0.5}, "alpha does not apply to the mlp"),
        ({"architecture": "cnn"}, "cnn takes images"),
        ({"architecture": "custom"}, "custom architecture needs import_path"),
        ({"import_path": "x:y"}, "import_path does not apply"),
        ({"class_names": ["a", "a"]}, "class_names must be num_classes distinct names"),
        ({"feature_names": ["a"]}, "one name per input feature"),
        ({"normalisation": {"mean": [0.0], "std": [1.0]}}, "one mean/std per input feature"),
        ({"normalisation": {"mean": [0.0] * 30, "std": [0.0] * 30}}, "std positive"),
        ({"hiden_units": [3]}, "Extra inputs are not permitted"),
    ],
)
def test_specs_refuse_settings_that_do_not_fit(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _spec("logistic", **{"num_classes": 2, **changes})


def test_image_specs_check_their_sizes() -> None:
    with pytest.raises(ValidationError, match="at least 32 x 32"):
        _spec("mobilenet_v2", input_shape=[16, 16, 3])
    with pytest.raises(ValidationError, match="3 pooling steps need images of at least 8"):
        _spec("cnn", input_shape=[4, 4, 1], conv_filters=[2, 2, 2])


@pytest.mark.parametrize("name", list(SPECS))
def test_every_architecture_builds_logits_of_the_right_shape(name: str) -> None:
    spec = _spec(name)
    model = build_model(spec, custom_modules=[CUSTOM])
    assert model.output_shape == (None, spec.num_classes)
    x = np.random.default_rng(0).normal(size=(2, *spec.input_shape)).astype(np.float32)
    assert model(x, training=False).shape == (2, spec.num_classes)
    if name in ("logistic", "mlp", "cnn"):
        assert spec.num_parameters() == num_parameters(model) == flat_weights(model).size


@pytest.mark.parametrize("name", list(SPECS))
def test_no_architecture_starts_with_an_output_independent_of_its_input(name: str) -> None:
    """DP-SGD runs BatchNormalization in inference mode from round 0, so its statistics must be
    its inputs' own: on Keras' placeholders (0 and 1) MobileNetV2's logits varied by 2e-12 across
    inputs and MobileNetV3-Small's by 4e-9, and nothing could learn."""
    spec = _spec(name)
    model = build_model(spec, custom_modules=[CUSTOM])
    set_flat_weights(model, initial_weights(spec, 0, custom_modules=[CUSTOM]))
    x = np.random.default_rng(1).uniform(0, 1, size=(32, *spec.input_shape)).astype(np.float32)
    logits = model(x, training=False).numpy()
    assert logits.std(axis=0).mean() > 1e-2


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
def test_batch_normalisation_statistics_are_estimated_and_rounded_alike_everywhere() -> None:
    spec = _spec("mobilenet_v2")
    model = build_model(spec)
    set_flat_weights(model, initial_weights(spec, 0))
    layers = [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    assert layers
    for layer in layers:
        variance = layer.moving_variance.numpy().astype(np.float64)
        assert not np.all(variance == 1.0)
        mantissa, _ = np.frexp(variance[variance > 0])
        np.testing.assert_array_equal(mantissa * 4096, np.round(mantissa * 4096))  # 12 significant bits


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
def test_keras_applications_need_the_job_creators_fingerprint() -> None:
    spec = _spec("mobilenet_v3_small")
    with pytest.raises(InvalidRequest, match="needs the fingerprint") as caught:
        spec.num_parameters()
    assert caught.value.code == "missing_model_fingerprint"
    pinned = spec.model_copy(update={"fingerprint": fingerprint(spec, seed=3)})
    assert pinned.num_parameters() == num_parameters(build_model(pinned))
    assert initial_weights(pinned, 3).size == pinned.num_parameters()  # the round-0 weights the fingerprint pins
    assert ModelSpec.model_validate(pinned.model_dump(mode="json")) == pinned


def test_architecture_hash_ignores_names_and_normalisation_values_but_not_structure() -> None:
    spec = _spec("mlp")
    first, second = build_model(spec), build_model(spec)
    assert first.layers[-1].name != second.layers[-1].name  # Keras numbers auto-generated names
    assert architecture_sha256(first) == architecture_sha256(second)
    normalised = spec.model_copy(update={"normalisation": InputNormalisation(mean=[1.0] * 64, std=[2.0] * 64)})
    other_values = spec.model_copy(update={"normalisation": InputNormalisation(mean=[3.0] * 64, std=[4.0] * 64)})
    assert architecture_sha256(build_model(normalised)) == architecture_sha256(build_model(other_values))
    assert architecture_sha256(build_model(normalised)) != architecture_sha256(first)
    for changed in (spec.model_copy(update={"hidden_units": [33]}), spec.model_copy(update={"activation": "tanh"})):
        assert architecture_sha256(build_model(changed)) != architecture_sha256(first)


def test_a_build_that_differs_from_the_fingerprint_is_refused() -> None:
    spec = _spec("cnn")
    foreign = fingerprint(_spec("cnn", activation="tanh"), seed=0)
    with pytest.raises(InvalidRequest, match="differs from the job creator's") as caught:
        build_model(spec.model_copy(update={"fingerprint": foreign}))
    assert caught.value.code == "model_fingerprint_mismatch"
    other_seed = spec.model_copy(update={"fingerprint": fingerprint(spec, seed=1)})
    with pytest.raises(InvalidRequest, match="initial weights differ"):
        initial_weights(other_seed, seed=0)


def test_initial_weights_depend_only_on_spec_and_seed_and_leave_global_randomness_alone() -> None:
    spec = _spec("cnn")
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    a, b, c = initial_weights(spec, 0), initial_weights(spec, 0), initial_weights(spec, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert random.getstate() == python_state
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    dense = _spec("mlp")
    np.testing.assert_array_equal(
        initial_weights(dense, 4), np.concatenate([w.ravel() for w in dense.initial_weights(4)])
    )


@pytest.mark.slow
def test_a_fresh_process_builds_the_same_round_zero_model() -> None:
    spec = _spec("mobilenet_v3_small")
    here = fingerprint(spec, seed=11)
    script = (
        "import sys; from client_agent.models import fingerprint; from fedhe.modelspec import ModelSpec; "
        "print(fingerprint(ModelSpec.model_validate_json(sys.argv[1]), seed=11).model_dump_json())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, spec.model_dump_json()], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.model_dump()


def test_custom_models_come_only_from_modules_the_site_allows() -> None:
    spec = _spec("custom")
    with pytest.raises(PermissionDenied, match=r"does not allow custom models from 'tests\.unit\.custom_models'"):
        build_model(spec)
    assert build_model(spec, custom_modules=["tests.unit"]).count_params() == 6 * 6 * 2 * 5 + 5 + 5 * 3 + 3
    with pytest.raises(InvalidRequest, match="not a Keras model"):
        build_model(_spec("custom", import_path=f"{CUSTOM}:not_a_model", options={}), custom_modules=[CUSTOM])
    with pytest.raises(InvalidRequest, match="cannot import custom model"):
        build_model(_spec("custom", import_path=f"{CUSTOM}:missing"), custom_modules=[CUSTOM])
    # What an allowed module merely imports (here TensorFlow) is not a model builder a job may call.
    with pytest.raises(PermissionDenied, match="not a public function defined in"):
        build_model(_spec("custom", import_path=f"{CUSTOM}:tf", options={}), custom_modules=[CUSTOM])


def test_normalisation_is_a_fixed_layer_with_no_weights() -> None:
    spec = _spec("cnn", input_shape=[8, 8, 2], normalisation={"mean": [10.0, -1.0], "std": [2.0, 0.5]})
    model = build_model(spec)
    assert num_parameters(model) == spec.num_parameters()
    normalisation = model.layers[1]
    assert isinstance(normalisation, tf.keras.layers.Normalization)
    assert not normalisation.weights
    x = np.stack([np.full((8, 8), 12.0), np.full((8, 8), 0.0)], axis=-1)[None].astype(np.float32)
    np.testing.assert_allclose(normalisation(x).numpy()[0, 0, 0], [1.0, 2.0], rtol=1e-6)
