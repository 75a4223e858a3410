"""Limits every request passes before it reaches a route: body size and request budgets.

``RequestLimits`` is ASGI middleware. It refuses a body over ``max_body_bytes`` with 413 before
the application reads it (a declared ``Content-Length`` is refused without reading a byte; a
chunked body is read only up to the limit), and counts each request against a budget per
client address and per credential (429 with ``Retry-After`` once one is spent). Routes that
stream large bodies themselves (encrypted uploads) are named in ``streamed_paths`` and keep
their own, larger limit.
"""

from __future__ import annotations

import re

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedhe.errors import FedheError, PayloadTooLarge, TooManyRequests
from fedhe.ratelimit import Limit, RateLimiter
from fedhe.settings import ServiceSettings

PER_ADDRESS = "requests-per-address"
PER_CREDENTIAL = "requests-per-credential"
AUTH_FAILURES = "auth-failures-per-address"
AUTH_FAILURES_PER_CREDENTIAL = "auth-failures-per-credential"


def base_limits(settings: ServiceSettings) -> dict[str, Limit]:
    """The per-minute budgets every service enforces: requests per address and per credential, and
    failed authentications per address and per presented credential (the same number for both)."""
    return {
        PER_ADDRESS: Limit(settings.rate_limit_per_address, 60),
        PER_CREDENTIAL: Limit(settings.rate_limit_per_credential, 60),
        AUTH_FAILURES: Limit(settings.auth_failures_per_address, 60),
        AUTH_FAILURES_PER_CREDENTIAL: Limit(settings.auth_failures_per_address, 60),
    }


def client_address(request: Request) -> str:
    """The peer address of a request (proxies in front must preserve it, e.g. externalTrafficPolicy)."""
    return request.client.host if request.client is not None else "unknown"


def error_response(exc: FedheError) -> JSONResponse:
    """The JSON answer for ``exc``, with ``Retry-After`` when it is a rate limit."""
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyRequests) else None
    return JSONResponse(status_code=exc.status_code, content=exc.to_body(), headers=headers)


class RequestLimits:
    """Body-size limit and per-address / per-credential request budgets for one application."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, limiter: RateLimiter, streamed_paths: str | None = None
    ) -> None:
        self.app = app
        self._max = max_body_bytes
        self._limiter = limiter
        self._streamed = re.compile(streamed_paths) if streamed_paths else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            await to_thread.run_sync(self._count, request)
            if self._streamed is not None and self._streamed.fullmatch(scope["path"]):
                await self.app(scope, receive, send)
                return
            body = await self._read_limited(request, receive)
        except FedheError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _count(self, request: Request) -> None:
        self._limiter.hit(PER_ADDRESS, client_address(request))
        credential = request.headers.get("authorization")
        if credential:
            self._limiter.hit(PER_CREDENTIAL, credential)

    async def _read_limited(self, request: Request, receive: Receive) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max:
            raise PayloadTooLarge(
                f"body of {declared} bytes is over the {self._max}-byte limit", detail={"limit": self._max}
            )
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max:
                raise PayloadTooLarge(f"body is over the {self._max}-byte limit", detail={"limit": self._max})
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the connection's own messages (a disconnect, for streams)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
