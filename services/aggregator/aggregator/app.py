"""The aggregator's FastAPI application and its deadline watcher."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from aggregator import migrations
from aggregator.contexts import EvaluationContexts, EvaluationContextSource
from aggregator.coordination import Coordination, CoordinationUnavailable, coordination_for
from aggregator.intake import UpdateIntake
from aggregator.jobs import JobCoordinator
from aggregator.metrics import Metrics
from aggregator.routes import audit, events, internal, jobs, sites
from aggregator.settings import AggregatorSettings
from aggregator.sites import SiteRegistry
from fedhe.api_client import KeyserverClient
from fedhe.db import SessionFactory, make_engine
from fedhe.http_errors import add_health_routes, install_error_handlers
from fedhe.migrations import upgrade

logger = logging.getLogger(__name__)


class DeadlineWatcher:
    """Finishes overdue rounds in the background, on the replica that holds the deadline lease.

    Deadlines live in the database, so whichever replica holds the lease sees every one of
    them; if the holder dies its lease expires and another replica takes over within
    ``lease_ttl``. If Redis is unreachable every replica sweeps (the job row lock keeps that
    safe) rather than letting deadlines slip.
    """

    def __init__(self, jobs: JobCoordinator, coordination: Coordination, interval_s: float):
        self._jobs = jobs
        self._coordination = coordination
        self._interval_s = interval_s
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_ttl_s = max(5.0, 5 * interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedhe-deadlines", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                fence = self._coordination.hold_lease("deadline-watcher", self._holder, self._lease_ttl_s)
                if fence is None:
                    continue
            except CoordinationUnavailable:
                fence = None
            try:
                self._jobs.expire_overdue_rounds(fence=fence)
            except Exception:  # a transient database error must not kill the watcher
                logger.exception("deadline check failed; retrying")


def create_app(
    settings: AggregatorSettings | None = None, context_source: EvaluationContextSource | None = None
) -> FastAPI:
    """Build the aggregator application (secrets are resolved here, so a bad config fails at start)."""
    settings = settings or AggregatorSettings()
    service_token = settings.service_secret()
    if settings.migrate_on_start:
        upgrade(settings.database_url, "aggregator", migrations)
    engine = make_engine(settings.database_url)
    sessions = SessionFactory(engine)
    source = context_source or KeyserverClient(settings.keyserver_url, service_token.get_secret_value(), timeout=30)
    contexts = EvaluationContexts(sessions, source)
    metrics = Metrics()
    coordination = coordination_for(settings.redis_url)
    coordinator = JobCoordinator(sessions, contexts, metrics, coordination)
    watcher = DeadlineWatcher(coordinator, coordination, settings.deadline_check_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher.start()
        yield
        watcher.stop()

    app = FastAPI(title="fedhe aggregator", version="0.1.0", lifespan=lifespan)
    app.state.sites = SiteRegistry(sessions)
    app.state.jobs = coordinator
    app.state.intake = UpdateIntake(coordinator, contexts, coordination)
    app.state.coordination = coordination
    app.state.sessions = sessions
    app.state.contexts = contexts
    app.state.operator_token = settings.operator_secret()
    app.state.service_token = service_token
    app.state.max_upload_bytes = settings.max_upload_bytes
    install_error_handlers(app)
    for router in (sites, internal, jobs, events, audit):
        app.include_router(router)

    add_health_routes(app, engine)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["health"])
    def prometheus_metrics() -> str:
        return metrics.render()

    return app
