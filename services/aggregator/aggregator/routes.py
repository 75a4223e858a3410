"""The aggregator's HTTP routes: thin wrappers over the registry, coordinator and intake."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from aggregator.coordination import CoordinationUnavailable
from aggregator.deps import (
    AccessDep,
    AdminDep,
    CoordinationDep,
    IntakeDep,
    JobParticipantDep,
    JobsDep,
    JobSiteDep,
    OperatorDep,
    ParticipantDep,
    SiteDep,
    SitesDep,
)
from aggregator.initial_weights import InitialWeightsStore, read_limited
from aggregator.recovery import verify_round
from aggregator.repository import AggregatorRepository
from fedhe.auth import bearer_token
from fedhe.errors import InvalidRequest, Unauthenticated
from fedhe.http_limits import client_address
from fedhe.identifiers import JOB_ID, JobIdPath, RoundNumberPath, Sha256Path, SiteIdPath
from fedhe.openapi import CONFLICT, ERRORS, binary_request, binary_response
from fedhe.schemas import (
    AuditEventPublic,
    DeclineCreate,
    EvaluationCreate,
    FederationOverview,
    HeartbeatCreate,
    InitialWeightsPublic,
    JobCreate,
    JobPublic,
    RoundPublic,
    RoundState,
    RoundVerification,
    SiteApproved,
    SiteCreate,
    SitePublic,
    UpdateAccepted,
)
from fedhe.secagg.messages import AdvertisementCreate, Transcript, UnmaskingAnswer

_OCTETS = "application/octet-stream"
WAIT_LIMIT_S = 25
RECHECK_S = 0.5
# An event stream outlives the request that opened it: its credential is checked again this often.
STREAM_CREDENTIAL_CHECK_S = 5.0
REGISTRATIONS = "registrations-per-address"
# Bodies these routes stream themselves, each under its own limit (not the generic body limit).
STREAMED_PATHS = r"/v1/jobs/[^/]+/rounds/[^/]+/updates|/v1/initial-weights/[^/]+"

sites = APIRouter(prefix="/v1/sites", tags=["sites"], responses=ERRORS)
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


def _registration_budget(request: Request) -> None:
    request.app.state.limiter.hit(REGISTRATIONS, client_address(request))


def _json_body(request: Request) -> None:
    """Refuse a body not sent as JSON, saying so, before it fails validation as "not a valid dictionary".

    Registration is the one call site admins may make by hand (curl sends ``--data`` as a form).
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        sent = f"Content-Type: {media_type}" if media_type else "no Content-Type"
        raise InvalidRequest(
            f"the body must be JSON sent with the header Content-Type: application/json; this request had {sent} "
            "(with curl, add -H 'Content-Type: application/json')",
            code="unsupported_media_type",
        )


@sites.post(
    "",
    status_code=201,
    response_model=SitePublic,
    responses=CONFLICT,
    dependencies=[Depends(_json_body), Depends(_registration_budget)],
)
def register_site(body: SiteCreate, registry: SitesDep) -> SitePublic:
    """A site admin registers a site (no credential); it stays pending until an admin approves it.

    409 ``site_already_registered`` (naming the site) if a pending or approved site has this name and key.
    """
    return registry.register(body)


@sites.get("", response_model=list[SitePublic])
def list_sites(registry: SitesDep, _: OperatorDep) -> list[SitePublic]:
    """All sites."""
    return registry.sites()


@sites.get("/{site_id}", response_model=SitePublic)
def get_site(site_id: SiteIdPath, registry: SitesDep, _: OperatorDep) -> SitePublic:
    """One site."""
    return registry.site(site_id)


@sites.post("/{site_id}/approve", response_model=SiteApproved, responses=CONFLICT)
def approve_site(site_id: SiteIdPath, registry: SitesDep, caller: AdminDep) -> SiteApproved:
    """Approve a pending site; the answer carries its credential, shown only this once.

    Approval lets a site talk to the aggregator; which federations it belongs to (and so which
    jobs it sees and which keys it may get) is decided by the keyserver's membership alone.
    """
    return registry.approve(site_id, actor=caller.actor)


@sites.post("/{site_id}/reject", response_model=SitePublic, responses=CONFLICT)
def reject_site(site_id: SiteIdPath, registry: SitesDep, caller: AdminDep) -> SitePublic:
    """Reject a pending site."""
    return registry.reject(site_id, actor=caller.actor)


@sites.post("/{site_id}/revoke", response_model=SitePublic, responses=CONFLICT)
def revoke_site(site_id: SiteIdPath, registry: SitesDep, caller: AdminDep) -> SitePublic:
    """Revoke an approved site: its credential stops working at once."""
    return registry.revoke(site_id, actor=caller.actor)


federations = APIRouter(prefix="/v1/federations", tags=["federations"], responses=ERRORS)


@federations.get("", response_model=list[FederationOverview])
def list_federations(access: AccessDep, _: OperatorDep) -> list[FederationOverview]:
    """Federations with jobs here, their active members (as the keyserver lists them) and their jobs."""
    return access.federations()


@jobs.post("", status_code=201, response_model=JobPublic, responses=CONFLICT)
def create_job(body: JobCreate, coordinator: JobsDep, caller: AdminDep) -> JobPublic:
    """Create a job on a federation's key; round 0 opens at once."""
    return coordinator.create_job(body, actor=caller.actor)


@jobs.get("", response_model=list[JobPublic])
def list_jobs(coordinator: JobsDep, access: AccessDep, caller: ParticipantDep) -> list[JobPublic]:
    """All jobs (operators), or the jobs of the federations a site is a member of."""
    return [job for job in coordinator.jobs() if access.may_see(caller, job.federation_id)]


@jobs.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: JobIdPath, coordinator: JobsDep, _: JobParticipantDep) -> JobPublic:
    """One job and its progress."""
    return coordinator.job(job_id)


@jobs.post("/{job_id}/stop", response_model=JobPublic, responses=CONFLICT)
def stop_job(job_id: JobIdPath, coordinator: JobsDep, caller: AdminDep) -> JobPublic:
    """Stop a running job."""
    return coordinator.stop_job(job_id, actor=caller.actor)


@jobs.get("/{job_id}/rounds", response_model=list[RoundPublic])
def list_rounds(job_id: JobIdPath, coordinator: JobsDep, caller: JobParticipantDep) -> list[RoundPublic]:
    """Every attempt of every round; per-site details only for operators."""
    return coordinator.rounds(job_id, operator=caller.site_id is None, caller_site=caller.site_id)


@jobs.get("/{job_id}/rounds/{number}", response_model=RoundPublic)
async def get_round(
    job_id: JobIdPath,
    number: RoundNumberPath,
    coordinator: JobsDep,
    caller: JobParticipantDep,
    after_state: Annotated[RoundState | None, Query(description="answer once the state differs from this")] = None,
    after_attempt: Annotated[int | None, Query(ge=1, le=100, description="… or the attempt from this")] = None,
    wait_s: Annotated[float, Query(ge=0, le=WAIT_LIMIT_S, description="how long to wait for that")] = 0,
) -> RoundPublic:
    """The latest attempt of one round; with ``after_state`` (and ``after_attempt``) and ``wait_s``,
    as soon as it differs from what the caller saw, or after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        current = await run_in_threadpool(
            coordinator.round, job_id, number, operator=caller.site_id is None, caller_site=caller.site_id
        )
        moved = current.state != after_state or (after_attempt is not None and current.attempt != after_attempt)
        remaining = deadline - time.monotonic()
        if after_state is None or moved or remaining <= 0:
            return current
        # Woken at once by a change committed here; a change on another replica is seen at the re-check.
        await coordinator.waiters.wait(job_id, min(remaining, RECHECK_S))


@jobs.get("/{job_id}/rounds/{number}/verify", response_model=RoundVerification)
async def verify_round_sum(
    job_id: JobIdPath, number: RoundNumberPath, request: Request, _: OperatorDep
) -> RoundVerification:
    """Rebuild the round's encrypted sum from its stored submissions and compare (operators)."""
    return await run_in_threadpool(
        verify_round, request.app.state.sessions, request.app.state.publisher, job_id, number
    )


@jobs.get(
    "/{job_id}/rounds/{number}/aggregate",
    response_class=Response,
    responses=binary_response("the envelope of the round's published encrypted sum") | CONFLICT,
)
def get_aggregate(job_id: JobIdPath, number: RoundNumberPath, coordinator: JobsDep, _: JobSiteDep) -> StreamingResponse:
    """Round ``number``'s published encrypted sum, streamed chunk by chunk (member sites decrypt it)."""
    return StreamingResponse(iterate_in_threadpool(coordinator.aggregate(job_id, number)), media_type=_OCTETS)


@jobs.post(
    "/{job_id}/rounds/{number}/updates",
    status_code=201,
    response_model=UpdateAccepted,
    responses={**CONFLICT, 200: {"model": UpdateAccepted, "description": "this exact body was accepted before"}},
    openapi_extra=binary_request("a fedhe envelope: magic, JSON header, ciphertext chunks"),
)
async def upload_update(
    job_id: JobIdPath,
    number: RoundNumberPath,
    request: Request,
    response: Response,
    intake: IntakeDep,
    access: AccessDep,
    caller: JobSiteDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> UpdateAccepted:
    """Upload an encrypted update (a fedhe envelope) for round ``number``.

    201 when accepted; 200 with ``replayed: true`` when this exact body was accepted before.
    """
    assert caller.site_id is not None
    declared = request.headers.get("content-length")
    accepted = await intake.accept(
        site_id=caller.site_id,
        job_id=job_id,
        round_number=number,
        body=request.stream().__aiter__(),
        max_bytes=request.app.state.max_upload_bytes,
        declared_bytes=int(declared) if declared is not None and declared.isdigit() else None,
        idempotency_key=idempotency_key,
        expected_sites=await run_in_threadpool(access.expected_sites, job_id),
    )
    if accepted.replayed:
        response.status_code = 200
    return accepted


@jobs.post("/{job_id}/rounds/{number}/keys", status_code=201, responses=CONFLICT)
def advertise_key(
    job_id: JobIdPath,
    number: RoundNumberPath,
    body: AdvertisementCreate,
    coordinator: JobsDep,
    access: AccessDep,
    caller: JobSiteDep,
) -> dict[str, str]:
    """A site advertises its X25519 key for the current attempt of a secure round, signed with its key (ADR 0010)."""
    assert caller.site_id is not None
    coordinator.advertise(job_id, number, caller.site_id, body, expected_sites=access.expected_sites(job_id))
    return {"status": "recorded"}


@jobs.get("/{job_id}/rounds/{number}/transcript", response_model=Transcript, responses=CONFLICT)
def get_transcript(
    job_id: JobIdPath,
    number: RoundNumberPath,
    coordinator: JobsDep,
    caller: JobParticipantDep,
    attempt: Annotated[int | None, Query(ge=1, le=100)] = None,
) -> Transcript:
    """A secure round attempt's roster, signed upload statements and, once unmasked, self-mask seeds.

    To a site, each statement carries only the share sealed for that site.
    """
    return coordinator.transcript(job_id, number, caller_site=caller.site_id, attempt=attempt)


@jobs.post("/{job_id}/rounds/{number}/unmasking", status_code=201, responses=CONFLICT)
def answer_unmasking(
    job_id: JobIdPath, number: RoundNumberPath, body: UnmaskingAnswer, request: Request, caller: JobSiteDep
) -> dict[str, str]:
    """A roster member sends the shares it holds of the other members' self-mask seeds."""
    assert caller.site_id is not None
    closed = request.app.state.jobs.answer_unmasking(job_id, number, caller.site_id, body)
    if closed is not None:
        request.app.state.publisher.publish(job_id, closed)
    return {"status": "recorded"}


@jobs.post("/{job_id}/rounds/{number}/evaluations", status_code=201, responses=CONFLICT)
def post_evaluation(
    job_id: JobIdPath,
    number: RoundNumberPath,
    body: EvaluationCreate,
    coordinator: JobsDep,
    caller: JobSiteDep,
) -> dict[str, str]:
    """A site reports how round ``number``'s published model scores on its validation split."""
    assert caller.site_id is not None
    coordinator.record_evaluation(job_id, number, caller.site_id, body)
    return {"status": "recorded"}


@jobs.post("/{job_id}/rounds/{number}/declines", status_code=201, responses=CONFLICT)
def decline_round(
    job_id: JobIdPath,
    number: RoundNumberPath,
    body: DeclineCreate,
    coordinator: JobsDep,
    access: AccessDep,
    request: Request,
    caller: JobSiteDep,
) -> dict[str, str]:
    """A site says it will not upload to round ``number`` and why (the round closes once every
    member answered), or that it will not apply round ``number``'s published aggregate."""
    assert caller.site_id is not None
    closed = coordinator.record_decline(
        job_id, number, caller.site_id, body, expected_sites=access.expected_sites(job_id)
    )
    if closed is not None:
        request.app.state.publisher.publish(job_id, closed)
    return {"status": "recorded"}


@sites.post("/me/heartbeat", status_code=201)
def heartbeat(body: HeartbeatCreate, registry: SitesDep, request: Request, caller: SiteDep) -> dict[str, str]:
    """An agent reports that it is alive, what it is doing, its versions and the ε it spent."""
    assert caller.site_id is not None
    registry.heartbeat(caller.site_id, body)
    request.app.state.metrics.heartbeats.inc()
    return {"status": "recorded"}


initial_weights = APIRouter(prefix="/v1/initial-weights", tags=["initial weights"], responses=ERRORS)


@initial_weights.put(
    "/{sha256}",
    status_code=201,
    response_model=InitialWeightsPublic,
    responses={200: {"model": InitialWeightsPublic, "description": "these weights were stored before"}},
    openapi_extra=binary_request("the flat float64 little-endian weight vector whose sha256 is in the path"),
)
async def store_initial_weights(
    sha256: Sha256Path, request: Request, response: Response, caller: AdminDep
) -> InitialWeightsPublic:
    """Store given round-0 weights for jobs to start from (``model.initial_weights_sha256``)."""
    store: InitialWeightsStore = request.app.state.initial_weights
    data = await read_limited(request.stream().__aiter__(), request.app.state.max_initial_weights_bytes)
    stored, new = await run_in_threadpool(store.put, sha256, data, actor=caller.actor)
    if not new:
        response.status_code = 200
    return stored


@initial_weights.get(
    "/{sha256}", response_class=Response, responses=binary_response("the flat float64 little-endian weight vector")
)
def get_initial_weights(sha256: Sha256Path, request: Request, _: ParticipantDep) -> Response:
    """Stored round-0 weights (public to members, as every job's round-0 weights are)."""
    store: InitialWeightsStore = request.app.state.initial_weights
    return Response(store.get(sha256), media_type=_OCTETS)


events = APIRouter(prefix="/v1/events", tags=["events"], responses=ERRORS)


@events.get(
    "",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "SSE"}},
)
async def stream_events(
    request: Request,
    coordination: CoordinationDep,
    _: OperatorDep,
    job_id: Annotated[str | None, Query(pattern=JOB_ID)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Live round events as Server-Sent Events; reconnect with ``Last-Event-ID`` to resume.

    The stream ends once its credential is no longer valid (revoked, expired, account disabled).
    """
    accounts = request.app.state.authenticator.accounts

    async def generate() -> AsyncIterator[str]:
        # Fix the cursor once: re-reading "from now" on every poll would drop events published
        # between two polls.
        after = last_event_id
        while after is None and not await request.is_disconnected():
            try:
                after = await run_in_threadpool(coordination.latest_event_id)
            except CoordinationUnavailable:
                yield ": coordination unavailable, retrying\n\n"
                await asyncio.sleep(1)
        if after is None:
            return
        yield ": connected\n\n"
        checked = time.monotonic()
        while not await request.is_disconnected():
            if time.monotonic() - checked >= STREAM_CREDENTIAL_CHECK_S:
                # A session revoked or expired since must not keep receiving events; the client's
                # reconnection is then refused with 401.
                try:
                    await run_in_threadpool(accounts.authenticate, bearer_token(request.headers.get("authorization")))
                except Unauthenticated:
                    return
                checked = time.monotonic()
            try:
                batch = await run_in_threadpool(coordination.read_events, after, 5.0)
            except CoordinationUnavailable:
                yield ": coordination unavailable, retrying\n\n"
                await asyncio.sleep(1)
                continue
            if not batch:
                yield ": keep-alive\n\n"
            for event_id, event in batch:
                after = event_id
                if job_id is None or event.get("job_id") == job_id:
                    yield f"id: {event_id}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


audit = APIRouter(prefix="/v1/audit", tags=["audit"], responses=ERRORS)


@audit.get("", response_model=list[AuditEventPublic])
def list_audit_events(
    request: Request, _: OperatorDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditEventPublic]:
    """The newest audit events (registrations, decisions, jobs, accepted updates, rounds)."""
    with request.app.state.sessions.transaction() as session:
        return [AuditEventPublic.model_validate(row) for row in AggregatorRepository(session).audit_events(limit)]
