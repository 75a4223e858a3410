"""Keras models from a ``ModelSpec``: the builder, the flat weight vector and the fingerprint.

Imports TensorFlow: import this module lazily (the aggregator never does). The agent, the demo
and ``fedhe job create`` (through the ``fedhe.model_tools`` entry point, ``fedhe.cli.model_tools``)
all build models here, so every site builds the same thing.

* ``build_model(spec)`` outputs logits. When the spec has a normalisation, a fixed Keras
  ``Normalization`` layer (mean and variance as constants, no weights) comes first, so a
  model, and every export of it, takes raw inputs.
* The flat weight vector is every array of ``model.get_weights()`` in order, as float64
  (BatchNormalization's moving statistics included: DP-SGD never changes them).
* ``initial_weights(spec, seed)``: the round-0 model. Dense models use the NumPy
  initialisation the aggregator serves (``ModelSpec.initial_weights``); the others are built
  with every unseeded Keras initializer drawing its seed from ``random.Random(seed)``, so each
  site builds the same weights without touching any global random state.
  A spec with ``initial_weights_sha256`` starts instead from the given vector, checked
  against that hash; its BatchNormalization statistics are the given ones.
* ``spec.trainable`` freezes every other layer (``layer.trainable = False``), so DP-SGD clips,
  noises and changes only the trainable variables; ``trainable_mask`` marks their values in the
  flat vector, the only ones an update carries.
* ``fingerprint(spec, seed)``: sha256 of a canonical description of the build (layer types,
  configs without names, connections, weight shapes; the normalisation's values are left out
  since they may be agreed after the job is created), the parameter count, sha256 of the
  initial weights and, with trainable layers, how many values train.
* ``weights_from_file(spec, path)``: the flat vector of a ``.keras`` model file, a legacy
  ``.h5`` weights file or a ``.npy`` flat vector, for the spec's architecture.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import json
import random
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, PermissionDenied
from fedhe.modelspec import DENSE_ARCHITECTURES, ModelFingerprint, ModelSpec, TrainableLayers, flatten_weights

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
    if spec.trainable is not None:
        _freeze_all_but(model, spec.trainable)
    expected = spec.fingerprint.num_parameters if spec.fingerprint is not None else None
    if spec.architecture in DENSE_ARCHITECTURES or spec.architecture == "cnn":
        expected = spec.num_parameters()
    if expected is not None and num_parameters(model) != expected:
        raise InvalidRequest(f"Keras built {num_parameters(model)} parameters, the spec says {expected}")
    pinned = spec.fingerprint
    if pinned is not None and architecture_sha256(model) != pinned.architecture_sha256:
        raise InvalidRequest(
            "this site's Keras build of the model differs from the job creator's (architecture hash); "
            "check that every site runs the same fedhe, TensorFlow and custom model code",
            code="model_fingerprint_mismatch",
        )
    if pinned is not None and spec.trainable is not None and pinned.num_trainable_parameters != num_trainable(model):
        raise InvalidRequest(
            f"this site's build trains {num_trainable(model)} values, the job creator's "
            f"{pinned.num_trainable_parameters}; check that every site runs the same fedhe and TensorFlow",
            code="model_fingerprint_mismatch",
        )
    return model


# A MobileNet block's layers share this name prefix (Keras applications' naming).
_NAMED_BLOCK = re.compile(r"^(block_\d+|expanded_conv(?:_\d+)?)(?=[_/])")
# A layer's batch normalisation is named after it.
_NORMALISATION_SUFFIX = re.compile(r"(_bn|/BatchNorm|_BN)$")


def _weighted_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Layers holding weights, nested models opened, in the order their weights appear."""
    layers: list[tf.keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            layers.extend(_weighted_layers(layer))
        elif layer.weights:
            layers.append(layer)
    return layers


def _block_of(name: str) -> str:
    named = _NAMED_BLOCK.match(name)
    return named.group(1) if named else _NORMALISATION_SUFFIX.sub("", name)


def _freeze_all_but(model: tf.keras.Model, trainable: TrainableLayers) -> None:
    """Freeze every layer with weights but the head, the last ``trainable.last_blocks`` blocks
    and the layers ``trainable.layers`` names (``fedhe.modelspec.TrainableLayers``)."""
    layers = _weighted_layers(model)
    *body, head = layers
    blocks: list[str] = []
    for layer in reversed(body):
        if not blocks or blocks[-1] != _block_of(layer.name):
            blocks.append(_block_of(layer.name))
    if trainable.last_blocks > len(blocks):
        raise InvalidRequest(
            f"trainable.last_blocks={trainable.last_blocks}, but the model has {len(blocks)} blocks before its head",
            code="invalid_trainable_layers",
        )
    chosen = set(blocks[: trainable.last_blocks])
    for pattern in trainable.layers:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in layers):
            raise InvalidRequest(
                f"trainable.layers pattern {pattern!r} matches no layer with weights of this model",
                code="invalid_trainable_layers",
            )
    for layer in body:
        layer.trainable = _block_of(layer.name) in chosen or any(
            fnmatch.fnmatchcase(layer.name, pattern) for pattern in trainable.layers
        )
    head.trainable = True


def trainable_mask(model: tf.keras.Model) -> NDArray[np.bool_]:
    """Which values of the flat weight vector train (BatchNormalization's statistics never do)."""
    trainable = {variable.ref() for variable in model.trainable_weights}
    return np.concatenate([np.full(int(np.prod(w.shape)), w.ref() in trainable, dtype=np.bool_) for w in model.weights])


def num_trainable(model: tf.keras.Model) -> int:
    """Values an update of ``model`` carries when its spec names trainable layers."""
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


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


def initial_weights(
    spec: ModelSpec, seed: int, *, custom_modules: Collection[str] = (), given: NDArray[Any] | None = None
) -> NDArray[Any]:
    """The round-0 flat weight vector, the same at every site for the same (spec, seed).

    ``given``: the vector a spec with ``initial_weights_sha256`` starts from (fetched or found
    locally by the caller), refused unless it is that vector.
    """
    if spec.initial_weights_sha256 is not None:
        if given is None:
            raise InvalidRequest("this job starts from given initial weights; none were supplied")
        weights = np.asarray(given, dtype=np.float64)
        check_given_weights(weights, spec.initial_weights_sha256, spec.num_parameters())
        return weights
    if spec.architecture in DENSE_ARCHITECTURES:
        weights = flatten_weights(spec.initial_weights(seed))
    else:
        weights = flat_weights(_round_zero_model(spec, seed, custom_modules))
    if spec.fingerprint is not None and weights_sha256(weights) != spec.fingerprint.initial_weights_sha256:
        raise InvalidRequest(
            "this site's initial weights differ from the job creator's; check fedhe and TensorFlow versions",
            code="model_fingerprint_mismatch",
        )
    return weights


def check_given_weights(weights: NDArray[Any], sha256: str, num_values: int) -> None:
    """Refuse a given round-0 vector of the wrong length, or one that is not the job's."""
    if weights.size != num_values:
        raise InvalidRequest(
            f"the given initial weights hold {weights.size} values, the job's model {num_values}",
            code="initial_weights_mismatch",
        )
    if weights_sha256(weights) != sha256:
        raise InvalidRequest(
            f"the given initial weights' sha256 is {weights_sha256(weights)}, the job's {sha256}: "
            "not the job's weights",
            code="initial_weights_mismatch",
        )


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


def weights_sha256(weights: NDArray[Any]) -> str:
    """sha256 of a flat vector as float64 little-endian bytes: how jobs name round-0 weights."""
    return hashlib.sha256(np.asarray(weights, dtype="<f8").tobytes()).hexdigest()


WEIGHT_FILE_SUFFIXES = (".keras", ".h5", ".npy")


def weights_from_file(spec: ModelSpec, path: Path, *, custom_modules: Collection[str] = ()) -> NDArray[Any]:
    """The flat weight vector ``path`` holds for ``spec``'s architecture.

    ``.keras``: a whole Keras model file (loaded with ``safe_mode``, no code runs), whose
    weights are taken in order and must have the spec's shapes; ``.h5``: weights saved with
    ``model.save_weights`` (Keras' legacy HDF5 layout, by layer order); ``.npy``: the flat
    vector itself.
    """
    model = build_model(spec.model_copy(update={"fingerprint": None, "trainable": None}), custom_modules=custom_modules)
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise InvalidRequest(f"{path}: weights files end in {', '.join(WEIGHT_FILE_SUFFIXES)}")
    try:
        vector = _read_weights(model, path)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: cannot read weights ({exc})", code="initial_weights_mismatch") from exc
    if vector.size != num_parameters(model):
        raise InvalidRequest(
            f"{path}: holds {vector.size} values, the model has {num_parameters(model)}",
            code="initial_weights_mismatch",
        )
    if not np.all(np.isfinite(vector)):
        raise InvalidRequest(f"{path}: holds NaN or infinite weights", code="initial_weights_mismatch")
    return vector


def _read_weights(model: tf.keras.Model, path: Path) -> NDArray[Any]:
    if path.suffix == ".npy":
        vector = np.load(path, allow_pickle=False)
        if vector.ndim != 1:
            raise InvalidRequest(f"{path}: a .npy weights file holds one flat vector, not shape {vector.shape}")
        return np.asarray(vector, dtype=np.float64)
    if path.suffix == ".h5":
        model.load_weights(path)
        return flat_weights(model)
    arrays = tf.keras.models.load_model(path, compile=False, safe_mode=True).get_weights()
    shapes, expected = [tuple(a.shape) for a in arrays], [tuple(w.shape) for w in model.weights]
    if shapes != expected:
        differ = [i for i, (got, want) in enumerate(zip(shapes, expected, strict=False)) if got != want]
        where = f"; array {differ[0]} is {shapes[differ[0]]}, the spec's {expected[differ[0]]}" if differ else ""
        raise InvalidRequest(
            f"{path}: its {len(shapes)} weight arrays do not fit the spec's {len(expected)}{where}; "
            "is it the same architecture, width and number of classes?",
            code="initial_weights_mismatch",
        )
    return flatten_weights(arrays)


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


def fingerprint(
    spec: ModelSpec, seed: int, *, custom_modules: Collection[str] = (), given: NDArray[Any] | None = None
) -> ModelFingerprint:
    """What the job creator puts in ``spec.fingerprint`` (any existing one is ignored); ``given``
    as for ``initial_weights``."""
    bare = spec.model_copy(update={"fingerprint": None})
    if bare.initial_weights_sha256 is not None:
        model = build_model(bare, custom_modules=custom_modules)
        if given is None:
            raise InvalidRequest("this job starts from given initial weights; none were supplied")
        weights = np.asarray(given, dtype=np.float64)
        check_given_weights(weights, bare.initial_weights_sha256, num_parameters(model))
    elif bare.architecture in DENSE_ARCHITECTURES:
        model = build_model(bare, custom_modules=custom_modules)
        weights = flatten_weights(bare.initial_weights(seed))
    else:
        model = _round_zero_model(bare, seed, custom_modules)
        weights = flat_weights(model)
    return ModelFingerprint(
        architecture_sha256=architecture_sha256(model),
        num_parameters=num_parameters(model),
        initial_weights_sha256=weights_sha256(weights),
        num_trainable_parameters=None if bare.trainable is None else num_trainable(model),
    )
