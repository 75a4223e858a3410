"""The site registry: registration, operator decisions and credential checks."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from aggregator.coordination import Event
from aggregator.repository import AggregatorRepository
from aggregator.tables import SiteRow, SiteStatusRow
from aggregator.views import site_public, site_status
from fedhe.accounts import Principal
from fedhe.auth import SITE_CREDENTIAL_PREFIX, hash_token, new_token, parse_public_key
from fedhe.db import SessionFactory, utcnow
from fedhe.errors import Conflict, PermissionDenied, Unauthenticated
from fedhe.identifiers import new_id
from fedhe.schemas import HeartbeatCreate, SiteApproved, SiteCreate, SitePublic, SiteStatus

SITE_ROLE = "site"


def _already_registered(existing: SiteRow) -> Conflict:
    """The refusal of a second registration of ``existing``, saying what to do instead."""
    if existing.status == SiteStatus.APPROVED.value:
        advice = (
            "use that site id with the credential issued at its approval; if the credential is lost, "
            f"ask the aggregator admin to revoke {existing.id} and register again with a new signing key"
        )
    else:
        advice = "it awaits an operator's decision: send that site id to your operators instead of registering again"
    return Conflict(
        f"{existing.name!r} is already registered with this public key as {existing.id} ({existing.status}): {advice}",
        code="site_already_registered",
        detail={"site_id": existing.id, "status": existing.status},
    )


class SiteRegistry:
    """Sites move pending → approved (credential issued) → revoked, or pending → rejected."""

    def __init__(self, sessions: SessionFactory, publish: Callable[[list[Event]], None]):
        self._sessions = sessions
        self._publish = publish

    def register(self, request: SiteCreate) -> SitePublic:
        """Record a registration; the site stays pending until an operator decides.

        A registration with the name and public key of a site that is pending or approved is
        refused (409 ``site_already_registered``, naming that site), not recorded as a second
        pending site an operator could approve by mistake. The same name and key after a
        rejection or revocation (both final) is a new registration.
        """
        parse_public_key(request.public_key)
        row = SiteRow(
            id=new_id("site"),
            name=request.name,
            organisation=request.organisation,
            contact=request.contact,
            public_key=request.public_key,
            status=SiteStatus.PENDING.value,
        )
        with self._sessions.transaction() as session:
            existing = session.scalars(
                select(SiteRow)
                .where(
                    SiteRow.name == request.name,
                    SiteRow.public_key == request.public_key,
                    SiteRow.status.in_([SiteStatus.PENDING.value, SiteStatus.APPROVED.value]),
                )
                .order_by(SiteRow.created_at)
            ).first()
            if existing is not None:
                raise _already_registered(existing)
            repo = AggregatorRepository(session)
            repo.add(row)
            repo.audit(actor=f"site:{row.id}", action="site.register", subject=row.id, detail={"name": row.name})
        self._publish([_site_event("site.registered", row.id)])
        return site_public(row)

    def _decide(
        self, site_id: str, *, allowed_from: SiteStatus, to: SiteStatus, actor: str
    ) -> tuple[SiteRow, str | None]:
        credential = new_token(SITE_CREDENTIAL_PREFIX) if to == SiteStatus.APPROVED else None
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            row = repo.site(site_id)
            if row.status != allowed_from.value:
                raise Conflict(
                    f"site is {row.status}; only a {allowed_from.value} site can become {to.value}",
                    code="invalid_site_status",
                )
            row.status = to.value
            row.decided_at = utcnow()
            if credential is not None:
                row.credential_sha256 = hash_token(credential)
            repo.audit(actor=actor, action=f"site.{to.value}", subject=site_id)
        self._publish([_site_event(f"site.{to.value}", site_id, actor=actor)])
        return row, credential

    def approve(self, site_id: str, *, actor: str) -> SiteApproved:
        """Approve a pending site and issue its credential (returned once, stored hashed)."""
        row, credential = self._decide(site_id, allowed_from=SiteStatus.PENDING, to=SiteStatus.APPROVED, actor=actor)
        assert credential is not None
        return SiteApproved(site=site_public(row), credential=credential)

    def reject(self, site_id: str, *, actor: str) -> SitePublic:
        """Reject a pending site."""
        row, _ = self._decide(site_id, allowed_from=SiteStatus.PENDING, to=SiteStatus.REJECTED, actor=actor)
        return site_public(row)

    def revoke(self, site_id: str, *, actor: str) -> SitePublic:
        """Revoke an approved site: its credential stops working at once."""
        row, _ = self._decide(site_id, allowed_from=SiteStatus.APPROVED, to=SiteStatus.REVOKED, actor=actor)
        return site_public(row)

    def sites(self) -> list[SitePublic]:
        """All sites, each with its agent's last heartbeat."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            statuses = repo.site_statuses()
            return [site_public(row, statuses.get(row.id)) for row in repo.sites()]

    def site(self, site_id: str) -> SitePublic:
        """One site, with its agent's last heartbeat."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            return site_public(repo.site(site_id), repo.site_status(site_id))

    def heartbeat(self, site_id: str, report: HeartbeatCreate) -> None:
        """Record an agent's heartbeat; a change of state is streamed to operators."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            row = repo.site_status(site_id)
            changed = row is None or row.state != report.state.value or row.job_id != report.job_id
            if row is None:
                row = SiteStatusRow(site_id=site_id)
                repo.add(row)
            row.state, row.job_id, row.round, row.message = (
                report.state.value,
                report.job_id,
                report.round,
                report.message,
            )
            row.environment = report.environment.model_dump()
            row.privacy = report.privacy.model_dump() if report.privacy is not None else {}
            if report.data_size is not None:
                row.data_size = report.data_size
            row.last_seen_at = utcnow()
            # The whole report, nested so it wakes no round waiter: the dashboard shows it as it
            # comes instead of asking for every site again.
            events = [_site_event("site.heartbeat", site_id, agent=site_status(row).model_dump(mode="json"))]
        if changed:
            events.append(
                _site_event(
                    "site.state",
                    site_id,
                    state=report.state.value,
                    job_id=report.job_id,
                    round=report.round,
                    message=report.message,
                )
            )
        self._publish(events)

    def public_key(self, site_id: str) -> str:
        """The Ed25519 public key a site registered (to compare with the keyserver's pinned key)."""
        with self._sessions.transaction() as session:
            return AggregatorRepository(session).site(site_id).public_key

    def authenticate(self, credential: str) -> Principal:
        """The approved site holding ``credential``; 401 if unknown, 403 if not approved."""
        digest = hash_token(credential)
        with self._sessions.transaction() as session:
            row = AggregatorRepository(session).site_by_credential(digest)
        if row is None or not hmac.compare_digest(row.credential_sha256 or "", digest):
            raise Unauthenticated("credential is not valid")
        if row.status != SiteStatus.APPROVED.value:
            raise PermissionDenied(f"site {row.id} is {row.status}", code="site_not_approved")
        return Principal(role=SITE_ROLE, name=row.id, site_id=row.id)


def _site_event(kind: str, site_id: str, **data: Any) -> Event:
    return {"kind": kind, "site_id": site_id, "at": utcnow().isoformat(), **data}
