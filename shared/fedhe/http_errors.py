"""What every fedhe service app shares: error mapping (once, for all), refusal audit and health routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedhe.errors import FedheError, InvalidRequest, UpstreamUnavailable
from fedhe.http_limits import client_address, error_response
from fedhe.openapi import ERRORS
from fedhe.refusals import Refusal, RefusalAudit, requester_of

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI, refusals: RefusalAudit | None = None) -> None:
    """Make every error leave the service as a JSON body ``{"error": {"code", "message"}}``,
    and have ``refusals`` audit the refused requests among them."""

    async def audit(request: Request, status: int, reason: str) -> None:
        if refusals is None:
            return
        route = request.scope.get("route")
        refusal = Refusal(
            method=request.method,
            route=getattr(route, "path", None),
            path_params=request.path_params,
            status=status,
            reason=reason,
            client=client_address(request),
            requester=requester_of(request),
        )
        await run_in_threadpool(refusals.record, refusal)

    @app.exception_handler(FedheError)
    async def _fedhe_error(request: Request, exc: FedheError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.code)
        await audit(request, exc.status_code, exc.code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"location": ".".join(str(part) for part in err.get("loc", ())), "problem": err.get("msg", "")}
            for err in exc.errors()
        ]
        error = InvalidRequest("request did not validate", detail={"problems": problems})
        await audit(request, 400, error.code)
        return JSONResponse(status_code=400, content=error.to_body())

    @app.exception_handler(SQLAlchemyOperationalError)
    @app.exception_handler(SQLAlchemyTimeoutError)
    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("%s %s: database unavailable (%s)", request.method, request.url.path, type(exc).__name__)
        error = UpstreamUnavailable(
            "the database is unavailable or saturated; retry shortly", code="database_unavailable"
        )
        return JSONResponse(status_code=503, content=error.to_body(), headers={"Retry-After": "2"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(status_code=exc.status_code, content={"error": {"code": code, "message": str(exc.detail)}})


def add_health_routes(app: FastAPI, engine: Engine) -> None:
    """``/healthz`` (the process answers) and ``/readyz`` (its database answers too)."""

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: ERRORS[503], 429: ERRORS[429]})
    def readyz() -> dict[str, str]:
        """The process answers and its database does too."""
        with engine.connect():
            pass
        return {"status": "ready"}
