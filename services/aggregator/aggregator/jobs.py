"""Job lifecycle: creating jobs, opening, closing and publishing rounds, deadlines."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from aggregator.contexts import EvaluationContexts
from aggregator.coordination import Coordination, CoordinationUnavailable, Event
from aggregator.metrics import Metrics
from aggregator.repository import AggregatorRepository
from aggregator.rounds import RoundStateMachine
from aggregator.sampling import SiteSampler
from aggregator.tables import DeclineRow, EvaluationRow, JobRow, RoundRow
from aggregator.views import job_public, round_public
from fedhe.db import SessionFactory, utcnow
from fedhe.environment import current as current_environment
from fedhe.errors import Conflict, InvalidRequest, NotFound
from fedhe.global_model import aggregate_header
from fedhe.he import PackingSettings, codec_for, format_for, load_evaluation_context, supported_formats
from fedhe.identifiers import new_id
from fedhe.job_planning import creation_warnings, privacy_plan
from fedhe.schemas import (
    DeclineCreate,
    EvaluationCreate,
    JobCreate,
    JobPublic,
    JobStatus,
    RoundPublic,
    RoundState,
)

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
        num_values=spec.round_num_values(number, job.num_parameters),
    )


def check_selected(row: RoundRow, site_id: str) -> None:
    """``Conflict`` if round ``row`` was sampled and did not ask for ``site_id``."""
    if row.selected_sites is not None and site_id not in row.selected_sites:
        raise Conflict(
            f"round {row.number} (attempt {row.attempt}) did not select this site; it may take part in a later one",
            code="not_selected",
        )


def rules_for(spec: JobCreate) -> RoundStateMachine:
    """The closing rules of a job's rounds."""
    return RoundStateMachine(min_sites=spec.min_sites, target_sites=spec.target_sites or spec.min_sites)


class JobCoordinator:
    """Owns every change to jobs and rounds, each in one transaction under the job's lock.

    The job row is locked (``SELECT ... FOR UPDATE``) for the length of each change, so two
    requests, or two aggregator replicas, never interleave changes to one job's rounds. Within
    one replica, requests for the same job first queue on an in-process lock, so they wait
    without holding a database connection (fifty concurrent uploads would otherwise drain the
    pool while blocked on the row lock). SQLite has no row locks; in embedded mode one
    process-wide lock plays that part.
    """

    def __init__(
        self,
        sessions: SessionFactory,
        contexts: EvaluationContexts,
        metrics: Metrics,
        coordination: Coordination,
        sampler: SiteSampler,
    ):
        self._sessions = sessions
        self._contexts = contexts
        self._sampler = sampler
        self.metrics = metrics
        self._coordination = coordination
        self._embedded_lock = threading.RLock() if sessions.is_sqlite else None
        self._job_locks: dict[str, threading.Lock] = {}
        self._job_locks_guard = threading.Lock()

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
        """Send committed changes to the live stream (best effort: the database is the record)."""
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
            spec = self._resolved(request, context_row.context)
            plan = None if spec.min_site_samples is None else privacy_plan(spec, spec.min_site_samples)
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
                warnings=creation_warnings(spec, plan),
            )
            repo.add(row)
            repo.flush()
            change = JobChange(repo, row)
            change.emit("job.created", name=row.name, warnings=row.warnings)
            self._open_round(change, number=0, attempt=1)
            detail = {"key_id": spec.key_id, "format_id": spec.format_id, "warnings": row.warnings}
            repo.audit(actor=actor, action="job.create", subject=row.id, detail=detail)
        self.publish_events(change.events)
        return job_public(row)

    @staticmethod
    def _resolved(request: JobCreate, context: bytes) -> JobCreate:
        """``request`` with the format its federation's context takes, checked against that context."""
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
        codec_for(format_id, evaluation, options=spec.packing).close()
        if spec.statistics is not None:
            codec_for(format_id, evaluation, options=spec.round_packing(0)).close()
        return spec

    def _open_round(self, change: JobChange, *, number: int, attempt: int) -> None:
        now = utcnow()
        spec = job_spec(change.job)
        deadline = now + timedelta(seconds=spec.round_deadline_s)
        selected = None
        if not spec.is_statistics_round(number):
            selected = self._sampler.select(change.repo, change.job.federation_id, spec.sampling)
        change.repo.add(
            RoundRow(
                job_id=change.job.id,
                number=number,
                attempt=attempt,
                state=RoundState.OPEN.value,
                opened_at=now,
                deadline_at=deadline,
                selected_sites=selected,
            )
        )
        change.job.current_round = number
        change.repo.flush()
        change.emit(
            "round.opened",
            round=number,
            attempt=attempt,
            deadline_at=deadline.isoformat(),
            round_kind="statistics" if spec.is_statistics_round(number) else "training",
            selected_sites=selected,
        )

    def finish_round(
        self, change: JobChange, row: RoundRow, target: RoundState, reason: str | None = None, fence: int | None = None
    ) -> None:
        """Close a round as ``target``: closed (its sum is computed next, then it is published) or failed.

        ``fence`` is the deadline lease's fencing token when a deadline sweep closes the round;
        it is recorded in the audit log so an operator can tell which lease holder acted.
        """
        repo, job = change.repo, change.job
        spec = job_spec(job)
        now = utcnow()
        state = RoundStateMachine.transition(RoundState(row.state), target)
        row.closed_at = now
        detail: dict[str, Any] = {"round": row.number, "attempt": row.attempt, "fence": fence}
        if state == RoundState.CLOSED:
            row.state = state.value
            detail |= {"sites": row.num_submissions, "total_samples": row.total_samples}
            repo.audit(actor="aggregator", action="round.close", subject=job.id, detail=detail)
            change.emit("round.closed", **detail)
            return
        row.state = state.value
        row.failure_reason = reason
        detail["reason"] = reason
        repo.audit(actor="aggregator", action="round.fail", subject=job.id, detail=detail)
        change.emit("round.failed", **detail)
        if spec.on_round_failure == "retry" and row.attempt < spec.max_round_attempts:
            self._open_round(change, number=row.number, attempt=row.attempt + 1)
        else:
            job.status = JobStatus.FAILED.value
            job.finished_at = now
            change.emit("job.failed", reason=f"round {row.number} failed {row.attempt} time(s)")

    def publish_round(self, job_id: str, round_id: int) -> bool:
        """Publish a closed round whose sum is stored, and open the next round (or complete the job)."""
        with self.locked_job(job_id) as change:
            repo, job = change.repo, change.job
            row = repo.round_by_id(round_id)
            if row is None or row.state != RoundState.CLOSED.value:
                return False
            spec = job_spec(job)
            now = utcnow()
            row.state = RoundStateMachine.transition(RoundState.CLOSED, RoundState.PUBLISHED).value
            row.published_at = now
            detail = {
                "round": row.number,
                "attempt": row.attempt,
                "sites": row.num_submissions,
                "total_samples": row.total_samples,
            }
            repo.audit(actor="aggregator", action="round.publish", subject=job.id, detail=detail)
            change.emit("round.published", duration_s=(now - row.opened_at).total_seconds(), **detail)
            if job.status == JobStatus.RUNNING.value and row.number + 1 < spec.total_rounds:
                self._open_round(change, number=row.number + 1, attempt=1)
            elif job.status == JobStatus.RUNNING.value:
                job.status = JobStatus.COMPLETED.value
                job.finished_at = now
                change.emit("job.completed")
            return True

    def expire_overdue_rounds(self, now: datetime | None = None, fence: int | None = None) -> int:
        """Close or fail every round whose deadline has passed; returns how many it finished.

        Safe to run on every replica at once: each job is re-checked under its row lock.
        """
        moment = now or utcnow()
        with self._sessions.transaction() as session:
            job_ids = AggregatorRepository(session).overdue_job_ids(moment)
        finished = 0
        for job_id in job_ids:
            with self.locked_job(job_id) as change:
                job = change.job
                row = change.repo.current_round(job.id, job.current_round)
                if (
                    row is None
                    or job.status != JobStatus.RUNNING.value
                    or not RoundStateMachine.accepts_uploads(RoundState(row.state))
                    or row.deadline_at > moment
                ):
                    continue
                min_sites = job_spec(job).min_sites
                target = rules_for(job_spec(job)).at_deadline(row.num_submissions)
                reason = None
                if target == RoundState.FAILED:
                    reason = f"deadline passed with {row.num_submissions} of min_sites={min_sites} uploads"
                self.finish_round(change, row, target, reason, fence=fence)
                finished += 1
        return finished

    def close_if_everyone_answered(self, change: JobChange, row: RoundRow, expected_sites: int) -> None:
        """Finish a round as soon as every member site has uploaded or declined, not at its deadline.

        It publishes if at least ``min_sites`` uploaded, and fails (then retries or stops, as the
        job says) if not: waiting for the deadline could not change the outcome.
        """
        if row.selected_sites is not None:
            expected_sites = len(row.selected_sites)
        if expected_sites <= 0 or not RoundStateMachine.accepts_uploads(RoundState(row.state)):
            return
        declined = len(change.repo.declines(row.id))
        if row.num_submissions + declined < expected_sites:
            return
        spec = job_spec(change.job)
        target = rules_for(spec).at_deadline(row.num_submissions)
        reason = None
        if target == RoundState.FAILED:
            reason = (
                f"every member answered: {row.num_submissions} uploaded, {declined} declined, "
                f"fewer than min_sites={spec.min_sites}"
            )
        self.finish_round(change, row, target, reason)

    def record_decline(
        self, job_id: str, number: int, site_id: str, decline: DeclineCreate, *, expected_sites: int
    ) -> int | None:
        """Record that a site will not upload to round ``number`` (once), and finish the round if all answered.

        Returns the round's id when this decline closed it, so its sum is due; otherwise ``None``.
        """
        with self.locked_job(job_id) as change:
            repo, job = change.repo, change.job
            row = self.accepting_round(change, number)
            check_selected(row, site_id)
            if repo.submission(row.id, site_id) is not None:
                raise Conflict(f"site already uploaded to round {number}", code="duplicate_update")
            if repo.decline(row.id, site_id) is not None:
                raise Conflict(f"site already declined round {number}", code="duplicate_decline")
            repo.add(DeclineRow(round_id=row.id, site_id=site_id, reason=decline.reason.value, message=decline.message))
            repo.flush()
            detail = {"round": number, "attempt": row.attempt, "reason": decline.reason.value}
            repo.audit(actor=f"site:{site_id}", action="update.decline", subject=job.id, detail=detail)
            change.emit("update.declined", site_id=site_id, message=decline.message, **detail)
            self.close_if_everyone_answered(change, row, expected_sites)
            return row.id if row.state == RoundState.CLOSED.value else None

    @staticmethod
    def accepting_round(change: JobChange, number: int) -> RoundRow:
        """The job's open round ``number``, or the ``Conflict`` that says why there is none."""
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
        if row is None or not RoundStateMachine.accepts_uploads(RoundState(row.state)):
            state = row.state if row is not None else "missing"
            raise Conflict(f"round {number} is {state}; it takes no uploads", code="round_closed")
        return row

    def stop_job(self, job_id: str, *, actor: str) -> JobPublic:
        """Stop a running job; its open round fails."""
        with self.locked_job(job_id) as change:
            job = change.job
            if job.status != JobStatus.RUNNING.value:
                raise Conflict(f"job is {job.status}, not running", code="job_not_running")
            row = change.repo.current_round(job.id, job.current_round)
            if row is not None and RoundStateMachine.accepts_uploads(RoundState(row.state)):
                row.state = RoundState.FAILED.value
                row.closed_at = utcnow()
                row.failure_reason = "job stopped by operator"
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
                kind="statistics" if spec.is_statistics_round(number) else "training",
                total_samples=row.total_samples,
                weight_scale=spec.max_samples_per_round,
            )
            round_id = row.id
        return itertools.chain([prefix], self._aggregate_chunks(round_id, len(sizes)))

    def _aggregate_chunks(self, round_id: int, count: int) -> Iterator[bytes]:
        for index in range(count):
            with self._sessions.transaction() as session:
                yield AggregatorRepository(session).aggregate_chunk(round_id, index)

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
