"""Running a service process: logging set-up and the HTTP(S) server."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from fedhe.settings import ServiceSettings


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve ``app`` over TLS (plain HTTP only with ``insecure_http``) until told to stop."""
    import uvicorn

    tls = settings.server_tls()
    options = tls.uvicorn_options() if tls is not None else {}
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), **options)
