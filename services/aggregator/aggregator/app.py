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
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from aggregator import migrations
from aggregator.access import JobAccess
from aggregator.contexts import EvaluationContexts, EvaluationContextSource
from aggregator.coordination import Coordination, CoordinationUnavailable, coordination_for
from aggregator.dashboard import router as dashboard
from aggregator.intake import UpdateIntake
from aggregator.jobs import JobCoordinator
from aggregator.membership import FederationMembers, MembershipSource
from aggregator.metrics import Metrics
from aggregator.repository import AggregatorRepository
from aggregator.routes import REGISTRATIONS, UPLOAD_PATH, audit, events, federations, jobs, sites
from aggregator.settings import AggregatorSettings
from aggregator.sites import SiteRegistry
from aggregator.tables import AccountRow, ApiTokenRow
from fedhe.accounts import AccountService, Role
from fedhe.accounts_api import router as accounts_router
from fedhe.api_client import KeyserverClient
from fedhe.db import SessionFactory, make_engine
from fedhe.http_auth import Authenticator
from fedhe.http_errors import add_health_routes, install_error_handlers
from fedhe.http_limits import RequestLimits, base_limits
from fedhe.logs import RequestLogging
from fedhe.migrations import upgrade
from fedhe.openapi import ERRORS
from fedhe.ratelimit import Limit, RateLimiter, counters_for

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
    settings: AggregatorSettings | None = None,
    context_source: EvaluationContextSource | None = None,
    membership_source: MembershipSource | None = None,
) -> FastAPI:
    """Build the aggregator application (secrets are resolved here, so a bad config fails at start)."""
    settings = settings or AggregatorSettings()
    if settings.migrate_on_start:
        upgrade(settings.database_url, "aggregator", migrations)
    engine = make_engine(settings.database_url)
    sessions = SessionFactory(engine)
    keyserver = KeyserverClient(
        settings.keyserver_url,
        settings.keyserver_secret().get_secret_value(),
        tls=settings.client_tls(),
        timeout=30,
    )
    contexts = EvaluationContexts(sessions, context_source or keyserver)
    metrics = Metrics()
    coordination = coordination_for(settings.redis_url)
    coordinator = JobCoordinator(sessions, contexts, metrics, coordination)
    watcher = DeadlineWatcher(coordinator, coordination, settings.deadline_check_interval_s)
    registry = SiteRegistry(sessions, coordinator.publish_events)
    members = FederationMembers(membership_source or keyserver, settings.membership_cache_s)
    accounts = AccountService(
        sessions, AccountRow, ApiTokenRow, frozenset({Role.ADMIN, Role.VIEWER}), AggregatorRepository
    )
    bootstrap = settings.bootstrap_admin_secret()
    if bootstrap is not None:
        accounts.ensure_bootstrap(settings.bootstrap_admin, Role.ADMIN, bootstrap.get_secret_value())
    limiter = RateLimiter(
        {**base_limits(settings), REGISTRATIONS: Limit(settings.registrations_per_address, 3600)},
        counters_for(settings.redis_url, "fedhe:aggregator:rate"),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher.start()
        yield
        watcher.stop()
        keyserver.close()

    app = FastAPI(title="fedhe aggregator", version="0.1.0", lifespan=lifespan)
    app.state.sites = registry
    app.state.jobs = coordinator
    app.state.intake = UpdateIntake(coordinator, contexts, coordination)
    app.state.access = JobAccess(sessions, registry, members)
    app.state.coordination = coordination
    app.state.sessions = sessions
    app.state.contexts = contexts
    app.state.limiter = limiter
    app.state.authenticator = Authenticator(accounts, limiter, sites=registry.authenticate)
    app.state.max_upload_bytes = settings.max_upload_bytes
    app.state.metrics = metrics
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.max_body_bytes,
        limiter=limiter,
        streamed_paths=UPLOAD_PATH,
    )
    install_error_handlers(app)
    app.add_middleware(RequestLogging, observe=metrics.request)
    for router in (sites, federations, jobs, events, audit, accounts_router, dashboard):
        app.include_router(router)

    add_health_routes(app, engine)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["health"], responses={429: ERRORS[429]})
    def prometheus_metrics() -> Response:
        """Metrics in Prometheus text format (no secrets, no per-site data); see docs/operator-guide.md."""
        with sessions.transaction() as session:
            counts = AggregatorRepository(session).counts()
        body = metrics.render(counts.sites, counts.sites_online, counts.jobs)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
