"""The keyserver's tables: federations, their HE contexts (secrets sealed), members, accounts, audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fedhe.accounts import AccountColumns, ApiTokenColumns
from fedhe.db import AuditEventColumns, UTCDateTime, new_metadata, utcnow


class KeyserverBase(DeclarativeBase):
    """Declarative base of the keyserver's schema."""

    metadata = new_metadata()


class FederationRow(KeyserverBase):
    __tablename__ = "federations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    current_key_id: Mapped[str] = mapped_column(String(64))
    endorsements_required: Mapped[int] = mapped_column(Integer, default=0)
    # Set once the federation first has endorsements_required active members; never cleared,
    # so revoking members cannot reopen admission by the admin alone.
    bootstrap_complete: Mapped[bool] = mapped_column(Boolean, default=False)
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


class MemberRow(KeyserverBase):
    """A site's membership in a federation, with the public key the keyserver pinned for it."""

    __tablename__ = "members"

    federation_id: Mapped[str] = mapped_column(ForeignKey("federations.id"), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    public_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    proposed_by: Mapped[str] = mapped_column(String(128))
    proposed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    admitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EndorsementRow(KeyserverBase):
    """An active member's signature over a proposed member's pinned public key."""

    __tablename__ = "endorsements"

    federation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endorser_site_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class UsedNonceRow(KeyserverBase):
    """Nonces of signed requests already accepted (the single-use check when there is no Redis)."""

    __tablename__ = "used_nonces"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class AccountRow(AccountColumns, KeyserverBase):
    """People (admin, viewer) and service identities (the aggregator) of the keyserver."""


class ApiTokenRow(ApiTokenColumns, KeyserverBase):
    """API tokens of keyserver accounts (SHA-256 only)."""


class AuditRow(AuditEventColumns, KeyserverBase):
    """Who did what to which subject, written in the same transaction as the change."""
