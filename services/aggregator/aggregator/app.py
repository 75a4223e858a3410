"""The aggregator's FastAPI application and its deadline watcher."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from aggregator import migrations
from aggregator.access import JobAccess
from aggregator.contexts import EvaluationContexts, EvaluationContextSource
from aggregator.coordination import coordination_for
from aggregator.dashboard import router as dashboard
from aggregator.initial_weights import InitialWeightsStore
from aggregator.intake import UpdateIntake
from aggregator.jobs import JobCoordinator
from aggregator.membership import FederationMembers, MembershipSource
from aggregator.metrics import Metrics
from aggregator.publisher import RoundPublisher
from aggregator.repository import AggregatorRepository
from aggregator.routes import REGISTRATIONS, STREAMED_PATHS, audit, events, federations, initial_weights, jobs, sites
from aggregator.sampling import SiteSampler
from aggregator.settings import AggregatorSettings
from aggregator.sites import SiteRegistry
from aggregator.tables import AccountRow, ApiTokenRow
from aggregator.watcher import RoundWatcher
from fedhe import __version__
from fedhe.accounts import AccountService, Role
from fedhe.accounts_api import router as accounts_router
from fedhe.api_client import KeyserverClient
from fedhe.cpus import usable_cpus
from fedhe.db import SessionFactory, make_engine
from fedhe.http_auth import Authenticator
from fedhe.http_errors import add_health_routes
from fedhe.http_limits import base_limits
from fedhe.http_stack import install_http_stack
from fedhe.migrations import upgrade
from fedhe.openapi import ERRORS
from fedhe.ratelimit import Limit, RateLimiter, counters_for
from fedhe.refusals import RefusalAudit

logger = logging.getLogger(__name__)

# Every refusal of an upload is audited (not only 401, 403 and 429).
AUDITED_ROUTES = {"POST /v1/jobs/{job_id}/rounds/{number}/updates": "update.upload"}


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
        url_setting=settings.variable("keyserver_url"),
    )
    contexts = EvaluationContexts(sessions, context_source or keyserver)
    metrics = Metrics()
    coordination = coordination_for(settings.redis_url, settings.redis_key_prefix)
    members = FederationMembers(membership_source or keyserver, settings.membership_cache_s)
    coordinator = JobCoordinator(sessions, contexts, metrics, coordination, SiteSampler(members))
    publisher = RoundPublisher(sessions, contexts, coordinator, settings.sum_workers or usable_cpus())
    watcher = RoundWatcher(
        coordinator,
        publisher,
        coordination,
        settings.deadline_check_interval_s,
        settings.orphan_upload_after_s,
        settings.upload_retention_days,
    )
    registry = SiteRegistry(sessions, coordinator.publish_events)
    accounts = AccountService(
        sessions, AccountRow, ApiTokenRow, frozenset({Role.ADMIN, Role.VIEWER}), AggregatorRepository
    )
    bootstrap = settings.bootstrap_admin_secret()
    if bootstrap is not None:
        accounts.ensure_bootstrap(settings.bootstrap_admin, Role.ADMIN, bootstrap.get_secret_value())
    counters = counters_for(settings.redis_url, f"{settings.redis_key_prefix}:aggregator:rate")
    limiter = RateLimiter(
        {**base_limits(settings), REGISTRATIONS: Limit(settings.registrations_per_address, 3600)}, counters
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        coordinator.waiters.bind(asyncio.get_running_loop())
        watcher.start()
        publisher.start()
        yield
        watcher.stop()
        publisher.close()
        keyserver.close()

    app = FastAPI(title="fedhe aggregator", version=__version__, lifespan=lifespan)
    app.state.sites = registry
    app.state.jobs = coordinator
    app.state.intake = UpdateIntake(coordinator, contexts, coordination, publisher)
    app.state.publisher = publisher
    app.state.access = JobAccess(sessions, registry, members)
    app.state.coordination = coordination
    app.state.sessions = sessions
    app.state.contexts = contexts
    app.state.limiter = limiter
    app.state.authenticator = Authenticator(accounts, limiter, sites=registry.authenticate)
    app.state.max_upload_bytes = settings.max_upload_bytes
    app.state.initial_weights = InitialWeightsStore(sessions)
    app.state.max_initial_weights_bytes = settings.max_initial_weights_bytes
    app.state.metrics = metrics
    refusals = RefusalAudit(
        sessions,
        AggregatorRepository,
        per_minute=settings.refusal_audits_per_minute,
        counters=counters,
        registry=metrics.registry,
        routes=AUDITED_ROUTES,
    )
    install_http_stack(
        app,
        settings,
        service="aggregator",
        limiter=limiter,
        refusals=refusals,
        observe=metrics.http.request,
        streamed_paths=STREAMED_PATHS,
    )
    for router in (sites, federations, jobs, initial_weights, events, audit, accounts_router, dashboard):
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
