"""Wire schemas: the JSON bodies the services exchange, split by use (create / public)."""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedhe.he.codec import PACKED_FORMAT_ID
from fedhe.he.context import BfvParameters, HeParameters
from fedhe.he.packing import PackingSettings
from fedhe.identifiers import SHA256, AccountName, FederationId, JobId, KeyId, Nonce, SiteId, TokenId
from fedhe.job_options import (
    AlgorithmSettings,
    PrivacyPlan,
    PublicTestSet,
    SamplingSettings,
    SecureAggregationSettings,
    StatisticsSettings,
    UploadCost,
)
from fedhe.modelspec import ModelSpec
from fedhe.privacy import DPSettings

MAX_METRICS = 64


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def check_metrics(metrics: object) -> dict[str, float]:
    """Plaintext metrics a site may send: at most 64 named finite numbers."""
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ValueError(f"metrics must be an object with at most {MAX_METRICS} entries")
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > 64:
            raise ValueError("metric names must be strings of at most 64 characters")
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
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
    UNMASKING = "unmasking"
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


class AgentState(StrEnum):
    """What a site's agent is doing, as it reports in its heartbeat."""

    IDLE = "idle"
    TRAINING = "training"
    UPLOADING = "uploading"
    WAITING = "waiting"
    DECLINED = "declined"
    FINISHED = "finished"


class Environment(BaseModel):
    """The versions that must match across a federation (mismatched TensorFlow silently changes training)."""

    model_config = ConfigDict(extra="forbid")

    python: str = Field(max_length=32)
    tensorflow: str = Field(max_length=32)
    tensorflow_privacy: str = Field(max_length=32)
    tenseal: str = Field(max_length=32)
    fedhe: str = Field(max_length=32)


class PrivacyReport(BaseModel):
    """A site's privacy spending against its own budget."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(ge=0, le=1e6)
    delta: float = Field(gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0, le=1e6)


class HeartbeatCreate(BaseModel):
    """An agent's periodic report: alive, what it is doing, with which versions, how much ε it spent."""

    model_config = ConfigDict(extra="forbid")

    state: AgentState
    job_id: JobId | None = None
    round: int | None = Field(default=None, ge=0, le=100_000)
    message: str = Field(default="", max_length=500)
    environment: Environment
    privacy: PrivacyReport | None = None
    data_size: int | None = Field(
        default=None, ge=0, le=10**12, description="training rows (weighted site sampling draws by it)"
    )


class SiteStatusReport(BaseModel):
    """The last heartbeat of a site's agent, and whether it is recent enough to call the site online."""

    state: AgentState
    online: bool
    last_seen_at: datetime
    job_id: JobId | None = None
    round: int | None = None
    message: str = ""
    environment: Environment
    privacy: PrivacyReport | None = None
    data_size: int | None = None


class SitePublic(BaseModel):
    """A site as operators see it."""

    id: SiteId
    name: str
    organisation: str
    contact: str
    public_key: str
    status: SiteStatus
    created_at: datetime
    decided_at: datetime | None = None
    agent: SiteStatusReport | None = Field(default=None, description="the agent's last heartbeat, if any")


class SiteApproved(BaseModel):
    """Approval result; ``credential`` is shown this once and stored only hashed."""

    site: SitePublic
    credential: str


class FederationCreate(BaseModel):
    """A keyserver admin's request for a new federation and its HE context."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    parameters: HeParameters = Field(
        default_factory=BfvParameters,
        description="BFV (the packed codec, the default) or CKKS (ckks-seeded-last-v2) encryption parameters",
    )
    endorsements_required: int = Field(
        default=0,
        ge=0,
        le=100,
        description=(
            "k: once the federation has had k active members, a new member is admitted only when k "
            "existing members have signed its public key (0: the keyserver admin admits alone)"
        ),
    )


class ContextInfo(BaseModel):
    """Public facts about one HE context."""

    key_id: KeyId
    federation_id: FederationId
    parameters: HeParameters
    created_at: datetime
    retired_at: datetime | None = None


class FederationPublic(BaseModel):
    """A federation, its admission policy and its current key."""

    id: FederationId
    name: str
    key_id: KeyId
    created_at: datetime
    endorsements_required: int
    bootstrap_complete: bool = Field(description="whether new members now need endorsements_required endorsements")
    contexts: list[ContextInfo]


class FederationOverview(BaseModel):
    """A federation as the coordinator's operators see it: its members (from the keyserver) and jobs."""

    id: FederationId
    name: str
    members: list[SiteId]
    jobs: list[JobId]


class MemberStatus(StrEnum):
    """Lifecycle of a site's membership in a federation (held by the keyserver)."""

    PROPOSED = "proposed"
    ACTIVE = "active"
    REVOKED = "revoked"


class MemberCreate(BaseModel):
    """A keyserver admin proposes (or, without an endorsement rule, admits) a site as a member."""

    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    public_key: str = Field(max_length=64, description="base64 of the site's 32-byte Ed25519 public key, pinned here")
    name: str = Field(default="", max_length=200)


class MemberPublic(BaseModel):
    """A member of a federation as the keyserver holds it."""

    federation_id: FederationId
    site_id: SiteId
    name: str
    public_key: str
    status: MemberStatus
    proposed_at: datetime
    admitted_at: datetime | None = None
    revoked_at: datetime | None = None
    endorsed_by: list[SiteId] = Field(default_factory=list)


class SignedRequest(BaseModel):
    """Proof that a site holding its pinned signing key asked for this, here, now, once."""

    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    timestamp: int = Field(ge=0, le=2**40)
    nonce: Nonce
    signature: str = Field(max_length=128)


class KeyReleaseRequest(SignedRequest):
    """A member site's signed request for the secret context of ``key_id``."""


class PinnedKeysRequest(SignedRequest):
    """A member site's signed request for the pinned keys of its federation's active members."""


class PinnedKey(BaseModel):
    """A member that is or was active, and the Ed25519 key the keyserver pins for it."""

    site_id: SiteId
    public_key: str = Field(max_length=64)
    status: Literal["active", "revoked"]


class FederationKeys(BaseModel):
    """The members of the federation that owns ``key_id`` that are or were active, with their pinned keys.

    A site checks a round that is running against the active ones, and a round published
    earlier (which a site catching up replays) against every one that was ever admitted.
    """

    federation_id: FederationId
    key_id: KeyId
    members: list[PinnedKey]


class EndorsementCreate(SignedRequest):
    """An active member's signature over a proposed member's pinned public key (``site_id`` is the endorser)."""


DEFAULT_CLIP_RANGE = 1.0
"""R of the default packing settings: sites send (w - w_global)·n_k/S, rarely beyond ±1."""


class JobCreate(BaseModel):
    """An operator's job definition."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    key_id: KeyId
    model: ModelSpec
    rounds: int = Field(default=5, ge=1, le=10_000, description="training rounds (a statistics step comes first)")
    min_sites: int = Field(default=3, ge=1, description="fewest uploads a round may publish with")
    target_sites: int | None = Field(
        default=None, ge=1, description="close the round as soon as this many uploads arrived (default min_sites)"
    )
    round_deadline_s: float = Field(default=600, gt=0, le=7 * 24 * 3600)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    dp: DPSettings = Field(default_factory=DPSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    statistics: StatisticsSettings | None = Field(
        default=None, description="pool each feature's mean and std under encryption before training (round 0)"
    )
    min_eval_sites: int = Field(
        default=1, ge=1, description="evaluations a round needs before its sample-weighted global metrics are shown"
    )
    public_test_set: PublicTestSet | None = None
    min_site_samples: int | None = Field(
        default=None, ge=1, description="the smallest site's training rows: the privacy plan is made for it"
    )
    max_site_samples: int | None = Field(
        default=None,
        ge=1,
        description="the largest site's training rows: planned too, and dp.delta must stay below 1 / it",
    )
    epsilon_warning: float = Field(
        default=10.0, gt=0, description="warn at creation when the planned ε of the smallest site exceeds this"
    )
    max_samples_per_round: int = Field(
        default=100_000,
        ge=1,
        description=(
            "public bound S on one site's training rows; sites encrypt (w - w_global)·n_k/S, so keep S close to "
            "the largest site: the packed codec's rounding error in the average grows with S / Σ n_k"
        ),
    )
    format_id: str | None = Field(
        default=None, description="update format; by default the one the federation's context takes (BFV: packed)"
    )
    packing: PackingSettings | None = Field(
        default=None,
        description=(
            "quantisation range, bits and the most sites a round may sum, for the packed codec "
            "(bfv-packed-v1; defaults: R = 1, 16 bits, 128 sites); settings that could overflow are refused"
        ),
    )
    secure_aggregation: SecureAggregationSettings | None = Field(
        default_factory=SecureAggregationSettings,
        description=(
            "masked aggregation that holds against the coordinator with up to t - 1 colluding members "
            "(ADR 0010); null runs without it: any one member with the coordinator can then read every update"
        ),
    )
    on_round_failure: Literal["retry", "stop"] = "retry"
    max_round_attempts: int = Field(default=3, ge=1, le=100)
    seed: int = Field(default=0, ge=0, description="seed of the public initial weights (not of any DP noise)")

    @model_validator(mode="after")
    def _check(self) -> JobCreate:
        target = self.target_sites or self.min_sites
        if target < self.min_sites:
            raise ValueError("target_sites must be at least min_sites")
        if self.sampling.mode != "all" and self.sampling.min_sites < self.min_sites:
            raise ValueError("sampling.min_sites must be at least min_sites, or no sampled round could publish")
        self._check_packing(target)
        self._check_site_sizes()
        self._check_secure_aggregation()
        self._check_data_contract()
        return self

    def _check_site_sizes(self) -> None:
        smallest, largest = self.min_site_samples, self.max_site_samples
        if smallest is not None and largest is not None and largest < smallest:
            raise ValueError(f"max_site_samples={largest} is below min_site_samples={smallest}")
        if largest is not None and largest > self.max_samples_per_round:
            raise ValueError(
                f"max_site_samples={largest} is over max_samples_per_round={self.max_samples_per_round}: "
                "a site that large would be refused every round; raise max_samples_per_round"
            )
        declared = largest or smallest
        if declared is not None and self.dp.delta >= 1 / declared:
            field = "max_site_samples" if largest is not None else "min_site_samples"
            raise ValueError(
                f"dp.delta={self.dp.delta:g} is not below 1/n = {1 / declared:.3g} for a site of {field}={declared} "
                "rows: at that δ the guarantee allows a row of every site to be released in the clear; "
                f"set dp.delta well below {1 / declared:.3g} (1e-5 or less is usual)"
            )

    def _check_secure_aggregation(self) -> None:
        if self.secure_aggregation is None:
            return
        self.secure_aggregation = self.secure_aggregation.resolved(self.min_sites)
        threshold = self.secure_aggregation.threshold
        assert threshold is not None
        if self.min_sites <= threshold:
            raise ValueError(
                f"min_sites={self.min_sites} leaves secure aggregation's promise empty: with threshold t={threshold} "
                f"a round needs at least t + 1 = {threshold + 1} uploads (raise min_sites, lower the threshold to "
                "at least 2, or set secure_aggregation to null to run without it)"
            )
        if self.format_id not in (None, PACKED_FORMAT_ID):
            raise ValueError(
                f"secure aggregation needs format {PACKED_FORMAT_ID}; "
                f"set secure_aggregation to null for {self.format_id}"
            )

    @property
    def threshold(self) -> int | None:
        """t of secure aggregation, or None when the job runs without it."""
        return None if self.secure_aggregation is None else self.secure_aggregation.threshold

    def _check_packing(self, target: int) -> None:
        if self.format_id == PACKED_FORMAT_ID and self.packing is None:
            self.packing = PackingSettings(clip_range=DEFAULT_CLIP_RANGE, max_sites=max(128, target))
        if self.packing is None:
            return
        if self.format_id not in (None, PACKED_FORMAT_ID):
            raise ValueError(f"packing settings apply only to format {PACKED_FORMAT_ID}")
        # Whether the sum can overflow depends on the federation's plaintext modulus: the
        # aggregator checks that against the federation's own context when it creates the job.
        if self.packing.max_sites < target:
            raise ValueError("packing.max_sites must be at least the round's target number of sites")

    def _check_data_contract(self) -> None:
        if self.statistics is not None:
            if self.model.normalisation is not None:
                raise ValueError("give a fixed model.normalisation or a statistics step, not both")
            if len(self.statistics.feature_bounds) != self.model.input_shape[-1]:
                raise ValueError("statistics.feature_bounds needs one bound per input feature (per channel for images)")
        if self.public_test_set is not None:
            width = math.prod(self.model.input_shape)
            if len(self.public_test_set.x[0]) != width:
                raise ValueError(f"public_test_set rows must hold {width} values (the model's input_shape flattened)")
            if any(not 0 <= label < self.model.num_classes for label in self.public_test_set.y):
                raise ValueError(f"public_test_set labels must be class indices 0..{self.model.num_classes - 1}")

    def statistics_packing(self) -> PackingSettings:
        """The packed codec's settings for the statistics vector (values in [-1, 1], more bits)."""
        if self.statistics is None or self.packing is None:
            raise ValueError("statistics packing needs a statistics step and packing settings")
        return PackingSettings(clip_range=1.0, bits=self.statistics.bits, max_sites=self.packing.max_sites)

    @property
    def total_rounds(self) -> int:
        """Rounds the job runs: the statistics step (if any), then the training rounds."""
        return self.rounds + (1 if self.statistics is not None else 0)

    def is_statistics_round(self, number: int) -> bool:
        """Whether round ``number`` is the statistics step (round 0 of a job that has one)."""
        return self.statistics is not None and number == 0

    def round_packing(self, number: int) -> PackingSettings | None:
        """The packing settings uploads to round ``number`` are encrypted with."""
        return (
            self.statistics_packing() if self.packing is not None and self.is_statistics_round(number) else self.packing
        )

    def round_num_values(self, number: int) -> int:
        """How many values an upload to round ``number`` carries (only the trainable ones when the
        model freezes some layers)."""
        if self.statistics is not None and number == 0:
            return self.statistics.num_values()
        return self.model.num_update_values()


class JobPublic(JobCreate):
    """A job as stored, with its progress."""

    model_config = ConfigDict(extra="ignore")

    format_id: str
    id: JobId
    federation_id: FederationId
    environment: Environment = Field(description="the versions every site must run (the aggregator's own at creation)")
    status: JobStatus
    current_round: int
    created_at: datetime
    finished_at: datetime | None = None
    num_parameters: int
    privacy_plan: PrivacyPlan | None = Field(
        default=None, description="ε per round for a site of min_site_samples training rows, planned at creation"
    )
    largest_site_plan: PrivacyPlan | None = Field(
        default=None, description="ε per round for a site of max_site_samples training rows, planned at creation"
    )
    warnings: list[str] = Field(default_factory=list, description="what the aggregator found doubtful at creation")
    upload_cost: UploadCost | None = Field(
        default=None,
        description="bytes one site's encrypted update costs per round with the job's packing, on its federation's "
        "parameters (packed BFV jobs only)",
    )


class SubmissionPublic(BaseModel):
    """One accepted upload, as operators see it (never its ciphertext)."""

    site_id: SiteId
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

    site_id: SiteId
    received_at: datetime


class DeclineReason(StrEnum):
    """Why a site will not upload to a round, or will not apply its published aggregate."""

    BUDGET_EXHAUSTED = "budget_exhausted"
    REFUSED = "refused"
    DATA_PROBLEM = "data_problem"
    ENVIRONMENT_MISMATCH = "environment_mismatch"
    STALE_KEY = "stale_key"
    ALREADY_UNMASKED = "already_unmasked"
    AGGREGATE_REFUSED = "aggregate_refused"
    IMPLAUSIBLE_AGGREGATE = "implausible_aggregate"
    OTHER = "other"


REFUSAL_REASONS = (DeclineReason.AGGREGATE_REFUSED, DeclineReason.IMPLAUSIBLE_AGGREGATE)
"""Reasons a site gives for not applying a published aggregate (the rest are for not uploading)."""


class DeclineCreate(BaseModel):
    """A site tells the operator it will not upload to this round, and why."""

    model_config = ConfigDict(extra="forbid")

    reason: DeclineReason
    message: str = Field(default="", max_length=500)


class DeclinePublic(DeclineCreate):
    """A recorded decline."""

    model_config = ConfigDict(extra="ignore")

    site_id: SiteId
    at: datetime


class RoundPublic(BaseModel):
    """One attempt at one round."""

    job_id: JobId
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
    declines: list[DeclinePublic] = Field(default_factory=list)
    submitted_by_caller: bool | None = None
    kind: Literal["statistics", "training"] = "training"
    selected_sites: list[SiteId] | None = Field(
        default=None, description="the sites a sampled round asks for (operators only; null: every member)"
    )
    caller_selected: bool | None = Field(default=None, description="to a site: whether this round asks for it")
    secure: bool = Field(default=False, description="whether the round runs secure aggregation's phases (ADR 0010)")
    num_advertised: int = Field(default=0, description="sites that advertised a key for this attempt (secure rounds)")
    roster: list[SiteId] | None = Field(
        default=None, description="secure rounds, once advertising closed: the sites whose uploads this attempt sums"
    )
    advertised: list[SiteId] = Field(
        default_factory=list, description="operators only, secure rounds: the sites that advertised a key this attempt"
    )
    answered: list[SiteId] = Field(
        default_factory=list, description="operators only, secure rounds: the sites that answered this unmasking"
    )
    advertised_by_caller: bool | None = Field(default=None, description="to a site: whether it advertised a key")
    answered_by_caller: bool | None = Field(default=None, description="to a site: whether it answered the unmasking")
    global_metrics: dict[str, float] | None = Field(
        default=None,
        description=(
            "operators only: the sites' evaluations averaged, weighted by their examples, once "
            "min_eval_sites sites have evaluated"
        ),
    )
    duration_s: float | None = Field(
        default=None,
        description=(
            "seconds from opening until the attempt ended: its publication, or its closing for a failed "
            "attempt (null while it runs)"
        ),
    )
    bytes_uploaded: int = Field(
        default=0, description="encrypted bytes of the uploads this attempt accepted, summed over its sites"
    )


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

    job_id: JobId
    number: int
    submissions: int
    counters_match: bool
    sum_matches: bool
    uploads_pruned: bool = Field(
        default=False,
        description="the round's uploads were removed by the retention period: its sum cannot be recomputed",
    )


class UpdateAccepted(BaseModel):
    """The aggregator's answer to an accepted upload."""

    job_id: JobId
    round: int
    attempt: int
    round_state: RoundState
    num_submissions: int
    sha256: str
    replayed: bool = Field(default=False, description="true when this exact upload had already been accepted")


class InitialWeightsPublic(BaseModel):
    """Given round-0 weights stored at the aggregator: a flat float64 vector named by its sha256."""

    sha256: str = Field(pattern=SHA256)
    num_values: int
    created_by: str
    created_at: datetime


class AccountCreate(BaseModel):
    """An admin's request for a new named account."""

    model_config = ConfigDict(extra="forbid")

    name: AccountName
    role: str = Field(description="admin or viewer (and service, at the keyserver)")


class AccountPublic(BaseModel):
    """A named account."""

    name: AccountName
    role: str
    created_at: datetime
    created_by: str
    disabled_at: datetime | None = None


class TokenCreate(BaseModel):
    """A request for a new API token for an account."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=200, description="what the token is for (shown in listings)")
    expires_in_days: int = Field(default=90, ge=1, le=366)


class TokenPublic(BaseModel):
    """An API token's metadata (the token itself is shown once, at issue)."""

    id: TokenId
    account: AccountName
    label: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class TokenIssued(BaseModel):
    """A new token, shown this once; only its SHA-256 is stored."""

    token: str
    info: TokenPublic


class WhoAmI(BaseModel):
    """The caller as the service sees it."""

    name: str
    role: str
    site_id: SiteId | None = None


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable code and a message for people."""

    code: str
    message: str
    detail: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail
