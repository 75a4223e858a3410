"""Security headers on every answer of a fedhe service, added in one place for both services.

``SecurityHeaders`` is the outermost ASGI middleware of each app, so errors and limits refused
before a route (413, 429) carry the headers too. Over HTTPS every answer carries
``Strict-Transport-Security`` (browsers then refuse plain HTTP and certificate click-through for
the host; ``max-age`` 0 leaves it out). Every answer says ``nosniff``, may not be framed and sends
no referrer; one that sets no ``Cache-Control`` of its own (every API answer) is ``no-store``, so
no tokens, jobs or keys are kept in caches. Routes with their own policy (the dashboard's CSP
and ``no-cache``) keep it.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALWAYS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SecurityHeaders:
    """Adds HSTS (over HTTPS) and the headers of ``ALWAYS`` that an answer does not set itself."""

    def __init__(self, app: ASGIApp, *, hsts_max_age_s: int) -> None:
        self.app = app
        self._hsts = f"max-age={hsts_max_age_s}; includeSubDomains" if hsts_max_age_s > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in ALWAYS.items():
                    if name not in headers:
                        headers[name] = value
                if https and self._hsts is not None:
                    headers["Strict-Transport-Security"] = self._hsts
            await send(message)

        await self.app(scope, receive, send_with_headers)
