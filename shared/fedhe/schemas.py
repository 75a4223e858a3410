"""Wire schemas: the JSON bodies the services exchange, split by use (create / public)."""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedhe.he.codec import DEFAULT_FORMAT_ID
from fedhe.he.context import CkksParameters
from fedhe.modelspec import ModelSpec
from fedhe.privacy import DPSettings

MAX_METRICS = 64


def check_metrics(metrics: object) -> dict[str, float]:
    """Plaintext metrics a site may send: at most 64 named finite numbers."""
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ValueError(f"metrics must be an object with at most {MAX_METRICS} entries")
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 64:
            raise ValueError("metric names must be strings of at most 64 characters")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number")
    return metrics


class SiteStatus(StrEnum):
    """Lifecycle of a site registration."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"


class RoundState(StrEnum):
    """Lifecycle of one round (see ``aggregator.rounds.RoundStateMachine``)."""

    OPEN = "open"
    COLLECTING = "collecting"
    CLOSED = "closed"
    PUBLISHED = "published"
    FAILED = "failed"


class JobStatus(StrEnum):
    """Lifecycle of a job."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class SiteCreate(BaseModel):
    """A site admin's registration request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    organisation: str = Field(min_length=1, max_length=200)
    contact: str = Field(min_length=3, max_length=320, description="who to call about this site")
    public_key: str = Field(description="base64 of the site's 32-byte Ed25519 public signing key")


class SitePublic(BaseModel):
    """A site as operators see it."""

    id: str
    name: str
    organisation: str
    contact: str
    public_key: str
    status: SiteStatus
    created_at: datetime
    decided_at: datetime | None = None


class SiteApproved(BaseModel):
    """Approval result; ``credential`` is shown this once and stored only hashed."""

    site: SitePublic
    credential: str


class SiteIdentity(BaseModel):
    """What the keyserver learns about a site from the aggregator's registry."""

    id: str
    status: SiteStatus
    public_key: str


class FederationCreate(BaseModel):
    """An operator's request for a new federation and its CKKS context."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    parameters: CkksParameters = Field(default_factory=CkksParameters)


class ContextInfo(BaseModel):
    """Public facts about one CKKS context."""

    key_id: str
    federation_id: str
    parameters: CkksParameters
    created_at: datetime
    retired_at: datetime | None = None


class FederationPublic(BaseModel):
    """A federation and its current key."""

    id: str
    name: str
    key_id: str
    created_at: datetime
    contexts: list[ContextInfo]


class KeyReleaseRequest(BaseModel):
    """A site's signed request for the secret context of ``key_id``."""

    model_config = ConfigDict(extra="forbid")

    site_id: str
    timestamp: int
    signature: str


class JobCreate(BaseModel):
    """An operator's job definition."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    key_id: str
    model: ModelSpec
    rounds: int = Field(default=5, ge=1, le=10_000)
    min_sites: int = Field(default=2, ge=1, description="fewest uploads a round may publish with")
    target_sites: int | None = Field(
        default=None, ge=1, description="close the round as soon as this many uploads arrived (default min_sites)"
    )
    round_deadline_s: float = Field(default=600, gt=0, le=7 * 24 * 3600)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    dp: DPSettings = Field(default_factory=DPSettings)
    max_samples_per_round: int = Field(
        default=100_000,
        ge=1,
        description=(
            "public bound S on one site's samples per round; sites encrypt w*n_k/S, so each term is at most "
            "|w| and the sum stays far inside the CKKS headroom (about 2^19 at the last level)"
        ),
    )
    format_id: str = DEFAULT_FORMAT_ID
    on_round_failure: Literal["retry", "stop"] = "retry"
    max_round_attempts: int = Field(default=3, ge=1, le=100)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> JobCreate:
        if self.target_sites is not None and self.target_sites < self.min_sites:
            raise ValueError("target_sites must be at least min_sites")
        return self


class JobPublic(JobCreate):
    """A job as stored, with its progress."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: JobStatus
    current_round: int
    created_at: datetime
    finished_at: datetime | None = None
    num_parameters: int


class SubmissionPublic(BaseModel):
    """One accepted upload, as operators see it (never its ciphertext)."""

    site_id: str
    num_samples: int
    num_bytes: int
    sha256: str
    metrics: dict[str, Any]
    received_at: datetime


class EvaluationCreate(BaseModel):
    """A site's evaluation of a round's published global model on its validation split."""

    model_config = ConfigDict(extra="forbid")

    num_examples: int = Field(ge=1)
    metrics: dict[str, float]

    @field_validator("metrics")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        check_metrics(value)
        return value


class EvaluationPublic(EvaluationCreate):
    """A stored evaluation."""

    model_config = ConfigDict(extra="ignore")

    site_id: str
    received_at: datetime


class RoundPublic(BaseModel):
    """One attempt at one round."""

    job_id: str
    number: int
    attempt: int
    state: RoundState
    opened_at: datetime
    deadline_at: datetime
    closed_at: datetime | None = None
    published_at: datetime | None = None
    failure_reason: str | None = None
    num_submissions: int
    total_samples: int
    submissions: list[SubmissionPublic] = Field(default_factory=list)
    evaluations: list[EvaluationPublic] = Field(default_factory=list)
    submitted_by_caller: bool | None = None


class AuditEventPublic(BaseModel):
    """One audit-log entry."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class RoundVerification(BaseModel):
    """Whether a round's stored running sum and counters match its stored submissions."""

    job_id: str
    number: int
    submissions: int
    counters_match: bool
    sum_matches: bool


class UpdateAccepted(BaseModel):
    """The aggregator's answer to an accepted upload."""

    job_id: str
    round: int
    attempt: int
    round_state: RoundState
    num_submissions: int
    sha256: str
    replayed: bool = Field(default=False, description="true when this exact upload had already been accepted")
