"""An in-process federation for accuracy tests and benchmarks (never for deployments).

Every site trains with the agent's own code (``train_dp_sgd``, or ``train_non_private`` for
the non-private rows), the server averages the sites' weights weighted by their sample counts
in plaintext (the packed codec's sum differs by at most its stated bound, tested with the
codecs) and applies server momentum as the sites would. ``centralised_accuracy`` is the
non-private baseline every comparison uses. Normalisation comes from the sites' pooled statistics,
as a federation would agree it. ε per site is what its ledger would show after the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from client_agent.datasets import Dataset
from client_agent.models import initial_weights
from client_agent.normalisation import local_statistics, pooled_normalisation
from client_agent.server_momentum import apply_server_momentum, initial_state
from client_agent.training import LocalTraining, load_model, train_dp_sgd, train_non_private
from fedhe.modelspec import ModelSpec
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


def centralised_accuracy(
    spec: ModelSpec, train: Dataset, test: Dataset, *, epochs: int, learning_rate: float, seed: int = 0
) -> float:
    """The baseline a federation is compared with: the same model trained centrally, without
    DP, with Adam on the pooled data, scored on ``test``.

    Reproducible without touching any global seed (DP noise elsewhere in the process must not
    become predictable): the start is the job's public initial weights for ``seed``, and each
    epoch's order comes from a generator of its own.
    """
    model = load_model(spec, initial_weights(spec, seed))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    order = np.random.default_rng(seed)  # shuffling public baseline data; protects nothing
    x, y = np.asarray(train.x, dtype=np.float32), np.asarray(train.y)
    for _ in range(epochs):
        shuffled = order.permutation(len(y))
        model.fit(x[shuffled], y[shuffled], epochs=1, batch_size=32, shuffle=False, verbose=0)
    predicted = model(np.asarray(test.x, dtype=np.float32), training=False).numpy().argmax(axis=1)
    return float((predicted == test.y).mean())


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
    local = LocalTraining(
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        proximal_mu=settings.proximal_mu,
        momentum=settings.local_momentum,
    )
    for number in range(settings.rounds):
        trained = []
        for index, site in enumerate(sites):
            run = replace(local, test_stream=f"site{index}/round{number}")
            if settings.dp is None:
                result = train_non_private(spec, state.weights, site, run)
            else:
                result = train_dp_sgd(spec, state.weights, site, run, dp=settings.dp)
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
