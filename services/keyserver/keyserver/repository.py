"""Storage of federations, contexts and audit events behind a small interface."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedhe.db import AuditingRepository
from fedhe.errors import NotFound
from keyserver.tables import AuditRow, ContextRow, FederationRow


class KeyserverRepository(AuditingRepository):
    """Reads and writes the keyserver's rows within one session (one transaction)."""

    audit_row = AuditRow

    def __init__(self, session: Session):
        self.session = session

    def add_federation(self, federation: FederationRow, context: ContextRow) -> None:
        """Store a new federation and its first context."""
        self.session.add(federation)
        self.session.flush()
        self.session.add(context)

    def add_context(self, context: ContextRow) -> None:
        """Store another context (a key rotation)."""
        self.session.add(context)

    def federation(self, federation_id: str) -> FederationRow:
        """The federation, or ``NotFound``."""
        row = self.session.get(FederationRow, federation_id)
        if row is None:
            raise NotFound(f"no federation {federation_id!r}")
        return row

    def federations(self) -> list[FederationRow]:
        """All federations, oldest first."""
        return list(self.session.scalars(select(FederationRow).order_by(FederationRow.created_at)))

    def context(self, key_id: str) -> ContextRow:
        """The context, or ``NotFound``."""
        row = self.session.get(ContextRow, key_id)
        if row is None:
            raise NotFound(f"no context with key_id {key_id!r}")
        return row

    def contexts_of(self, federation_id: str) -> list[ContextRow]:
        """A federation's contexts, oldest first."""
        query = select(ContextRow).where(ContextRow.federation_id == federation_id).order_by(ContextRow.created_at)
        return list(self.session.scalars(query))
