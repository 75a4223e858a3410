"""Keras models from a ``ModelSpec``: the builder, the flat weight vector and the fingerprint.

Imports TensorFlow: import this module lazily (the aggregator never does). The CLI, the demo
and the agent all build models here, so every site builds the same thing.

* ``build_model(spec)`` outputs logits. When the spec has a normalisation, a fixed Keras
  ``Normalization`` layer (mean and variance as constants, no weights) comes first, so a
  model, and every export of it, takes raw inputs.
* The flat weight vector is every array of ``model.get_weights()`` in order, as float64
  (BatchNormalization's moving statistics included: DP-SGD never changes them).
* ``initial_weights(spec, seed)``: the round-0 model. Dense models use the NumPy
  initialisation the aggregator serves (``ModelSpec.initial_weights``); the others are built
  with every unseeded Keras initializer drawing its seed from ``random.Random(seed)``, so each
  site builds the same weights without touching any global random state.
* ``fingerprint(spec, seed)``: sha256 of a canonical description of the build (layer types,
  configs without names, connections, weight shapes; the normalisation's values are left out
  since they may be agreed after the job is created), the parameter count, and sha256 of the
  initial weights.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, PermissionDenied
from fedhe.modelspec import DENSE_ARCHITECTURES, ModelFingerprint, ModelSpec, flatten_weights

# Config keys that name things rather than shape them (Keras numbers auto-generated names per process).
_NAME_KEYS = frozenset({"name"})
# Normalization's agreed values: part of the spec, not of the architecture.
_NORMALISATION_VALUES = frozenset({"mean", "variance"})


def _normalisation(spec: ModelSpec) -> tf.keras.layers.Layer | None:
    if spec.normalisation is None:
        return None
    std = np.asarray(spec.normalisation.std, dtype=np.float64)
    return tf.keras.layers.Normalization(axis=-1, mean=spec.normalisation.mean, variance=(std**2).tolist())


def _custom(spec: ModelSpec, custom_modules: Collection[str]) -> tf.keras.Model:
    assert spec.import_path is not None
    module_name, function_name = spec.import_path.split(":")
    if not any(module_name == allowed or module_name.startswith(allowed + ".") for allowed in custom_modules):
        # The message reaches the coordinator in the site's decline: it names the job's module,
        # never the site's own list.
        raise PermissionDenied(
            f"this site does not allow custom models from {module_name!r}", code="custom_model_not_allowed"
        )
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidRequest(f"cannot import custom model {spec.import_path}: {exc}") from exc
    # Only a public function the allowed module defines itself, not one it merely imports.
    if function_name.startswith("_") or getattr(function, "__module__", None) != module_name:
        raise PermissionDenied(
            f"{spec.import_path} is not a public function defined in {module_name!r}", code="custom_model_not_allowed"
        )
    model = function(input_shape=spec.input_shape, num_classes=spec.num_classes, **spec.options)
    if not isinstance(model, tf.keras.Model):
        raise InvalidRequest(f"{spec.import_path} returned {type(model).__name__}, not a Keras model")
    return model


def _body(spec: ModelSpec, inputs: tf.Tensor, custom_modules: Collection[str]) -> tf.Tensor:
    """The spec's layers on ``inputs`` (already normalised), ending in logits."""
    x = inputs
    if spec.architecture == "cnn":
        for filters in spec.filters():
            x = tf.keras.layers.Conv2D(filters, 3, padding="same", activation=spec.activation)(x)
            x = tf.keras.layers.MaxPooling2D(2)(x)
        x = tf.keras.layers.Flatten()(x)
    if spec.architecture in ("mlp", "cnn"):
        for units in spec.hidden_units:
            x = tf.keras.layers.Dense(units, activation=spec.activation)(x)
    if spec.architecture in ("logistic", "mlp", "cnn"):
        return tf.keras.layers.Dense(spec.num_classes)(x)
    common = {"alpha": spec.alpha or 1.0, "include_top": True, "weights": None, "classes": spec.num_classes}
    if spec.architecture == "mobilenet_v2":
        return tf.keras.applications.MobileNetV2(input_tensor=x, classifier_activation=None, **common).output
    if spec.architecture == "mobilenet_v3_small":
        # Our normalisation layer replaces the application's fixed [-1, 1] rescaling.
        return tf.keras.applications.MobileNetV3Small(
            input_tensor=x, classifier_activation=None, include_preprocessing=False, **common
        ).output
    return _custom(spec, custom_modules)(x)


def build_model(spec: ModelSpec, *, custom_modules: Collection[str] = ()) -> tf.keras.Model:
    """The Keras model ``spec`` describes, outputting logits; checked against its fingerprint.

    ``custom_modules``: the modules (and their submodules) this site lets a custom spec import.
    """
    inputs = tf.keras.layers.Input(shape=spec.input_shape)
    normalisation = _normalisation(spec)
    model = tf.keras.Model(
        inputs, _body(spec, inputs if normalisation is None else normalisation(inputs), custom_modules)
    )
    if model.output_shape != (None, spec.num_classes):
        raise InvalidRequest(f"the model outputs shape {model.output_shape}, not (None, {spec.num_classes})")
    expected = spec.fingerprint.num_parameters if spec.fingerprint is not None else None
    if spec.architecture in DENSE_ARCHITECTURES or spec.architecture == "cnn":
        expected = spec.num_parameters()
    if expected is not None and num_parameters(model) != expected:
        raise InvalidRequest(f"Keras built {num_parameters(model)} parameters, the spec says {expected}")
    if spec.fingerprint is not None and architecture_sha256(model) != spec.fingerprint.architecture_sha256:
        raise InvalidRequest(
            "this site's Keras build of the model differs from the job creator's (architecture hash); "
            "check that every site runs the same fedhe, TensorFlow and custom model code",
            code="model_fingerprint_mismatch",
        )
    return model


def num_parameters(model: tf.keras.Model) -> int:
    """Values in the flat weight vector: every weight, trainable or not."""
    return int(sum(np.prod(w.shape) for w in model.weights))


def flat_weights(model: tf.keras.Model) -> NDArray[Any]:
    """``model.get_weights()`` as one float64 vector."""
    return flatten_weights(model.get_weights())


def set_flat_weights(model: tf.keras.Model, vector: NDArray[Any]) -> None:
    """Load a flat vector (``flat_weights``' layout) into ``model``."""
    shapes = [tuple(w.shape) for w in model.weights]
    total = int(sum(np.prod(s) for s in shapes))
    if vector.size != total:
        raise InvalidRequest(f"weight vector has {vector.size} values, the model {total}")
    arrays, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(np.asarray(vector[offset : offset + size]).reshape(shape))
        offset += size
    model.set_weights(arrays)


@contextmanager
def _keras_seeds(seed: int) -> Iterator[None]:
    """Unseeded Keras initializers draw their seeds from ``random.Random(seed)`` inside this block.

    This is the thread-local generator ``tf.keras.utils.set_random_seed`` installs (private in
    Keras 2.15), set here alone so that Python's, NumPy's and TensorFlow's global seeds, which
    other code in the process relies on, stay untouched.
    """
    from keras.src import backend as keras_backend  # type: ignore[import-untyped]

    holder = keras_backend._SEED_GENERATOR
    previous = getattr(holder, "generator", None)
    holder.generator = random.Random(seed)  # noqa: S311 - initial weights are public; only reproducibility counts
    try:
        yield
    finally:
        holder.generator = previous


def initial_weights(spec: ModelSpec, seed: int, *, custom_modules: Collection[str] = ()) -> NDArray[Any]:
    """The round-0 flat weight vector, the same at every site for the same (spec, seed)."""
    if spec.architecture in DENSE_ARCHITECTURES:
        weights = flatten_weights(spec.initial_weights(seed))
    else:
        weights = flat_weights(_round_zero_model(spec, seed, custom_modules))
    if spec.fingerprint is not None and _sha256(weights) != spec.fingerprint.initial_weights_sha256:
        raise InvalidRequest(
            "this site's initial weights differ from the job creator's; check fedhe and TensorFlow versions",
            code="model_fingerprint_mismatch",
        )
    return weights


def _round_zero_model(spec: ModelSpec, seed: int, custom_modules: Collection[str]) -> tf.keras.Model:
    """The round-0 Keras model of a spec the NumPy initialisation does not cover."""
    with _keras_seeds(seed):
        model = build_model(spec, custom_modules=custom_modules)
    _estimate_batch_statistics(spec, model, seed, custom_modules)
    return model


BATCH_STATISTICS_SAMPLES = 64
"""Synthetic inputs the round-0 BatchNormalization statistics are estimated from."""

_STATISTICS_MANTISSA_BITS = 12
"""Estimated statistics keep this many significant bits: float64 results that differ in their
last bits between CPUs (summation order) round to the same value, so every site's round-0
weights, and their hash, agree."""


def _estimate_batch_statistics(
    spec: ModelSpec, model: tf.keras.Model, seed: int, custom_modules: Collection[str]
) -> None:
    """Give every BatchNormalization layer of ``model`` moving statistics of its own inputs.

    DP-SGD runs BatchNormalization in inference mode (batch statistics would mix examples), so
    its moving statistics are fixed from round 0; Keras' placeholders (mean 0, variance 1) leave
    a deep network's output independent of its input. The statistics are measured in float64 on
    seeded standard-normal inputs, which is what the body sees after the spec's normalisation
    layer, with each layer normalising by its batch's statistics as the pass goes (momentum 0).
    """
    targets = _batch_normalisations(model)
    if not targets:
        return
    previous = tf.keras.backend.floatx()
    tf.keras.backend.set_floatx("float64")
    try:
        with _keras_seeds(seed):
            inputs = tf.keras.layers.Input(shape=spec.input_shape, dtype="float64")
            body = tf.keras.Model(inputs, _body(spec, inputs, custom_modules))
    finally:
        tf.keras.backend.set_floatx(previous)
    # The normalisation layer holds constants, not weights: the body has the model's weights.
    body.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
    measured = _batch_normalisations(body)
    for layer in measured:
        layer.momentum = 0.0
    samples = np.random.default_rng(seed).standard_normal((BATCH_STATISTICS_SAMPLES, *spec.input_shape))
    body(samples, training=True)
    for target, source in zip(targets, measured, strict=True):
        target.moving_mean.assign(_rounded(source.moving_mean.numpy()))
        target.moving_variance.assign(_rounded(source.moving_variance.numpy()))


def _batch_normalisations(model: tf.keras.Model) -> list[tf.keras.layers.BatchNormalization]:
    return [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]


def _rounded(values: NDArray[Any]) -> NDArray[np.float32]:
    mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float64))
    scale = float(1 << _STATISTICS_MANTISSA_BITS)
    return np.ldexp(np.round(mantissa * scale) / scale, exponent).astype(np.float32)


def _sha256(weights: NDArray[Any]) -> str:
    return hashlib.sha256(np.asarray(weights, dtype="<f8").tobytes()).hexdigest()


def _without_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_names(v) for k, v in value.items() if k not in _NAME_KEYS}
    if isinstance(value, list | tuple):
        return [_without_names(v) for v in value]
    return value


def _describe(model: tf.keras.Model) -> list[dict[str, Any]]:
    """Layer by layer: type, config without names, inbound layers by position, weight shapes."""
    layers = model.layers
    position = {layer.name: i for i, layer in enumerate(layers)}

    def references(node: Any) -> list[int]:
        """Positions of the layers a serialised node refers to (Keras nests them variously)."""
        if isinstance(node, str):
            return [position[node]] if node in position else []
        if isinstance(node, dict):
            node = list(node.values())
        return [i for item in node for i in references(item)] if isinstance(node, list | tuple) else []

    inbound = {
        entry["name"]: references(entry.get("inbound_nodes", [])) for entry in model.get_config().get("layers", [])
    }
    described = []
    for layer in layers:
        if isinstance(layer, tf.keras.Model):
            config: Any = _describe(layer)
        else:
            config = {k: v for k, v in layer.get_config().items() if k not in _NORMALISATION_VALUES}
        described.append(
            {
                "type": type(layer).__name__,
                "config": _without_names(config),
                "inbound": inbound.get(layer.name, []),
                "weights": [[list(w.shape), w.dtype.name] for w in layer.weights],
            }
        )
    return described


def architecture_sha256(model: tf.keras.Model) -> str:
    """sha256 of the model's canonical description (module docstring)."""
    canonical = json.dumps({"inputs": model.input_shape, "layers": _describe(model)}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint(spec: ModelSpec, seed: int, *, custom_modules: Collection[str] = ()) -> ModelFingerprint:
    """What the job creator puts in ``spec.fingerprint`` (any existing one is ignored)."""
    bare = spec.model_copy(update={"fingerprint": None})
    if bare.architecture in DENSE_ARCHITECTURES:
        model = build_model(bare, custom_modules=custom_modules)
        weights = flatten_weights(bare.initial_weights(seed))
    else:
        model = _round_zero_model(bare, seed, custom_modules)
        weights = flat_weights(model)
    return ModelFingerprint(
        architecture_sha256=architecture_sha256(model),
        num_parameters=num_parameters(model),
        initial_weights_sha256=_sha256(weights),
    )
