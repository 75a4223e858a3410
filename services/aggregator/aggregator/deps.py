"""Request dependencies: the services in ``app.state`` and who is calling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from aggregator.coordination import Coordination
from aggregator.intake import UpdateIntake
from aggregator.jobs import JobCoordinator
from aggregator.sites import SiteRegistry
from fedhe.auth import bearer_token, tokens_match
from fedhe.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the operator, the keyserver, or an approved site."""

    role: str
    site_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"site:{self.site_id}" if self.site_id else self.role


def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    token = bearer_token(authorization)
    state = request.app.state
    if tokens_match(token, state.operator_token.get_secret_value()):
        return Caller(role="operator")
    if tokens_match(token, state.service_token.get_secret_value()):
        return Caller(role="service")
    registry: SiteRegistry = state.sites
    return Caller(role="site", site_id=registry.authenticate(token))


def _operator(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if caller.role != "operator":
        raise PermissionDenied("this needs the operator credential")
    return caller


def _service(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if caller.role != "service":
        raise PermissionDenied("this needs the service credential")
    return caller


def _site(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if caller.role != "site":
        raise PermissionDenied("this needs an approved site's credential")
    return caller


def _participant(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    if caller.role not in ("operator", "site"):
        raise Unauthenticated("this needs the operator's or an approved site's credential")
    return caller


def _sites(request: Request) -> SiteRegistry:
    registry: SiteRegistry = request.app.state.sites
    return registry


def _jobs(request: Request) -> JobCoordinator:
    jobs: JobCoordinator = request.app.state.jobs
    return jobs


def _intake(request: Request) -> UpdateIntake:
    intake: UpdateIntake = request.app.state.intake
    return intake


OperatorDep = Annotated[Caller, Depends(_operator)]
ServiceDep = Annotated[Caller, Depends(_service)]
SiteDep = Annotated[Caller, Depends(_site)]
ParticipantDep = Annotated[Caller, Depends(_participant)]
SitesDep = Annotated[SiteRegistry, Depends(_sites)]
JobsDep = Annotated[JobCoordinator, Depends(_jobs)]
IntakeDep = Annotated[UpdateIntake, Depends(_intake)]


def _coordination(request: Request) -> Coordination:
    coordination: Coordination = request.app.state.coordination
    return coordination


CoordinationDep = Annotated[Coordination, Depends(_coordination)]
