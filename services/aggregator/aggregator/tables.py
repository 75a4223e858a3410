"""The aggregator's tables. Postgres (or embedded SQLite) is the source of truth."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedhe.accounts import AccountColumns, ApiTokenColumns
from fedhe.db import AuditEventColumns, UTCDateTime, new_metadata, utcnow


class AggregatorBase(DeclarativeBase):
    """Declarative base of the aggregator's schema."""

    metadata = new_metadata()


class SiteRow(AggregatorBase):
    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    organisation: Mapped[str] = mapped_column(String(200))
    contact: Mapped[str] = mapped_column(String(320))
    public_key: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), index=True)
    credential_sha256: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EvaluationContextRow(AggregatorBase):
    """Keyless contexts fetched from the keyserver (public parameters only)."""

    __tablename__ = "evaluation_contexts"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    federation_id: Mapped[str] = mapped_column(String(64))
    context: Mapped[bytes] = mapped_column(LargeBinary)
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class InitialWeightsRow(AggregatorBase):
    """Given round-0 weights (public to members): a flat float64 little-endian vector, by sha256."""

    __tablename__ = "initial_weights"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    num_values: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobRow(AggregatorBase):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_id: Mapped[str] = mapped_column(ForeignKey("evaluation_contexts.key_id"))
    federation_id: Mapped[str] = mapped_column(String(64), index=True)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Planned at creation (PLD composition is too slow to repeat on every read).
    privacy_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    largest_site_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    upload_cost: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RoundRow(AggregatorBase):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("job_id", "number", "attempt", name="uq_rounds_job_number_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    num_submissions: Mapped[int] = mapped_column(Integer, default=0)
    total_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    # Null: every member may upload; else the sites this (sampled) round asks for.
    selected_sites: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Secure rounds (ADR 0010): the advertisements this attempt sums, fixed when advertising
    # closed (sorted by site id), and the self-mask seeds rebuilt when unmasking completed.
    roster: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)
    self_mask_seeds: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


class AdvertisementRow(AggregatorBase):
    """A site's X25519 public key for one secure round attempt, signed with its pinned key."""

    __tablename__ = "advertisements"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(44))
    signature: Mapped[str] = mapped_column(String(88))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UnmaskingAnswerRow(AggregatorBase):
    """A roster member's answer to the unmasking: the shares it holds, each checked against its
    dealer's commitment before it was stored."""

    __tablename__ = "unmasking_answers"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    shares: Mapped[dict[str, str]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UploadRow(AggregatorBase):
    """An upload's ciphertext, stored chunk by chunk as it streams in.

    It counts only once a submission refers to it (one short transaction under the job's lock);
    an upload that never got that far is removed by the sweep.
    """

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    num_chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class UploadChunkRow(AggregatorBase):
    """One ciphertext chunk of an upload."""

    __tablename__ = "upload_chunks"

    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AggregateChunkRow(AggregatorBase):
    """One chunk of a round's published encrypted sum."""

    __tablename__ = "aggregate_chunks"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SubmissionRow(AggregatorBase):
    """An accepted upload: its plaintext header facts, and the upload that holds its chunks."""

    __tablename__ = "submissions"
    __table_args__ = (UniqueConstraint("round_id", "site_id", name="uq_submissions_round_site"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id"), unique=True)
    num_samples: Mapped[int] = mapped_column(BigInteger)
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Secure rounds: the site's signed statement (``fedhe.secagg.messages.UploadStatement``).
    statement: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class EvaluationRow(AggregatorBase):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("round_id", "site_id", name="uq_evaluations_round_site"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeclineRow(AggregatorBase):
    """A site's notice that it will not upload to a round, and why."""

    __tablename__ = "declines"
    __table_args__ = (UniqueConstraint("round_id", "site_id", name="uq_declines_round_site"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    reason: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SiteStatusRow(AggregatorBase):
    """What a site's agent last said about itself (heartbeat): state, versions, privacy spent."""

    __tablename__ = "site_status"

    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    environment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    privacy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    data_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AccountRow(AccountColumns, AggregatorBase):
    """Operators of the coordinator (admin, viewer); the keyserver has its own, separate accounts."""


class ApiTokenRow(ApiTokenColumns, AggregatorBase):
    """API tokens of aggregator accounts (SHA-256 only)."""


class AuditRow(AuditEventColumns, AggregatorBase):
    """Who did what to which subject, written in the same transaction as the change."""
