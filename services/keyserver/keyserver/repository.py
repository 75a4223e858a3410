"""Storage of federations, contexts, members and audit events behind a small interface."""

from __future__ import annotations

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from fedhe.db import AuditingRepository
from fedhe.errors import NotFound
from fedhe.schemas import MemberStatus
from keyserver.tables import AuditRow, ContextRow, EndorsementRow, FederationRow, MemberRow


class KeyserverRepository(AuditingRepository):
    """Reads and writes the keyserver's rows within one session (one transaction)."""

    audit_row = AuditRow

    def __init__(self, session: Session):
        self.session = session

    def add(self, row: object) -> None:
        """Stage a new row."""
        self.session.add(row)

    def add_federation(self, federation: FederationRow, context: ContextRow) -> None:
        """Store a new federation and its first context."""
        self.session.add(federation)
        self.session.flush()
        self.session.add(context)

    def add_context(self, context: ContextRow) -> None:
        """Store another context (a key rotation)."""
        self.session.add(context)

    def federation(self, federation_id: str, *, for_update: bool = False) -> FederationRow:
        """The federation, or ``NotFound``; ``for_update`` locks it (membership changes serialise on it)."""
        query = select(FederationRow).where(FederationRow.id == federation_id)
        if for_update:
            query = query.with_for_update()
        row = self.session.scalars(query).first()
        if row is None:
            raise NotFound(f"no federation {federation_id!r}")
        return row

    def federations(self) -> list[FederationRow]:
        """All federations, oldest first."""
        return list(self.session.scalars(select(FederationRow).order_by(FederationRow.created_at)))

    def find_context(self, key_id: str) -> ContextRow | None:
        """The context, if it exists."""
        return self.session.get(ContextRow, key_id)

    def context(self, key_id: str) -> ContextRow:
        """The context, or ``NotFound``."""
        row = self.find_context(key_id)
        if row is None:
            raise NotFound(f"no context with key_id {key_id!r}")
        return row

    def contexts_of(self, federation_id: str) -> list[ContextRow]:
        """A federation's contexts, oldest first."""
        query = select(ContextRow).where(ContextRow.federation_id == federation_id).order_by(ContextRow.created_at)
        return list(self.session.scalars(query))

    def member(self, federation_id: str, site_id: str) -> MemberRow | None:
        """A site's membership in a federation, if any."""
        return self.session.get(MemberRow, (federation_id, site_id))

    def members_with_endorsers(self, federation_id: str) -> list[tuple[MemberRow, list[str]]]:
        """A federation's memberships, oldest first, each with the endorsers of its pinned key, oldest first."""
        query = (
            select(MemberRow, EndorsementRow.endorser_site_id)
            .outerjoin(
                EndorsementRow,
                and_(
                    EndorsementRow.federation_id == MemberRow.federation_id,
                    EndorsementRow.site_id == MemberRow.site_id,
                    EndorsementRow.public_key == MemberRow.public_key,
                ),
            )
            .where(MemberRow.federation_id == federation_id)
            .order_by(MemberRow.proposed_at, MemberRow.site_id, EndorsementRow.at)
        )
        members: dict[str, tuple[MemberRow, list[str]]] = {}
        for member, endorser in self.session.execute(query):
            _, endorsers = members.setdefault(member.site_id, (member, []))
            if endorser is not None:
                endorsers.append(endorser)
        return list(members.values())

    def count_active_members(self, federation_id: str) -> int:
        """How many members of a federation are active."""
        query = select(func.count()).where(
            MemberRow.federation_id == federation_id, MemberRow.status == MemberStatus.ACTIVE.value
        )
        return int(self.session.scalar(query) or 0)

    def endorsements(self, federation_id: str, site_id: str, public_key: str) -> list[EndorsementRow]:
        """Endorsements of a candidate's pinned key, oldest first."""
        query = (
            select(EndorsementRow)
            .where(
                EndorsementRow.federation_id == federation_id,
                EndorsementRow.site_id == site_id,
                EndorsementRow.public_key == public_key,
            )
            .order_by(EndorsementRow.at)
        )
        return list(self.session.scalars(query))

    def endorsement(self, federation_id: str, site_id: str, endorser: str, public_key: str) -> EndorsementRow | None:
        """One member's endorsement of a candidate's pinned key."""
        row = self.session.get(EndorsementRow, (federation_id, site_id, endorser))
        return row if row is not None and row.public_key == public_key else None
