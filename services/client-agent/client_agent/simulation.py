"""An in-process federation for accuracy tests and benchmarks (never for deployments).

Every site trains with the agent's own code (``train_dp_sgd``, or ``train_non_private`` for
the non-private rows), the server averages the sites' weights weighted by their sample
counts in plaintext (the encrypted sum differs by ~1e-8, tested with the codecs) and applies
server momentum as the sites would. Normalisation comes from the sites' pooled statistics,
as a federation would agree it. ε per site is what its ledger would show after the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.server_momentum import apply_server_momentum, initial_state
from client_agent.training import train_dp_sgd, train_non_private
from fedhe.datasets import Dataset
from fedhe.modelspec import ModelSpec
from fedhe.normalisation import local_statistics, pooled_normalisation
from fedhe.privacy import DPSettings, epsilon_spent, local_training_pass


@dataclass(frozen=True)
class FederatedSettings:
    """A job's training settings, as the simulation needs them."""

    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    dp: DPSettings | None
    proximal_mu: float = 0.0
    local_momentum: float = 0.0
    server_momentum: float = 0.0
    server_learning_rate: float = 1.0


@dataclass
class FederatedRun:
    """The final global model, ε per site (empty without DP) and the seconds spent."""

    spec: ModelSpec
    weights: NDArray[Any]
    epsilons: list[float] = field(default_factory=list)
    seconds: float = 0.0


def with_pooled_normalisation(spec: ModelSpec, sites: Sequence[Dataset]) -> ModelSpec:
    """``spec`` normalised by the pooled statistics of the sites' data."""
    statistics = [local_statistics(np.asarray(site.x)) for site in sites]
    return spec.model_copy(update={"normalisation": pooled_normalisation(statistics)})


def run_federation(
    spec: ModelSpec, sites: Sequence[Dataset], settings: FederatedSettings, initial: NDArray[Any]
) -> FederatedRun:
    """``settings.rounds`` rounds of local training and sample-weighted averaging from ``initial``."""
    state = initial_state(initial)
    seconds = 0.0
    counts = np.array([len(site) for site in sites], dtype=np.float64)
    for _ in range(settings.rounds):
        trained = []
        for site in sites:
            epochs, batch, lr, mu, momentum = (
                settings.local_epochs,
                settings.batch_size,
                settings.learning_rate,
                settings.proximal_mu,
                settings.local_momentum,
            )
            if settings.dp is None:
                result = train_non_private(
                    spec,
                    state.weights,
                    site,
                    epochs=epochs,
                    batch_size=batch,
                    learning_rate=lr,
                    proximal_mu=mu,
                    momentum=momentum,
                )
            else:
                result = train_dp_sgd(
                    spec,
                    state.weights,
                    site,
                    dp=settings.dp,
                    epochs=epochs,
                    batch_size=batch,
                    learning_rate=lr,
                    proximal_mu=mu,
                    momentum=momentum,
                )
            trained.append(result.weights)
            seconds += result.seconds
        average = np.tensordot(counts / counts.sum(), np.stack(trained), axes=1)
        state = apply_server_momentum(
            state,
            average - state.weights,
            momentum=settings.server_momentum,
            server_learning_rate=settings.server_learning_rate,
        )
    epsilons = []
    if settings.dp is not None:
        for site in sites:
            one_round = local_training_pass(
                num_samples=len(site),
                batch_size=settings.batch_size,
                epochs=settings.local_epochs,
                noise_multiplier=settings.dp.noise_multiplier,
            )
            epsilons.append(epsilon_spent([one_round] * settings.rounds, settings.dp.delta))
    return FederatedRun(spec=spec, weights=state.weights, epsilons=epsilons, seconds=seconds)
