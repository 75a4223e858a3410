"""Request dependencies: the services in ``app.state`` and who is calling.

Roles: ``admin`` (sites, jobs, accounts), ``viewer`` (reads everything an operator sees), and
approved sites (their own federations' jobs, models, uploads and evaluations).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from aggregator.access import JobAccess
from aggregator.coordination import Coordination
from aggregator.intake import UpdateIntake
from aggregator.jobs import JobCoordinator
from aggregator.sites import SITE_ROLE, SiteRegistry
from fedhe.accounts import Principal, Role
from fedhe.http_auth import allow
from fedhe.identifiers import JobIdPath


def _sites(request: Request) -> SiteRegistry:
    registry: SiteRegistry = request.app.state.sites
    return registry


def _jobs(request: Request) -> JobCoordinator:
    jobs: JobCoordinator = request.app.state.jobs
    return jobs


def _intake(request: Request) -> UpdateIntake:
    intake: UpdateIntake = request.app.state.intake
    return intake


def _access(request: Request) -> JobAccess:
    access: JobAccess = request.app.state.access
    return access


def _coordination(request: Request) -> Coordination:
    coordination: Coordination = request.app.state.coordination
    return coordination


def _visible_job_participant(
    job_id: JobIdPath,
    caller: Annotated[Principal, allow(Role.ADMIN, Role.VIEWER, SITE_ROLE)],
    access: Annotated[JobAccess, Depends(_access)],
) -> Principal:
    access.require(caller, job_id)
    return caller


def _visible_job_site(
    job_id: JobIdPath, caller: Annotated[Principal, allow(SITE_ROLE)], access: Annotated[JobAccess, Depends(_access)]
) -> Principal:
    access.require(caller, job_id)
    return caller


AdminDep = Annotated[Principal, allow(Role.ADMIN)]
# Job routes check visibility in a dependency, before the body is read or validated: to a site,
# a job outside its federations is a 404 whatever it sent.
JobParticipantDep = Annotated[Principal, Depends(_visible_job_participant)]
JobSiteDep = Annotated[Principal, Depends(_visible_job_site)]
OperatorDep = Annotated[Principal, allow(Role.ADMIN, Role.VIEWER)]
SiteDep = Annotated[Principal, allow(SITE_ROLE)]
ParticipantDep = Annotated[Principal, allow(Role.ADMIN, Role.VIEWER, SITE_ROLE)]
SitesDep = Annotated[SiteRegistry, Depends(_sites)]
JobsDep = Annotated[JobCoordinator, Depends(_jobs)]
IntakeDep = Annotated[UpdateIntake, Depends(_intake)]
AccessDep = Annotated[JobAccess, Depends(_access)]
CoordinationDep = Annotated[Coordination, Depends(_coordination)]
