"""Which jobs a caller may see: operators see all; a site sees its federations' jobs only.

To a site, a job of a federation it is not a member of does not exist (404), whatever route it
comes through: job, rounds, models, uploads, evaluations.
"""

from __future__ import annotations

from aggregator.membership import FederationMembers
from aggregator.repository import AggregatorRepository
from aggregator.sampling import eligible_members
from aggregator.sites import SITE_ROLE, SiteRegistry
from fedhe.accounts import Principal
from fedhe.db import SessionFactory
from fedhe.errors import NotFound
from fedhe.schemas import FederationOverview


class JobAccess:
    """Decides whether a caller may see a job, from the keyserver's membership of its federation."""

    def __init__(self, sessions: SessionFactory, sites: SiteRegistry, members: FederationMembers):
        self._sessions = sessions
        self._sites = sites
        self._members = members

    def may_see(self, caller: Principal, federation_id: str) -> bool:
        """Whether ``caller`` may see jobs of ``federation_id``."""
        if caller.role != SITE_ROLE:
            return True
        assert caller.site_id is not None
        return self._members.is_member(federation_id, caller.site_id, self._sites.public_key(caller.site_id))

    def expected_sites(self, job_id: str) -> int:
        """How many sites can answer a round of ``job_id``: active members approved here with their pinned key."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            return len(eligible_members(repo, self._members, repo.job(job_id).federation_id))

    def federations(self) -> list[FederationOverview]:
        """Every federation at the keyserver (and any with jobs here), with its active members and jobs."""
        with self._sessions.transaction() as session:
            jobs = AggregatorRepository(session).jobs()
        by_federation: dict[str, list[str]] = {federation_id: [] for federation_id in self._members.federation_ids()}
        for job in jobs:
            if job.federation_id:
                by_federation.setdefault(job.federation_id, []).append(job.id)
        return [
            FederationOverview(
                id=federation_id,
                name=self._members.name(federation_id),
                members=sorted(self._members.active(federation_id)),
                jobs=job_ids,
            )
            for federation_id, job_ids in sorted(by_federation.items())
        ]

    def require(self, caller: Principal, job_id: str) -> None:
        """``NotFound`` unless ``caller`` may see job ``job_id`` (checked before any work on it)."""
        with self._sessions.transaction() as session:
            federation_id = AggregatorRepository(session).job(job_id).federation_id
        if not self.may_see(caller, federation_id):
            raise NotFound(f"no job {job_id!r}")
