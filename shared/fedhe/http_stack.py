"""What every fedhe service wraps its routes in, in one order for both services.

From the outside in: security headers (so every answer has them, refusals included), request
logging (the request id and the service's name on every answer), the error handlers (one JSON
shape, refusals audited), then the body-size and rate limits.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from fedhe.http_errors import install_error_handlers
from fedhe.http_limits import RequestLimits
from fedhe.logs import RequestLogging
from fedhe.ratelimit import RateLimiter
from fedhe.refusals import RefusalAudit
from fedhe.security_headers import SecurityHeaders
from fedhe.settings import ServiceSettings


def install_http_stack(
    app: FastAPI,
    settings: ServiceSettings,
    *,
    service: str,
    limiter: RateLimiter,
    refusals: RefusalAudit,
    observe: Callable[[str | None, str, int, float], None],
    streamed_paths: str | None = None,
) -> None:
    """Add the limits, error handlers, logging and headers ``service`` answers with (outermost last)."""
    app.add_middleware(
        RequestLimits, max_body_bytes=settings.max_body_bytes, limiter=limiter, streamed_paths=streamed_paths
    )
    install_error_handlers(app, refusals)
    app.add_middleware(RequestLogging, service=service, observe=observe)
    app.add_middleware(SecurityHeaders, hsts_max_age_s=settings.hsts_max_age_s)
