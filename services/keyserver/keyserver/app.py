"""The keyserver's FastAPI application: thin routes over ``KeyService``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from pydantic import SecretStr

from fedhe.api_client import AggregatorClient
from fedhe.auth import bearer_token, tokens_match
from fedhe.db import SessionFactory, make_engine
from fedhe.errors import Unauthenticated
from fedhe.http_errors import add_health_routes, install_error_handlers
from fedhe.migrations import upgrade
from fedhe.schemas import AuditEventPublic, ContextInfo, FederationCreate, FederationPublic, KeyReleaseRequest
from keyserver import migrations
from keyserver.sealing import SecretSealer
from keyserver.service import KeyService, SiteDirectory
from keyserver.settings import KeyserverSettings

_OCTETS = "application/octet-stream"


def _service(request: Request) -> KeyService:
    service: KeyService = request.app.state.key_service
    return service


def _require(expected: SecretStr, authorization: str | None, role: str) -> str:
    if not tokens_match(bearer_token(authorization), expected.get_secret_value()):
        raise Unauthenticated(f"credential is not a valid {role} credential")
    return role


def _operator(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    return _require(request.app.state.operator_token, authorization, "operator")


def _aggregator(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    return _require(request.app.state.service_token, authorization, "aggregator")


KeyServiceDep = Annotated[KeyService, Depends(_service)]
OperatorDep = Annotated[str, Depends(_operator)]
AggregatorDep = Annotated[str, Depends(_aggregator)]

router = APIRouter(prefix="/v1")


@router.post("/federations", status_code=201, response_model=FederationPublic, tags=["federations"])
def create_federation(body: FederationCreate, service: KeyServiceDep, actor: OperatorDep) -> FederationPublic:
    """Create a federation and its CKKS context."""
    return service.create_federation(body, actor=actor)


@router.get("/federations", response_model=list[FederationPublic], tags=["federations"])
def list_federations(service: KeyServiceDep, _: OperatorDep) -> list[FederationPublic]:
    """All federations."""
    return service.federations()


@router.get("/federations/{federation_id}", response_model=FederationPublic, tags=["federations"])
def get_federation(federation_id: str, service: KeyServiceDep, _: OperatorDep) -> FederationPublic:
    """One federation with its contexts."""
    return service.federation(federation_id)


@router.post("/federations/{federation_id}/rotate", response_model=FederationPublic, tags=["federations"])
def rotate_key(federation_id: str, service: KeyServiceDep, actor: OperatorDep) -> FederationPublic:
    """Retire the current key and create a new one."""
    return service.rotate_key(federation_id, actor=actor)


@router.get("/contexts/{key_id}", response_model=ContextInfo, tags=["contexts"])
def context_info(key_id: str, service: KeyServiceDep) -> ContextInfo:
    """Public parameters of a context (no key material)."""
    return service.context_info(key_id)


@router.get("/contexts/{key_id}/evaluation", tags=["contexts"])
def evaluation_context(key_id: str, service: KeyServiceDep, actor: AggregatorDep) -> Response:
    """The keyless evaluation context, for the aggregator only."""
    return Response(service.evaluation_context(key_id, actor=actor), media_type=_OCTETS)


@router.post("/contexts/{key_id}/secret", tags=["contexts"])
def secret_context(key_id: str, body: KeyReleaseRequest, service: KeyServiceDep) -> Response:
    """The secret context, for an approved site presenting a fresh signature."""
    return Response(
        service.release_secret_context(key_id, body), media_type=_OCTETS, headers={"Cache-Control": "no-store"}
    )


@router.get("/audit", response_model=list[AuditEventPublic], tags=["audit"])
def list_audit_events(
    service: KeyServiceDep, _: OperatorDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditEventPublic]:
    """The newest audit events, newest first."""
    return service.audit_events(limit)


def create_app(settings: KeyserverSettings | None = None, sites: SiteDirectory | None = None) -> FastAPI:
    """Build the keyserver application (secrets are resolved here, so a bad config fails at start)."""
    settings = settings or KeyserverSettings()
    sealer = SecretSealer(settings.kek_secret().get_secret_value())
    service_token = settings.service_secret()
    if settings.migrate_on_start:
        upgrade(settings.database_url, "keyserver", migrations)
    engine = make_engine(settings.database_url)
    directory = sites or AggregatorClient(settings.aggregator_url, service_token.get_secret_value(), timeout=10)
    app = FastAPI(title="fedhe keyserver", version="0.1.0")
    app.state.key_service = KeyService(SessionFactory(engine), sealer, directory, settings.key_release_max_skew_s)
    app.state.operator_token = settings.operator_secret()
    app.state.service_token = service_token
    install_error_handlers(app)
    app.include_router(router)

    add_health_routes(app, engine)

    return app
