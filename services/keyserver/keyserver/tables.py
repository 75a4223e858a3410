"""The keyserver's tables: federations, their CKKS contexts (secrets sealed) and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedhe.db import AuditEventColumns, UTCDateTime, new_metadata, utcnow


class KeyserverBase(DeclarativeBase):
    """Declarative base of the keyserver's schema."""

    metadata = new_metadata()


class FederationRow(KeyserverBase):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    current_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ContextRow(KeyserverBase):
    __tablename__ = "contexts"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"), index=True)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    sealed_secret_context: Mapped[bytes] = mapped_column(LargeBinary)
    kek_fingerprint: Mapped[str] = mapped_column(String(32))
    evaluation_context: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditRow(AuditEventColumns, KeyserverBase):
    """Who did what to which subject, written in the same transaction as the change."""
