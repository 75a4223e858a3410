"""Running a service process: JSON logging and the HTTP(S) server."""

from __future__ import annotations

from fastapi import FastAPI

from fedhe.settings import ServiceSettings


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve ``app`` over TLS (plain HTTP only with ``insecure_http``) until told to stop.

    uvicorn's own logging set-up and access log are off: ``fedhe.logs`` writes JSON lines, and
    ``RequestLogging`` writes one access line per request with its request id.
    """
    import uvicorn

    tls = settings.server_tls()
    options = tls.uvicorn_options() if tls is not None else {}
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,
        **options,
    )
