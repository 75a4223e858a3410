"""Job lifecycle: creating jobs, opening, closing and publishing rounds, deadlines."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from aggregator.contexts import EvaluationContexts
from aggregator.coordination import Coordination, CoordinationUnavailable, Event
from aggregator.initial_weights import require_initial_weights
from aggregator.metrics import Metrics
from aggregator.repository import AggregatorRepository
from aggregator.round_waiters import RoundWaiters
from aggregator.rounds import ACTIVE, RoundLifecycle, accepts_uploads
from aggregator.sampling import SiteSampler
from aggregator.secure_rounds import (
    fix_roster,
    rebuild_seeds,
    record_advertisement,
    record_answer,
    round_counts,
    transcript,
)
from aggregator.tables import DeclineRow, EvaluationRow, JobRow, RoundRow
from aggregator.views import job_public, round_public
from fedhe.db import SessionFactory, utcnow
from fedhe.environment import current as current_environment
from fedhe.errors import Conflict, InvalidRequest, NotFound
from fedhe.global_model import aggregate_header
from fedhe.he import (
    PackedBfvCodec,
    PackingLayout,
    PackingSettings,
    codec_for,
    format_for,
    load_evaluation_context,
    supported_formats,
)
from fedhe.identifiers import new_id
from fedhe.job_planning import creation_warnings, privacy_plan, upload_cost
from fedhe.schemas import (
    REFUSAL_REASONS,
    DeclineCreate,
    DeclineReason,
    EvaluationCreate,
    JobCreate,
    JobPublic,
    JobStatus,
    RoundPublic,
    RoundState,
)
from fedhe.secagg.messages import AdvertisementCreate, Transcript, UnmaskingAnswer

logger = logging.getLogger(__name__)


@dataclass
class JobChange:
    """One locked transaction on a job: the repository, the locked row, the events it caused."""

    repo: AggregatorRepository
    job: JobRow
    events: list[Event] = field(default_factory=list)

    def emit(self, kind: str, **data: Any) -> None:
        """Record an event to publish once the transaction commits."""
        self.events.append({"kind": kind, "job_id": self.job.id, "at": utcnow().isoformat(), **data})


AGGREGATE_BATCH_CHUNKS = 16
"""Summed chunks (122,965 bytes each with the packed codec) read and sent at a time: about 2 MB."""


def job_spec(row: JobRow) -> JobCreate:
    """The operator's definition of a stored job (its format resolved at creation)."""
    return JobCreate.model_validate(row.spec)


@dataclass(frozen=True)
class RoundEncoding:
    """How uploads to one round of a job are encrypted: the statistics step has its own length and packing."""

    key_id: str
    format_id: str
    packing: PackingSettings | None
    num_values: int


def round_encoding(job: JobRow, number: int) -> RoundEncoding:
    """The encoding of round ``number`` of a stored job."""
    spec = job_spec(job)
    assert spec.format_id is not None, "a stored job names its format"
    return RoundEncoding(
        key_id=job.key_id,
        format_id=spec.format_id,
        packing=spec.round_packing(number),
        num_values=spec.round_num_values(number),
    )


def check_selected(row: RoundRow, site_id: str) -> None:
    """``Conflict`` if round ``row`` was sampled and did not ask for ``site_id``."""
    if row.selected_sites is not None and site_id not in row.selected_sites:
        raise Conflict(
            f"round {row.number} (attempt {row.attempt}) did not select this site; it may take part in a later one",
            code="not_selected",
        )


class JobCoordinator:
    """Owns every change to jobs and rounds, each in one transaction under the job's lock.

    The job row is locked (``SELECT ... FOR UPDATE``) for the length of each change, so two
    requests, or two aggregator replicas, never interleave changes to one job's rounds. Within
    one replica, requests for the same job first queue on an in-process lock, so they wait
    without holding a database connection (fifty concurrent uploads would otherwise drain the
    pool while blocked on the row lock). SQLite has no row locks; in embedded mode one
    process-wide lock plays that part. What a round does next is decided by one place,
    ``aggregator.rounds``: every method that changes a round ends in ``RoundLifecycle.advance``,
    and returns the round's id when it left the round closed, so the caller sums and publishes it.
    """

    def __init__(
        self,
        sessions: SessionFactory,
        contexts: EvaluationContexts,
        metrics: Metrics,
        coordination: Coordination,
        sampler: SiteSampler,
        waiters: RoundWaiters | None = None,
    ):
        self._sessions = sessions
        self.waiters = waiters or RoundWaiters()
        self._contexts = contexts
        self._sampler = sampler
        self.metrics = metrics
        self._coordination = coordination
        self._embedded_lock = threading.RLock() if sessions.is_sqlite else None
        self._job_locks: dict[str, threading.Lock] = {}
        self._job_locks_guard = threading.Lock()
        self.lifecycle = RoundLifecycle(
            counts=lambda change, row, expected: round_counts(change.repo, job_spec(change.job), row, expected),
            on_roster=lambda change, row: fix_roster(change.repo, row),
            on_unmasked=lambda change, row: rebuild_seeds(change.repo, job_spec(change.job), row),
            select=lambda change: self._sampler.select(
                change.repo, change.job.federation_id, job_spec(change.job).sampling
            ),
        )

    @property
    def sessions(self) -> SessionFactory:
        """The database the coordinator works in."""
        return self._sessions

    def _local_lock(self, job_id: str) -> threading.RLock | threading.Lock:
        if self._embedded_lock is not None:
            return self._embedded_lock
        with self._job_locks_guard:
            return self._job_locks.setdefault(job_id, threading.Lock())

    @contextmanager
    def locked_job(self, job_id: str) -> Iterator[JobChange]:
        """A transaction holding the job's row lock; its events are published after commit."""
        with self._local_lock(job_id), self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            change = JobChange(repo, repo.job(job_id, for_update=True))
            yield change
        self.publish_events(change.events)

    def publish_events(self, events: list[Event]) -> None:
        """Wake this replica's requests waiting on the changed jobs, and send committed changes to
        the live stream (best effort: the database is the record)."""
        for job_id in {event["job_id"] for event in events if "job_id" in event}:
            self.waiters.changed(job_id)
        for event in events:
            self.metrics.observe(event)
            try:
                self._coordination.publish(event)
            except CoordinationUnavailable as exc:
                logger.warning("event %s not streamed: coordination unavailable (%s)", event["kind"], exc)

    def create_job(self, request: JobCreate, *, actor: str) -> JobPublic:
        """Store a job, with its format resolved, its privacy planned and its doubts noted; open its round 0."""
        self._contexts.require_current(request.key_id)
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            context_row = self._contexts.ensure(repo, request.key_id)
            spec, layout = self._resolved(request, context_row.context)
            spec.model.num_update_values()  # a spec that freezes layers must say how many values train
            if spec.model.initial_weights_sha256 is not None:
                require_initial_weights(repo, spec.model.initial_weights_sha256, spec.model.num_parameters())
            plan = None if spec.min_site_samples is None else privacy_plan(spec, spec.min_site_samples)
            largest = None if spec.max_site_samples is None else privacy_plan(spec, spec.max_site_samples)
            cost = None if layout is None else upload_cost(spec, layout=layout)
            row = JobRow(
                id=new_id("job"),
                name=spec.name,
                key_id=spec.key_id,
                federation_id=context_row.federation_id,
                spec=spec.model_dump(mode="json"),
                status=JobStatus.RUNNING.value,
                current_round=0,
                num_parameters=spec.model.num_parameters(),
                environment=current_environment().model_dump(),
                privacy_plan=None if plan is None else plan.model_dump(),
                largest_site_plan=None if largest is None else largest.model_dump(),
                warnings=creation_warnings(spec, plan, largest),
                upload_cost=None if cost is None else cost.model_dump(),
            )
            repo.add(row)
            repo.flush()
            change = JobChange(repo, row)
            change.emit("job.created", name=row.name, warnings=row.warnings)
            self.lifecycle.open_round(change, number=0, attempt=1)
            detail = {"key_id": spec.key_id, "format_id": spec.format_id, "warnings": row.warnings}
            repo.audit(actor=actor, action="job.create", subject=row.id, detail=detail)
        self.publish_events(change.events)
        return job_public(row)

    @staticmethod
    def _resolved(request: JobCreate, context: bytes) -> tuple[JobCreate, PackingLayout | None]:
        """``request`` with the format its federation's context takes, checked against that
        context, and the packing layout the context gives its training rounds (packed jobs only)."""
        evaluation = load_evaluation_context(context)
        format_id = request.format_id or format_for(evaluation)
        if format_id not in supported_formats():
            raise InvalidRequest(
                f"unsupported format_id {format_id!r}",
                code="unsupported_format",
                detail={"supported": supported_formats()},
            )
        try:
            spec = JobCreate.model_validate({**request.model_dump(), "format_id": format_id})
        except ValidationError as exc:
            raise InvalidRequest(
                f"the job does not fit its federation's {format_id} context: {exc.errors()[0]['msg']}",
                code="invalid_job",
            ) from exc
        # Building the codecs checks the scheme and that the packing cannot overflow this context.
        codec = codec_for(format_id, evaluation, options=spec.packing)
        codec.close()
        if spec.statistics is not None:
            codec_for(format_id, evaluation, options=spec.round_packing(0)).close()
        return spec, codec.layout if isinstance(codec, PackedBfvCodec) else None

    def publish_round(self, job_id: str, round_id: int) -> bool:
        """Publish a closed round whose sum is stored, and open the next round (or complete the job)."""
        with self.locked_job(job_id) as change:
            row = change.repo.round_by_id(round_id)
            if row is None or row.state != RoundState.CLOSED.value:
                return False
            self.lifecycle.publish(change, row)
            return True

    def expire_overdue_rounds(self, now: datetime | None = None, fence: int | None = None) -> list[tuple[str, int]]:
        """Advance every round whose phase deadline has passed; returns (job, round id) of those left closed.

        Safe to run on every replica at once: each job is re-checked under its row lock.
        """
        moment = now or utcnow()
        with self._sessions.transaction() as session:
            job_ids = AggregatorRepository(session).overdue_job_ids(moment)
        closed = []
        for job_id in job_ids:
            with self.locked_job(job_id) as change:
                row = change.repo.current_round(job_id, change.job.current_round)
                overdue = row is not None and row.deadline_at <= moment and RoundState(row.state) in ACTIVE
                if overdue and row is not None and self.lifecycle.advance(change, row, 0, now=moment, fence=fence):
                    closed.append((job_id, row.id))
        return closed

    def record_decline(
        self, job_id: str, number: int, site_id: str, decline: DeclineCreate, *, expected_sites: int
    ) -> int | None:
        """Record that a site will not upload to round ``number`` (once), or will not apply its
        published aggregate; returns the round's id when this closed the round (its sum is due).

        A refusal of a published aggregate as implausible fails the round and the job: every honest
        member decrypts the same sum and refuses it alike, so no later round could train.
        """
        with self.locked_job(job_id) as change:
            repo = change.repo
            if decline.reason in REFUSAL_REASONS:
                self._record_refusal(change, number, site_id, decline)
                return None
            row = self.waiting_round(change, number)
            check_selected(row, site_id)
            if repo.submission(row.id, site_id) is not None:
                raise Conflict(f"site already uploaded to round {number}", code="duplicate_update")
            self._add_decline(change, row, site_id, decline, "update.decline", "update.declined")
            return row.id if self.lifecycle.advance(change, row, expected_sites) else None

    @staticmethod
    def _add_decline(
        change: JobChange, row: RoundRow, site_id: str, decline: DeclineCreate, action: str, event: str
    ) -> dict[str, Any]:
        """Store a site's decline (or refusal) of a round attempt once, audited and streamed."""
        if change.repo.decline(row.id, site_id) is not None:
            raise Conflict(f"site already declined round {row.number}", code="duplicate_decline")
        change.repo.add(
            DeclineRow(round_id=row.id, site_id=site_id, reason=decline.reason.value, message=decline.message)
        )
        change.repo.flush()
        detail = {"round": row.number, "attempt": row.attempt, "reason": decline.reason.value}
        change.repo.audit(actor=f"site:{site_id}", action=action, subject=change.job.id, detail=detail)
        change.emit(event, site_id=site_id, message=decline.message, **detail)
        return detail

    def _record_refusal(self, change: JobChange, number: int, site_id: str, decline: DeclineCreate) -> None:
        repo, job = change.repo, change.job
        row = repo.current_round(job.id, number)
        if row is None or row.published_at is None:
            raise Conflict(f"round {number} has no published aggregate to refuse", code="round_not_published")
        detail = self._add_decline(change, row, site_id, decline, "aggregate.refuse", "aggregate.refused")
        if decline.reason == DeclineReason.IMPLAUSIBLE_AGGREGATE and row.state == RoundState.PUBLISHED.value:
            following = repo.current_round(job.id, job.current_round)
            if following is not None and following.id != row.id and RoundState(following.state) in ACTIVE:
                self.lifecycle.abandon(following, f"round {number}'s aggregate was refused as implausible")
            reason = f"implausible_aggregate: {site_id} refused it: {decline.message}"[:500]
            self.lifecycle.fail(change, row, reason, detail, retry=False)

    def advertise(
        self, job_id: str, number: int, site_id: str, body: AdvertisementCreate, *, expected_sites: int
    ) -> None:
        """Store a site's key for the current attempt of a secure round, and close advertising if all have."""
        with self.locked_job(job_id) as change:
            row = self.waiting_round(change, number)
            spec = job_spec(change.job)
            if spec.secure_aggregation is None:
                raise Conflict("this job runs without secure aggregation: it takes no keys", code="not_secure")
            if row.state != RoundState.OPEN.value:
                raise Conflict(
                    f"round {number} attempt {row.attempt} closed its roster; wait for the next attempt or round",
                    code="roster_fixed",
                )
            check_selected(row, site_id)
            if change.repo.decline(row.id, site_id) is not None:
                raise Conflict(f"site declined round {number}", code="round_declined")
            record_advertisement(change.repo, row, spec, site_id, body)
            change.repo.flush()
            change.emit("round.key_advertised", site_id=site_id, round=number, attempt=row.attempt)
            self.lifecycle.advance(change, row, expected_sites)

    def answer_unmasking(self, job_id: str, number: int, site_id: str, answer: UnmaskingAnswer) -> int | None:
        """Store a roster member's unmasking answer; returns the round's id when this closed the round."""
        with self.locked_job(job_id) as change:
            row = self.waiting_round(change, number)
            spec = job_spec(change.job)
            record_answer(change.repo, spec, row, site_id, answer)
            change.repo.flush()
            detail = {"round": number, "attempt": row.attempt, "shares": len(answer.shares)}
            change.repo.audit(actor=f"site:{site_id}", action="unmasking.answer", subject=job_id, detail=detail)
            change.emit("round.unmasking_answered", site_id=site_id, **detail)
            return row.id if self.lifecycle.advance(change, row, 0) else None

    def transcript(
        self, job_id: str, number: int, *, caller_site: str | None, attempt: int | None = None
    ) -> Transcript:
        """A secure round attempt's transcript (the latest attempt unless ``attempt`` is given)."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            spec = job_spec(repo.job(job_id))
            row = repo.current_round(job_id, number) if attempt is None else repo.round_attempt(job_id, number, attempt)
            if row is None:
                raise NotFound(
                    f"job {job_id} has no round {number}" + ("" if attempt is None else f" attempt {attempt}")
                )
            return transcript(repo, spec, row, caller_site)

    @staticmethod
    def waiting_round(change: JobChange, number: int) -> RoundRow:
        """The job's current round ``number`` while it waits for sites, or the ``Conflict`` that says why not."""
        job = change.job
        if job.status != JobStatus.RUNNING.value:
            raise Conflict(f"job is {job.status}; it takes no uploads", code="job_not_running")
        if number != job.current_round:
            raise Conflict(
                f"round {number} is not the open round; the job is at round {job.current_round}",
                code="wrong_round",
                detail={"current_round": job.current_round},
            )
        row = change.repo.current_round(job.id, number)
        if row is None or RoundState(row.state) not in ACTIVE:
            state = row.state if row is not None else "missing"
            raise Conflict(f"round {number} is {state}; it takes no uploads", code="round_closed")
        return row

    @staticmethod
    def accepting_round(change: JobChange, number: int) -> RoundRow:
        """The job's round ``number`` while it takes uploads, or the ``Conflict`` that says why not."""
        row = JobCoordinator.waiting_round(change, number)
        secure = job_spec(change.job).secure_aggregation is not None
        if not accepts_uploads(RoundState(row.state), secure=secure):
            if row.state == RoundState.OPEN.value:
                message = f"round {number} is still taking keys; upload once its roster is fixed"
                raise Conflict(message, code="no_roster")
            raise Conflict(f"round {number} is {row.state}; it takes no uploads", code="round_closed")
        return row

    def stop_job(self, job_id: str, *, actor: str) -> JobPublic:
        """Stop a running job; its open round fails."""
        with self.locked_job(job_id) as change:
            job = change.job
            if job.status != JobStatus.RUNNING.value:
                raise Conflict(f"job is {job.status}, not running", code="job_not_running")
            row = change.repo.current_round(job.id, job.current_round)
            if row is not None and RoundState(row.state) in ACTIVE:
                self.lifecycle.abandon(row, "job stopped by operator")
            job.status = JobStatus.STOPPED.value
            job.finished_at = utcnow()
            change.repo.audit(actor=actor, action="job.stop", subject=job_id)
            change.emit("job.stopped", actor=actor)
            return job_public(job)

    def job(self, job_id: str) -> JobPublic:
        """One job."""
        with self._sessions.transaction() as session:
            return job_public(AggregatorRepository(session).job(job_id))

    def jobs(self) -> list[JobPublic]:
        """All jobs."""
        with self._sessions.transaction() as session:
            return [job_public(row) for row in AggregatorRepository(session).jobs()]

    def rounds(self, job_id: str, *, operator: bool, caller_site: str | None) -> list[RoundPublic]:
        """Every attempt of every round of a job."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            spec = job_spec(repo.job(job_id))
            return [
                round_public(repo, spec, row, include_submissions=operator, caller_site=caller_site)
                for row in repo.rounds(job_id)
            ]

    def round(self, job_id: str, number: int, *, operator: bool, caller_site: str | None) -> RoundPublic:
        """The latest attempt of one round."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            spec = job_spec(repo.job(job_id))
            row = repo.current_round(job_id, number)
            if row is None:
                raise NotFound(f"job {job_id} has no round {number} yet")
            return round_public(repo, spec, row, include_submissions=operator, caller_site=caller_site)

    def aggregate(self, job_id: str, number: int) -> Iterator[bytes]:
        """Round ``number``'s published encrypted sum, streamed, as an envelope sites decrypt.

        Everything that can refuse the request is checked before the first byte is produced;
        the sum then leaves chunk by chunk, never whole in memory.
        """
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            job = repo.job(job_id)
            spec = job_spec(job)
            if not 0 <= number < spec.total_rounds:
                raise NotFound(f"job {job_id} has rounds 0..{spec.total_rounds - 1}")
            row = repo.current_round(job_id, number)
            if row is None or row.state != RoundState.PUBLISHED.value:
                raise Conflict(f"round {number} is not published yet", code="aggregate_not_ready")
            encoding = round_encoding(job, number)
            sizes = repo.aggregate_chunk_sizes(row.id)
            prefix = aggregate_header(
                chunk_sizes=sizes,
                format_id=encoding.format_id,
                key_id=job.key_id,
                num_values=encoding.num_values,
                job_id=job.id,
                round_number=row.number,
                attempt=row.attempt,
                kind="statistics" if spec.is_statistics_round(number) else "training",
                total_samples=row.total_samples,
                num_inputs=row.num_submissions,
                weight_scale=spec.max_samples_per_round,
            )
            round_id = row.id
        return itertools.chain([prefix], self._aggregate_chunks(round_id, len(sizes)))

    def _aggregate_chunks(self, round_id: int, count: int) -> Iterator[bytes]:
        # A few MB per read, transaction and (the response iterates in a worker thread) thread hop,
        # not one of each per chunk: memory holds one batch, never the whole sum.
        for start in range(0, count, AGGREGATE_BATCH_CHUNKS):
            with self._sessions.transaction() as session:
                batch = AggregatorRepository(session).aggregate_chunks(
                    round_id, start, min(count, start + AGGREGATE_BATCH_CHUNKS)
                )
            yield b"".join(batch)

    def record_evaluation(self, job_id: str, number: int, site_id: str, evaluation: EvaluationCreate) -> None:
        """Store a site's evaluation of round ``number``'s published model (once per site)."""
        with self.locked_job(job_id) as change:
            repo = change.repo
            row = repo.current_round(job_id, number)
            if row is None or row.state != RoundState.PUBLISHED.value:
                raise Conflict(f"round {number} is not published", code="round_not_published")
            if repo.evaluation(row.id, site_id) is not None:
                raise Conflict(f"site already evaluated round {number}", code="duplicate_evaluation")
            repo.add(
                EvaluationRow(
                    round_id=row.id, site_id=site_id, num_examples=evaluation.num_examples, metrics=evaluation.metrics
                )
            )
            change.emit("round.evaluated", site_id=site_id, round=number, attempt=row.attempt)
