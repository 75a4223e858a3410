"""Storage of federations, contexts and audit events behind a small interface."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedhe.errors import NotFound
from keyserver.tables import AuditRow, ContextRow, FederationRow


class KeyserverRepository:
    """Reads and writes the keyserver's rows within one session (one transaction)."""

    def __init__(self, session: Session):
        self._session = session

    def add_federation(self, federation: FederationRow, context: ContextRow) -> None:
        """Store a new federation and its first context."""
        self._session.add(federation)
        self._session.flush()
        self._session.add(context)

    def add_context(self, context: ContextRow) -> None:
        """Store another context (a key rotation)."""
        self._session.add(context)

    def federation(self, federation_id: str) -> FederationRow:
        """The federation, or ``NotFound``."""
        row = self._session.get(FederationRow, federation_id)
        if row is None:
            raise NotFound(f"no federation {federation_id!r}")
        return row

    def federations(self) -> list[FederationRow]:
        """All federations, oldest first."""
        return list(self._session.scalars(select(FederationRow).order_by(FederationRow.created_at)))

    def context(self, key_id: str) -> ContextRow:
        """The context, or ``NotFound``."""
        row = self._session.get(ContextRow, key_id)
        if row is None:
            raise NotFound(f"no context with key_id {key_id!r}")
        return row

    def contexts_of(self, federation_id: str) -> list[ContextRow]:
        """A federation's contexts, oldest first."""
        query = select(ContextRow).where(ContextRow.federation_id == federation_id).order_by(ContextRow.created_at)
        return list(self._session.scalars(query))

    def audit(self, *, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None) -> None:
        """Append an audit event in the same transaction as the change it records."""
        self._session.add(AuditRow(actor=actor, action=action, subject=subject, detail=detail or {}))

    def audit_events(self, limit: int) -> list[AuditRow]:
        """The newest audit events first."""
        return list(self._session.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)))
