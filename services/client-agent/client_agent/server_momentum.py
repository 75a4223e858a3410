"""Server momentum (FedAvgM, Hsu et al. 2019) applied by every site to the published average.

The aggregator only sums ciphertexts, so the server optimiser runs at the sites: each one
decrypts the same aggregate, the sample-weighted mean Δ of the sites' changes to the current
global weights, and applies

    v ← β·v + Δ        w ← w + η·v

in float64 NumPy, element by element (no reductions, no threads), so every site computes
bit-identical new global weights and velocity. β = 0, η = 1 is plain FedAvg. It acts on
already-noised updates only, so it is post-processing and costs no privacy. A site that
restarts must rebuild v (from its state or by replaying the published aggregates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest


@dataclass(frozen=True)
class ServerState:
    """The global weights and the server velocity after a round."""

    weights: NDArray[Any]
    velocity: NDArray[Any]


def initial_state(weights: NDArray[Any]) -> ServerState:
    """Round 0: the initial weights and zero velocity."""
    flat = np.asarray(weights, dtype=np.float64)
    return ServerState(weights=flat.copy(), velocity=np.zeros_like(flat))


def apply_server_momentum(
    state: ServerState, mean_update: NDArray[Any], *, momentum: float, server_learning_rate: float
) -> ServerState:
    """The next global model from the sites' mean update Δ (FedAvgM)."""
    if not 0 <= momentum < 1 or not server_learning_rate > 0:
        raise InvalidRequest("server momentum must be in [0, 1) and the server learning rate positive")
    update = np.asarray(mean_update, dtype=np.float64)
    if update.shape != state.weights.shape:
        raise InvalidRequest(f"the mean update has shape {update.shape}, the model {state.weights.shape}")
    velocity = momentum * state.velocity + update
    return ServerState(weights=state.weights + server_learning_rate * velocity, velocity=velocity)
