"""Structured logs: one JSON object per line, with the request id that crossed every service.

A request id arrives in ``X-Request-ID`` (kept if it matches a strict pattern, otherwise replaced)
or is made here; it lives in a context variable for the request's duration, every log line
carries it, the answer echoes it, and fedhe's HTTP clients send it on, so one site action can be
followed from the agent through the aggregator to the keyserver.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
SERVICE_HEADER = "X-Fedhe-Service"
"""Names the service that answered, so a client pointed at the wrong port can say so."""
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedhe_request_id", default=None)

access_logger = logging.getLogger("fedhe.access")


def new_request_id() -> str:
    """A fresh request id (96 random bits)."""
    return secrets.token_hex(12)


def current_request_id() -> str | None:
    """The id of the request being served or made in this context, if any."""
    return _current.get()


@contextmanager
def request_id(value: str | None = None) -> Iterator[str]:
    """Run a block under ``value`` (or a fresh id): log lines and outgoing calls carry it."""
    chosen = value if value is not None and _REQUEST_ID.fullmatch(value) else new_request_id()
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True


def configure_logging(level: str, service: str, *, json_lines: bool = True) -> None:
    """Log to stderr at ``level``: JSON lines (``service``, ``request_id`` on each) unless told otherwise."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; an agent polling twice a second would drown its own log.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


class RequestLogging:
    """ASGI middleware: adopt or make the request id, echo it with the service's name, and log one
    access line per request.

    The access line has the route template, not the raw path, so identifiers never reach the log
    unvalidated; it never has headers or bodies, so no credential does either.
    """

    def __init__(
        self, app: ASGIApp, *, service: str, observe: Callable[[str | None, str, int, float], None] | None = None
    ) -> None:
        self.app = app
        self._service = service.encode()
        self._observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        started = time.perf_counter()
        status = 500
        with request_id(incoming.decode("latin-1") if incoming else None) as rid:

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", rid.encode()),
                        (SERVICE_HEADER.lower().encode(), self._service),
                    ]
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            finally:
                route = scope.get("route")
                seconds = time.perf_counter() - started
                if self._observe is not None:
                    self._observe(getattr(route, "path", None), scope["method"], status, seconds)
                access_logger.info(
                    "%s %s %s",
                    scope["method"],
                    getattr(route, "path", "<unmatched>"),
                    status,
                    extra={
                        "method": scope["method"],
                        "route": getattr(route, "path", None),
                        "status": status,
                        "duration_ms": round(1000 * seconds, 1),
                    },
                )
