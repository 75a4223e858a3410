"""The keyserver's FastAPI application: thin routes over ``KeyService``.

Roles: ``admin`` (federations, members, accounts), ``viewer`` (reads), ``service`` (the
aggregator: keyless contexts and membership reads). Sites hold no keyserver token: they sign
each request with their pinned Ed25519 key. A signed request is limited per client address
before it is read, and per site only once its signature verified (``KeyService``); every refusal
of a signed route is audited, with the site it names as a claim until the signature verified.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from fedhe import __version__
from fedhe.accounts import AccountService, Principal, Role
from fedhe.accounts_api import router as accounts_router
from fedhe.db import SessionFactory, make_engine
from fedhe.http_auth import Authenticator, allow
from fedhe.http_errors import add_health_routes
from fedhe.http_limits import base_limits, client_address
from fedhe.http_stack import install_http_stack
from fedhe.identifiers import FederationIdPath, KeyIdPath, SiteIdPath
from fedhe.migrations import upgrade
from fedhe.openapi import CONFLICT, ERRORS, binary_response
from fedhe.ratelimit import Limit, RateLimiter, counters_for
from fedhe.refusals import RefusalAudit, Requester, requester_of
from fedhe.schemas import (
    AuditEventPublic,
    ContextInfo,
    EndorsementCreate,
    FederationCreate,
    FederationKeys,
    FederationPublic,
    KeyReleaseRequest,
    MemberCreate,
    MemberPublic,
    PinnedKeysRequest,
)
from keyserver import migrations
from keyserver.metrics import RELEASE_ACTION, KeyserverMetrics
from keyserver.nonces import nonce_store_for
from keyserver.repository import KeyserverRepository
from keyserver.sealing import SecretSealer
from keyserver.service import SIGNED_PER_SITE, KeyService
from keyserver.settings import KeyserverSettings
from keyserver.tables import AccountRow, ApiTokenRow

_OCTETS = "application/octet-stream"
SIGNED_PER_ADDRESS = "signed-requests-per-address"
RELEASE_PATH = "/contexts/{key_id}/secret"
PINNED_KEYS_PATH = "/contexts/{key_id}/members"
ENDORSE_PATH = "/federations/{federation_id}/members/{site_id}/endorsements"
# Every refusal of these is audited (not only 401, 403 and 429), under these actions.
AUDITED_ROUTES = {
    f"POST /v1{RELEASE_PATH}": RELEASE_ACTION,
    f"POST /v1{PINNED_KEYS_PATH}": "members.pinned_keys",
    f"POST /v1{ENDORSE_PATH}": "member.endorse",
}


def _service(request: Request) -> KeyService:
    service: KeyService = request.app.state.key_service
    return service


def _signed_request_budget(request: Request) -> None:
    limiter: RateLimiter = request.app.state.limiter
    limiter.hit(SIGNED_PER_ADDRESS, client_address(request))


def _signer(request: Request, claimed_site: str) -> Requester:
    """Who sent a signed request: the site it names, as a claim until its signature verifies."""
    requester = requester_of(request)
    requester.claims["claimed_site"] = claimed_site
    return requester


KeyServiceDep = Annotated[KeyService, Depends(_service)]
Admin = Annotated[Principal, allow(Role.ADMIN)]
Reader = Annotated[Principal, allow(Role.ADMIN, Role.VIEWER)]
MemberReader = Annotated[Principal, allow(Role.ADMIN, Role.VIEWER, Role.SERVICE)]
Aggregator = Annotated[Principal, allow(Role.SERVICE)]
SignedBudget = Depends(_signed_request_budget)


router = APIRouter(prefix="/v1", responses=ERRORS)
release = APIRouter(prefix="/v1", responses=ERRORS)


@router.post("/federations", status_code=201, response_model=FederationPublic, tags=["federations"])
def create_federation(body: FederationCreate, service: KeyServiceDep, caller: Admin) -> FederationPublic:
    """Create a federation, its HE context and its admission rule (keyserver admin)."""
    return service.create_federation(body, actor=caller.actor)


@router.get("/federations", response_model=list[FederationPublic], tags=["federations"])
def list_federations(service: KeyServiceDep, _: MemberReader) -> list[FederationPublic]:
    """All federations (admins, viewers, and the aggregator, whose operators see federations before their first job)."""
    return service.federations()


@router.get("/federations/{federation_id}", response_model=FederationPublic, tags=["federations"])
def get_federation(federation_id: FederationIdPath, service: KeyServiceDep, _: MemberReader) -> FederationPublic:
    """One federation with its contexts (admins, viewers, and the aggregator for its operators' overview)."""
    return service.federation(federation_id)


@router.post(
    "/federations/{federation_id}/rotate", response_model=FederationPublic, tags=["federations"], responses=CONFLICT
)
def rotate_key(federation_id: FederationIdPath, service: KeyServiceDep, caller: Admin) -> FederationPublic:
    """Retire the current key and create a new one (keyserver admin)."""
    return service.rotate_key(federation_id, actor=caller.actor)


@router.get("/federations/{federation_id}/members", response_model=list[MemberPublic], tags=["members"])
def list_members(federation_id: FederationIdPath, service: KeyServiceDep, _: MemberReader) -> list[MemberPublic]:
    """A federation's members with their pinned keys (admins, viewers, and the aggregator to bind sites)."""
    return service.members(federation_id)


@router.post(
    "/federations/{federation_id}/members",
    status_code=201,
    response_model=MemberPublic,
    tags=["members"],
    responses=CONFLICT,
)
def add_member(
    federation_id: FederationIdPath, body: MemberCreate, service: KeyServiceDep, caller: Admin
) -> MemberPublic:
    """Propose a site as a member, pinning its public key (keyserver admin).

    Admitted at once while the federation has fewer than ``endorsements_required`` members;
    after that it stays ``proposed`` until that many active members endorse it.
    """
    return service.add_member(federation_id, body, actor=caller.actor)


@router.post(
    "/federations/{federation_id}/members/{site_id}/revoke",
    response_model=MemberPublic,
    tags=["members"],
    responses=CONFLICT,
)
def revoke_member(
    federation_id: FederationIdPath, site_id: SiteIdPath, service: KeyServiceDep, caller: Admin
) -> MemberPublic:
    """Revoke a membership: no key of this federation is released to the site any more (keyserver admin)."""
    return service.revoke_member(federation_id, site_id, actor=caller.actor)


@router.post(
    ENDORSE_PATH,
    status_code=201,
    response_model=MemberPublic,
    tags=["members"],
    responses=CONFLICT,
    dependencies=[SignedBudget],
)
def endorse_member(
    federation_id: FederationIdPath,
    site_id: SiteIdPath,
    body: EndorsementCreate,
    service: KeyServiceDep,
    request: Request,
) -> MemberPublic:
    """An active member endorses a proposed member's pinned key, signing it (no bearer token)."""
    return service.endorse(federation_id, site_id, body, _signer(request, body.site_id))


@router.get("/contexts/{key_id}", response_model=ContextInfo, tags=["contexts"])
def context_info(key_id: KeyIdPath, service: KeyServiceDep, _: MemberReader) -> ContextInfo:
    """Public parameters of a context and its federation (no key material)."""
    return service.context_info(key_id)


@router.get(
    "/contexts/{key_id}/evaluation",
    tags=["contexts"],
    response_class=Response,
    responses=binary_response("the keyless evaluation context (no key of any kind)") | CONFLICT,
)
def evaluation_context(key_id: KeyIdPath, service: KeyServiceDep, caller: Aggregator) -> Response:
    """The keyless evaluation context, for the aggregator's service identity only."""
    return Response(service.evaluation_context(key_id, actor=caller.actor), media_type=_OCTETS)


@release.post(
    RELEASE_PATH,
    tags=["contexts"],
    response_class=Response,
    responses=binary_response("the federation's secret context") | CONFLICT,
    dependencies=[SignedBudget],
)
def secret_context(key_id: KeyIdPath, body: KeyReleaseRequest, service: KeyServiceDep, request: Request) -> Response:
    """The secret context, for an active member presenting a fresh, single-use signature for this keyserver."""
    return Response(
        service.release_secret_context(key_id, body, _signer(request, body.site_id)),
        media_type=_OCTETS,
        headers={"Cache-Control": "no-store"},
    )


@router.post(PINNED_KEYS_PATH, response_model=FederationKeys, tags=["contexts"], dependencies=[SignedBudget])
def pinned_keys(key_id: KeyIdPath, body: PinnedKeysRequest, service: KeyServiceDep, request: Request) -> FederationKeys:
    """The pinned keys of the active members of the key's federation, for an active member presenting a
    fresh, single-use signature (sites check secure rounds' signatures against these)."""
    return service.pinned_keys(key_id, body, _signer(request, body.site_id))


@router.get("/audit", response_model=list[AuditEventPublic], tags=["audit"])
def list_audit_events(
    service: KeyServiceDep, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditEventPublic]:
    """The newest audit events, newest first."""
    return service.audit_events(limit)


def create_app(settings: KeyserverSettings | None = None) -> FastAPI:
    """Build the keyserver application (secrets are resolved here, so a bad config fails at start)."""
    settings = settings or KeyserverSettings()
    sealer = SecretSealer(settings.kek_secret().get_secret_value())
    if settings.migrate_on_start:
        upgrade(settings.database_url, "keyserver", migrations)
    engine = make_engine(settings.database_url)
    sessions = SessionFactory(engine)
    accounts = AccountService(
        sessions, AccountRow, ApiTokenRow, frozenset({Role.ADMIN, Role.VIEWER, Role.SERVICE}), KeyserverRepository
    )
    bootstrap = settings.bootstrap_admin_secret()
    if bootstrap is not None:
        accounts.ensure_bootstrap(settings.bootstrap_admin, Role.ADMIN, bootstrap.get_secret_value())
    aggregator = settings.aggregator_secret()
    if aggregator is not None:
        accounts.ensure_bootstrap("aggregator", Role.SERVICE, aggregator.get_secret_value())
    counters = counters_for(settings.redis_url, f"{settings.redis_key_prefix}:keyserver:rate")
    limiter = RateLimiter(
        {
            **base_limits(settings),
            SIGNED_PER_ADDRESS: Limit(settings.key_releases_per_site * 4, 60),
            SIGNED_PER_SITE: Limit(settings.key_releases_per_site, 60),
        },
        counters,
    )
    app = FastAPI(title="fedhe keyserver", version=__version__)
    metrics = KeyserverMetrics()
    app.state.key_service = KeyService(
        sessions,
        sealer,
        nonce_store_for(settings.redis_url, settings.redis_key_prefix, sessions),
        audience=settings.audience(),
        max_skew_s=settings.key_release_max_skew_s,
        metrics=metrics,
        limiter=limiter,
    )
    app.state.authenticator = Authenticator(accounts, limiter)
    app.state.limiter = limiter
    refusals = RefusalAudit(
        sessions,
        KeyserverRepository,
        per_minute=settings.refusal_audits_per_minute,
        counters=counters,
        registry=metrics.registry,
        routes=AUDITED_ROUTES,
        observe=metrics.refusal,
    )
    install_http_stack(
        app, settings, service="keyserver", limiter=limiter, refusals=refusals, observe=metrics.http.request
    )
    for router_ in (router, release, accounts_router):
        app.include_router(router_)
    add_health_routes(app, engine)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["health"], responses={429: ERRORS[429]})
    def prometheus_metrics() -> Response:
        """Metrics in Prometheus text format: key releases by outcome, HTTP requests (no secrets)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
