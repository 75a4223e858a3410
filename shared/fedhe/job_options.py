"""What a job asks of its rounds beyond the model: algorithm, site sampling, statistics, evaluation.

Everything here runs under encryption because the aggregator only ever adds: FedProx's
proximal term and local momentum act inside each site's training; server momentum is applied
by every site to the decrypted average (``client_agent.server_momentum``); sampling only
decides which sites may upload to a round; the statistics step is one more encrypted sum.
What cannot run here: anything that needs the server to look at one update (robust
aggregation such as a median or Krum, adaptive clipping from update norms, FedAdam's
per-coordinate second moments at the server would need the decrypted average, which the
sites, not the server, hold; they could apply it the way they apply momentum).
"""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PUBLIC_TEST_VALUES = 200_000


class Algorithm(StrEnum):
    """How sites train locally: FedAvg, or FedProx with a proximal term μ/2·‖w − w_global‖²."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


class AlgorithmSettings(BaseModel):
    """Local training and the server update every site applies to the decrypted average."""

    model_config = ConfigDict(extra="forbid")

    name: Algorithm = Algorithm.FEDAVG
    proximal_mu: float = Field(default=0.0, ge=0, le=100, description="FedProx μ (used only with fedprox)")
    local_momentum: float = Field(default=0.0, ge=0, lt=1, description="heavy-ball momentum of local SGD")
    server_momentum: float = Field(default=0.0, ge=0, lt=1, description="FedAvgM β (0: plain FedAvg)")
    server_learning_rate: float = Field(default=1.0, gt=0, le=10, description="FedAvgM η")

    @model_validator(mode="after")
    def _check(self) -> AlgorithmSettings:
        if self.name == Algorithm.FEDPROX and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0")
        if self.name == Algorithm.FEDAVG and self.proximal_mu != 0:
            raise ValueError("proximal_mu applies to fedprox only")
        return self


class SamplingMode(StrEnum):
    """Which sites a training round asks for."""

    ALL = "all"
    FRACTION = "fraction"
    WEIGHTED = "weighted"


class SamplingSettings(BaseModel):
    """Sites per training round: every member, or a random subset drawn when the round opens.

    ``fraction``: each round asks ceil(fraction × candidates) sites (at least ``min_sites``),
    uniformly at random; ``weighted``: as many, drawn without replacement with probability
    proportional to the training rows each site reported. Candidates are the approved members,
    restricted to those online when any are.
    """

    model_config = ConfigDict(extra="forbid")

    mode: SamplingMode = SamplingMode.ALL
    fraction: float = Field(default=1.0, gt=0, le=1)
    min_sites: int = Field(default=1, ge=1, description="fewest sites a sampled round asks for")

    def count(self, candidates: int) -> int:
        """How many of ``candidates`` sites a round asks for."""
        return min(candidates, max(self.min_sites, math.ceil(self.fraction * candidates)))


STATISTICS_NOISE_MULTIPLIER = 4.0
"""Default noise of the statistics step: ε 0.93 at δ = 1e-5 on its own (PLD accountant)."""


class StatisticsSettings(BaseModel):
    """A statistics step before training (round 0): pooled mean and std per input feature.

    Each site encrypts, per feature (per channel for images), the sum and sum of squares of its
    inputs scaled into [-1, 1] by the public bound ``feature_bounds`` (values beyond a bound are
    clipped and counted; each row's statistics are clipped to L2 norm ``clip_norm``), with
    Gaussian noise of ``noise_multiplier`` times the vector's sensitivity to one row: a Gaussian
    mechanism each site's ledger charges. Sites decrypt the
    sum, derive the mean and std with the row count Σ n_k and build the model with them as a
    fixed normalisation layer, so exported models take raw inputs.
    """

    model_config = ConfigDict(extra="forbid")

    feature_bounds: list[float] = Field(
        min_length=1, description="|x| ≤ bound per feature (per channel for images): public, from the data dictionary"
    )
    bits: int = Field(default=36, ge=16, le=40, description="quantisation bits of the packed codec's statistics")
    noise_multiplier: float = Field(
        default=STATISTICS_NOISE_MULTIPLIER,
        ge=0.5,
        le=1000,
        description="Gaussian noise std over the vector's sensitivity to one row (charged to each site's ledger)",
    )
    clip_norm: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="L2 norm each row's (z, z²) statistics are clipped to (default sqrt(features) / 2)",
    )

    @model_validator(mode="after")
    def _check(self) -> StatisticsSettings:
        if any(not (b > 0 and math.isfinite(b)) for b in self.feature_bounds):
            raise ValueError("every feature bound must be positive and finite")
        return self

    def num_values(self) -> int:
        """Length of a statistics vector: sums, then sums of squares, per feature."""
        return 2 * len(self.feature_bounds)

    @property
    def row_clip_norm(self) -> float:
        """The L2 norm one row's statistics are clipped to (its sensitivity times S)."""
        return self.clip_norm if self.clip_norm is not None else math.sqrt(len(self.feature_bounds)) / 2


SECURE_AGGREGATION_FLOOR = 2
"""The smallest threshold t: with t = 1 no member may collude with the coordinator at all."""


class SecureAggregationSettings(BaseModel):
    """Masked aggregation (ADR 0010): no coalition of the coordinator with up to t − 1 members
    learns an honest site's update, and a round needs at least t + 1 uploads.

    Each round attempt runs three phases: sites advertise a fresh key before they train (by the
    round's deadline), train and upload masked updates (by the round's deadline again, counted
    from the roster), then answer the unmasking (by ``phase_deadline_s``). Up to
    roster − t − 1 members may vanish after uploading without failing the round.
    """

    model_config = ConfigDict(extra="forbid")

    threshold: int | None = Field(
        default=None,
        ge=SECURE_AGGREGATION_FLOOR,
        description="t: colluding members tolerated + 1, and shares needed to unmask (default max(2, min_sites // 2))",
    )
    phase_deadline_s: float = Field(
        default=300, gt=0, le=24 * 3600, description="deadline of the unmasking phase, from the last upload"
    )

    def resolved(self, min_sites: int) -> SecureAggregationSettings:
        """These settings with the default threshold filled in for a job of ``min_sites``."""
        if self.threshold is not None:
            return self
        return self.model_copy(update={"threshold": max(SECURE_AGGREGATION_FLOOR, min_sites // 2)})


class PublicTestSet(BaseModel):
    """A small labelled test set the operator may publish: every site also scores each model on it."""

    model_config = ConfigDict(extra="forbid")

    x: list[list[float]] = Field(min_length=1, max_length=2_000, description="rows of flat input values")
    y: list[int] = Field(min_length=1, max_length=2_000, description="class index per row")

    @model_validator(mode="after")
    def _check(self) -> PublicTestSet:
        if len(self.x) != len(self.y):
            raise ValueError("the public test set needs one label per row")
        if sum(len(row) for row in self.x) > MAX_PUBLIC_TEST_VALUES:
            raise ValueError(f"the public test set may hold at most {MAX_PUBLIC_TEST_VALUES} values")
        if len({len(row) for row in self.x}) != 1:
            raise ValueError("every public test row must have the same number of values")
        if not all(math.isfinite(v) for row in self.x for v in row):
            raise ValueError("public test values must be finite")
        return self


class PrivacyPlan(BaseModel):
    """ε a site of ``num_samples`` training rows will have spent after each round, planned at creation.

    It assumes the site trains in every round (sampling only lowers it) and counts this job alone.
    ``epsilon_per_round`` covers the first 100 rounds; ``final_epsilon`` is for the last round.
    """

    num_samples: int
    delta: float
    epsilon_per_round: list[float]
    final_epsilon: float


class UploadCost(BaseModel):
    """What one site's encrypted training update costs under a job's packing settings."""

    bits: int
    clip_range: float
    max_sites: int
    bytes_per_parameter: float = Field(description="bytes per value sent, before the last ciphertext's padding")
    num_values: int = Field(description="values a training update carries (the trainable parameters)")
    upload_bytes: int = Field(description="bytes of one site's update per round (whole ciphertexts)")
