"""Differential-privacy settings and the RDP accountant sites use to track their budget."""

from __future__ import annotations

from collections.abc import Iterable

import dp_accounting
from pydantic import BaseModel, Field

from fedhe.errors import InvalidRequest


class DPSettings(BaseModel):
    """DP-SGD settings of a job (sites may tighten them with a local policy)."""

    l2_norm_clip: float = Field(default=1.0, gt=0)
    noise_multiplier: float = Field(default=1.1, ge=0.3, description="Gaussian noise std / clip")
    delta: float = Field(default=1e-5, gt=0, lt=1)


class TrainingPass(BaseModel):
    """One round's local DP-SGD training, as the accountant needs it."""

    sampling_probability: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(gt=0)
    steps: int = Field(ge=0)


def sampling_probability(num_samples: int, batch_size: int) -> float:
    """q = batch_size / n, each example's chance of being in a step's Poisson batch."""
    if num_samples < batch_size:
        raise InvalidRequest(
            f"site has {num_samples} training rows, fewer than one batch of {batch_size}", code="too_few_samples"
        )
    return batch_size / num_samples


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """n / batch_size Poisson steps make one expected pass over the data."""
    return max(1, round(num_samples / batch_size))


def local_training_pass(*, num_samples: int, batch_size: int, epochs: int, noise_multiplier: float) -> TrainingPass:
    """The pass one round of local DP-SGD makes on ``num_samples`` rows (what the ledger records)."""
    return TrainingPass(
        sampling_probability=sampling_probability(num_samples, batch_size),
        noise_multiplier=noise_multiplier,
        steps=epochs * steps_per_epoch(num_samples, batch_size),
    )


RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512]


def epsilon_spent(passes: Iterable[TrainingPass], delta: float) -> float:
    """ε at ``delta`` for the composition of all ``passes`` (RDP accountant, Poisson sampling).

    DP-SGD's batches are treated as Poisson-subsampled with probability batch/n, the standard
    (and tensorflow-privacy's) analysis of shuffled mini-batches.
    """
    accountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    any_steps = False
    for step in passes:
        if step.steps == 0:
            continue
        any_steps = True
        event = dp_accounting.PoissonSampledDpEvent(
            step.sampling_probability, dp_accounting.GaussianDpEvent(step.noise_multiplier)
        )
        accountant.compose(event, step.steps)
    if not any_steps:
        return 0.0
    return float(accountant.get_epsilon(delta))
