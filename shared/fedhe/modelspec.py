"""Model specifications: what ML engineers declare in a job, without TensorFlow.

The aggregator must validate a job and, for dense models, serve round 0's initial weights
without importing TensorFlow. So a spec is plain data: the architecture and its settings,
the data contract (input shape, classes, feature names) and the fixed input normalisation.
``client_agent.models`` builds the Keras model a spec describes.

* ``logistic``: inputs -> softmax (one Dense layer); ``mlp``: inputs -> ``hidden_units`` ->
  softmax. Their weight shapes, parameter count and seeded Glorot-uniform initial weights
  come from NumPy here (the Keras builder uses the same numbers).
* ``cnn``: a small ConvNet for images: per entry of ``conv_filters`` a 3 x 3 convolution and
  2 x 2 max-pooling, then ``hidden_units`` Dense layers and the classifier. Its parameter
  count is a formula here too.
* ``mobilenet_v2`` / ``mobilenet_v3_small``: ``tf.keras.applications`` with ``weights=None``,
  width multiplier ``alpha``, images of at least 32 x 32.
* ``custom``: ``import_path`` = ``"module:function"``, called as ``function(input_shape=...,
  num_classes=..., **options)`` at each site (only for modules the site allows).

For the last three the parameter count (and the architecture's identity) is whatever Keras
builds, so the job creator computes a ``ModelFingerprint`` with ``client_agent.models.fingerprint``
and puts it in the spec; sites refuse a model whose build does not match it.

Transfer learning:

* ``initial_weights_sha256``: round 0 starts from given weights (a pre-trained backbone, say)
  instead of the seeded initialisation: the sha256 of their flat float64 little-endian vector
  (``client_agent.models.flat_weights``' layout). The aggregator stores that vector, public to
  members as round-0 weights always are; every site fetches it (or finds it locally) and
  refuses it unless the hash matches.
* ``trainable``: only the head (the last layer with weights), plus the last ``last_blocks``
  blocks and any layer matching ``layers``, train; the rest stay frozen. Uploads then carry
  only the trainable values (``num_update_values``), which the fingerprint counts, since only
  Keras knows which values those are.

``input_dim: n`` is still accepted as shorthand for ``input_shape: [n]``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedhe.data_schema import ClassList, DataSchema
from fedhe.errors import InvalidRequest

Architecture = Literal["logistic", "mlp", "cnn", "mobilenet_v2", "mobilenet_v3_small", "custom"]
DENSE_ARCHITECTURES = frozenset({"logistic", "mlp"})
IMAGE_ARCHITECTURES = frozenset({"cnn", "mobilenet_v2", "mobilenet_v3_small"})
KERAS_APPLICATIONS = frozenset({"mobilenet_v2", "mobilenet_v3_small"})
DEFAULT_CONV_FILTERS = (16, 32)
_CONV_KERNEL = 3
_MOBILENET_MIN_SIZE = 32
_MAX_INPUT_VALUES = 10_000_000


class InputNormalisation(BaseModel):
    """Fixed ``(x - mean) / std`` per feature (1-D inputs) or per channel (images), public."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check(self) -> InputNormalisation:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(not s > 0 or not math.isfinite(s) for s in self.std) or not all(map(math.isfinite, self.mean)):
            raise ValueError("every mean must be finite and every std positive and finite")
        return self


SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ModelFingerprint(BaseModel):
    """What the job creator's Keras build of a spec produced; every site's build must match."""

    architecture_sha256: str = Field(pattern=SHA256_PATTERN)
    num_parameters: int = Field(ge=1)
    initial_weights_sha256: str = Field(pattern=SHA256_PATTERN)
    num_trainable_parameters: int | None = Field(
        default=None, ge=1, description="values an update carries when the spec freezes some layers"
    )


class TrainableLayers(BaseModel):
    """Which layers train; every other layer keeps its round-0 weights for the whole job.

    The head (the last layer with weights) always trains. A block is a MobileNet block
    (``block_N_*``, ``expanded_conv_N/*``), a layer together with its batch normalisation
    (``Conv_1`` and ``Conv_1_bn``), or else one layer with weights, counted back from the head.
    """

    model_config = ConfigDict(extra="forbid")

    last_blocks: int = Field(default=0, ge=0, le=1000, description="blocks before the head that also train")
    layers: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="shell-style patterns (fnmatch) of layer names that also train; each must match a layer",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainableLayers:
        if any(not 0 < len(pattern) <= 200 for pattern in self.layers):
            raise ValueError("trainable.layers patterns must be 1 to 200 characters")
        return self


class ModelSpec(BaseModel):
    """A classifier over ``num_classes`` classes of inputs of ``input_shape`` (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture = "mlp"
    input_shape: tuple[int, ...] = Field(min_length=1, max_length=3)
    num_classes: int = Field(ge=2, le=100_000)
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    hidden_units: list[int] = Field(default_factory=list, max_length=16)
    activation: Literal["relu", "tanh"] = "relu"
    conv_filters: list[int] | None = Field(default=None, min_length=1, max_length=6)
    alpha: float | None = Field(default=None, gt=0, le=2)
    import_path: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    normalisation: InputNormalisation | None = None
    fingerprint: ModelFingerprint | None = None
    initial_weights_sha256: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="round 0 starts from these given weights (stored at the aggregator) instead of the seeded ones",
    )
    trainable: TrainableLayers | None = Field(default=None, description="only these layers train (None: all)")

    @model_validator(mode="before")
    @classmethod
    def _input_dim_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "input_dim" in data:
            if "input_shape" in data:
                raise ValueError("give input_shape or input_dim, not both")
            data = {**data, "input_shape": [data["input_dim"]]}
            del data["input_dim"]
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        self._check_shape()
        self._check_architecture_fields()
        if self.class_names is not None and (
            len(self.class_names) != self.num_classes or len(set(self.class_names)) != self.num_classes
        ):
            raise ValueError("class_names must be num_classes distinct names")
        if self.feature_names is not None and (
            len(self.input_shape) != 1 or sorted(set(self.feature_names)) != sorted(self.feature_names)
        ):
            raise ValueError("feature_names need a 1-D input and must be distinct")
        if self.feature_names is not None and len(self.feature_names) != self.input_shape[0]:
            raise ValueError("feature_names must have one name per input feature")
        if self.normalisation is not None and len(self.normalisation.mean) != self.input_shape[-1]:
            raise ValueError("normalisation needs one mean/std per input feature (per channel for images)")
        self._check_transfer()
        return self

    def _check_transfer(self) -> None:
        given, pinned = self.initial_weights_sha256, self.fingerprint
        if given is not None and pinned is not None and pinned.initial_weights_sha256 != given:
            raise ValueError(
                "fingerprint.initial_weights_sha256 must be initial_weights_sha256 when round 0 starts from given "
                "weights (fedhe job create --initial-weights computes both)"
            )
        if pinned is not None and pinned.num_trainable_parameters is not None:
            if self.trainable is None:
                raise ValueError("fingerprint.num_trainable_parameters applies only to a spec with trainable layers")
            if pinned.num_trainable_parameters > pinned.num_parameters:
                raise ValueError("fingerprint.num_trainable_parameters is over num_parameters")

    def _check_shape(self) -> None:
        if any(size < 1 for size in self.input_shape) or math.prod(self.input_shape) > _MAX_INPUT_VALUES:
            raise ValueError(f"input_shape sizes must be positive, at most {_MAX_INPUT_VALUES} values in all")
        if self.architecture in IMAGE_ARCHITECTURES and len(self.input_shape) != 3:
            raise ValueError(f"{self.architecture} takes images: input_shape must be [height, width, channels]")
        if self.architecture in DENSE_ARCHITECTURES and len(self.input_shape) != 1:
            raise ValueError(f"{self.architecture} takes feature vectors: input_shape must be [features]")
        if self.architecture in KERAS_APPLICATIONS and min(self.input_shape[:2]) < _MOBILENET_MIN_SIZE:
            raise ValueError(
                f"{self.architecture} needs images of at least {_MOBILENET_MIN_SIZE} x {_MOBILENET_MIN_SIZE}"
            )
        if self.architecture == "cnn":
            smallest = 2 ** len(self.filters())
            if min(self.input_shape[:2]) < smallest:
                raise ValueError(f"{len(self.filters())} pooling steps need images of at least {smallest} pixels")

    def _check_architecture_fields(self) -> None:
        arch = self.architecture
        allowed = {
            "hidden_units": arch in ("mlp", "cnn"),
            "conv_filters": arch == "cnn",
            "alpha": arch in KERAS_APPLICATIONS,
            "import_path": arch == "custom",
            "options": arch == "custom",
        }
        given = {"hidden_units": bool(self.hidden_units), "options": bool(self.options)}
        for name, ok in allowed.items():
            if not ok and given.get(name, getattr(self, name) is not None):
                raise ValueError(f"{name} does not apply to the {arch} architecture")
        if any(units < 1 for units in self.hidden_units) or any(f < 1 for f in self.conv_filters or []):
            raise ValueError("hidden_units and conv_filters must all be positive")
        if arch == "custom" and self.import_path is None:
            raise ValueError("a custom architecture needs import_path 'module:function'")

    @property
    def input_dim(self) -> int:
        """Number of input features of a 1-D model (the old name of ``input_shape[0]``)."""
        if len(self.input_shape) != 1:
            raise InvalidRequest(f"a {self.architecture} model takes inputs of shape {self.input_shape}")
        return self.input_shape[0]

    def filters(self) -> tuple[int, ...]:
        """The cnn's convolution widths."""
        return tuple(self.conv_filters) if self.conv_filters is not None else DEFAULT_CONV_FILTERS

    def data_schema(self) -> DataSchema:
        """The contract a site's data must meet for this model."""
        return DataSchema(
            input_shape=self.input_shape,
            classes=ClassList(self.num_classes, None if self.class_names is None else tuple(self.class_names)),
            feature_columns=None if self.feature_names is None else tuple(self.feature_names),
        )

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the weight arrays in Keras order (kernel, bias per layer); dense models only."""
        if self.architecture not in DENSE_ARCHITECTURES:
            raise InvalidRequest(f"a {self.architecture} model's weights come from Keras (client_agent.models)")
        sizes = [self.input_shape[0], *self.hidden_units, self.num_classes]
        shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            shapes.extend([(fan_in, fan_out), (fan_out,)])
        return shapes

    def num_parameters(self) -> int:
        """Number of values in the flat weight vector (every array of ``model.get_weights()``)."""
        if self.architecture in DENSE_ARCHITECTURES:
            return int(sum(np.prod(shape) for shape in self.weight_shapes()))
        if self.architecture == "cnn":
            return self._cnn_parameters()
        if self.fingerprint is None:
            raise InvalidRequest(
                f"a {self.architecture} spec needs the fingerprint of its Keras build "
                "(client_agent.models.fingerprint)",
                code="missing_model_fingerprint",
            )
        return self.fingerprint.num_parameters

    def num_update_values(self) -> int:
        """Values a training update carries: every parameter, or only the trainable ones."""
        if self.trainable is None:
            return self.num_parameters()
        if self.fingerprint is None or self.fingerprint.num_trainable_parameters is None:
            raise InvalidRequest(
                "a spec with trainable layers needs the fingerprint of its Keras build, trainable count included "
                "(fedhe job create computes it)",
                code="missing_model_fingerprint",
            )
        return self.fingerprint.num_trainable_parameters

    def _cnn_parameters(self) -> int:
        height, width, channels = self.input_shape
        total = 0
        for filters in self.filters():
            total += _CONV_KERNEL * _CONV_KERNEL * channels * filters + filters
            channels, height, width = filters, height // 2, width // 2
        sizes = [height * width * channels, *self.hidden_units, self.num_classes]
        return total + sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))

    def initial_weights(self, seed: int) -> list[NDArray[Any]]:
        """Seeded Glorot-uniform kernels and zero biases, as Keras initialises Dense layers (dense models)."""
        rng = np.random.default_rng(seed)
        weights: list[NDArray[Any]] = []
        for shape in self.weight_shapes():
            if len(shape) == 2:
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                weights.append(rng.uniform(-limit, limit, size=shape))
            else:
                weights.append(np.zeros(shape))
        return weights


def flatten_weights(weights: list[NDArray[Any]]) -> NDArray[Any]:
    """Concatenate weight arrays into one float64 vector."""
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights])
