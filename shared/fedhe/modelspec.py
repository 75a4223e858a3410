"""Model specifications: what ML engineers declare in a job, and the weights it implies.

The aggregator must serve round 0's initial weights without importing TensorFlow, so a spec
derives its weight shapes and a seeded Glorot-uniform initialisation in NumPy; the agent
builds the matching Keras model (``client_agent.training``) and checks the shapes agree.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field, model_validator


class InputNormalisation(BaseModel):
    """Per-feature affine scaling agreed by the federation (public, part of the spec)."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check(self) -> InputNormalisation:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be positive")
        return self


class ModelSpec(BaseModel):
    """A dense classifier: inputs -> hidden layers -> softmax over ``num_classes``."""

    architecture: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=1_000_000)
    hidden_units: list[int] = Field(default_factory=list, max_length=16)
    num_classes: int = Field(ge=2, le=100_000)
    activation: Literal["relu", "tanh"] = "relu"
    normalisation: InputNormalisation | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if any(units < 1 for units in self.hidden_units):
            raise ValueError("hidden_units must all be positive")
        if self.normalisation is not None and len(self.normalisation.mean) != self.input_dim:
            raise ValueError("normalisation must have input_dim entries")
        return self

    def weight_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the weight arrays in Keras order (kernel, bias per layer)."""
        sizes = [self.input_dim, *self.hidden_units, self.num_classes]
        shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            shapes.extend([(fan_in, fan_out), (fan_out,)])
        return shapes

    def num_parameters(self) -> int:
        """Total number of trainable values."""
        return int(sum(np.prod(shape) for shape in self.weight_shapes()))

    def initial_weights(self, seed: int) -> list[NDArray[Any]]:
        """Seeded Glorot-uniform kernels and zero biases, as Keras initialises Dense layers."""
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


def unflatten_weights(vector: NDArray[Any], shapes: list[tuple[int, ...]]) -> list[NDArray[Any]]:
    """Split a flat vector back into arrays of ``shapes``."""
    total = int(sum(np.prod(shape) for shape in shapes))
    if vector.size != total:
        raise ValueError(f"vector has {vector.size} values, the shapes need {total}")
    out: list[NDArray[Any]] = []
    offset = 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return out
