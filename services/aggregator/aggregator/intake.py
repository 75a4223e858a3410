"""Accepting encrypted updates: every check first, then one transaction that adds the update.

A refused upload changes nothing: the checks either run before the transaction or inside it
before any row is written, and any error rolls the transaction back.
"""

from __future__ import annotations

import contextlib
import hashlib

from pydantic import ValidationError

from aggregator.contexts import EvaluationContexts
from aggregator.coordination import Coordination, CoordinationUnavailable
from aggregator.jobs import JobChange, JobCoordinator, job_spec, rules_for
from aggregator.rounds import RoundStateMachine
from aggregator.tables import SubmissionRow
from fedhe.environment import differences
from fedhe.errors import Conflict, FedheError, InvalidUpdate
from fedhe.he.envelope import Envelope, decode_envelope, encode_envelope
from fedhe.schemas import Environment, JobCreate, RoundState, UpdateAccepted, check_metrics


def check_environment(meta: dict[str, object], expected: Environment) -> None:
    """Refuse an update made with other versions than the job's, naming each difference."""
    try:
        actual = Environment.model_validate(meta.get("environment"))
    except ValidationError as exc:
        raise InvalidUpdate(
            "the update does not say which versions made it (meta.environment)", code="environment_mismatch"
        ) from exc
    mismatched = differences(expected, actual)
    if mismatched:
        raise InvalidUpdate(
            "this site runs other versions than the job: " + "; ".join(mismatched),
            code="environment_mismatch",
            detail={"differences": mismatched},
        )


def check_envelope(envelope: Envelope, *, spec: JobCreate, key_id: str, num_parameters: int) -> int:
    """Check an update's header against its job; returns the sample count n_k."""
    if envelope.key_id != key_id:
        raise Conflict(
            f"update is encrypted under key {envelope.key_id!r}; this job uses {key_id!r}",
            code="stale_key_id",
            detail={"expected": key_id},
        )
    if envelope.format_id != spec.format_id:
        raise InvalidUpdate(
            f"update format {envelope.format_id!r} is not this job's {spec.format_id!r}",
            code="unsupported_format",
            detail={"expected": spec.format_id},
        )
    if envelope.num_values != num_parameters:
        raise InvalidUpdate(
            f"update has {envelope.num_values} values; the model has {num_parameters}",
            code="wrong_num_values",
            detail={"expected": num_parameters},
        )
    num_samples = envelope.meta.get("num_samples")
    if (
        not isinstance(num_samples, int)
        or isinstance(num_samples, bool)
        or not 1 <= num_samples <= spec.max_samples_per_round
    ):
        raise InvalidUpdate(
            f"num_samples must be an integer in 1..{spec.max_samples_per_round} (the job's max_samples_per_round)",
            code="invalid_num_samples",
        )
    try:
        check_metrics(envelope.meta.get("metrics", {}))
    except ValueError as exc:
        raise InvalidUpdate(str(exc), code="invalid_metrics") from exc
    return num_samples


IDEMPOTENCY_TTL_S = 24 * 3600


class UpdateIntake:
    """Validates uploads and adds them into their round's running encrypted sum."""

    def __init__(self, jobs: JobCoordinator, contexts: EvaluationContexts, coordination: Coordination):
        self._jobs = jobs
        self._contexts = contexts
        self._coordination = coordination

    def accept(
        self,
        *,
        site_id: str,
        job_id: str,
        round_number: int,
        body: bytes,
        idempotency_key: str | None = None,
        expected_sites: int = 0,
    ) -> UpdateAccepted:
        """Accept one upload or raise the error naming what is wrong (state left unchanged).

        Sending the same bytes again (a retry after a lost response) is not a duplicate: it
        returns the original acceptance with ``replayed`` set, and counts nothing twice.
        """
        try:
            return self._accept(
                site_id=site_id,
                job_id=job_id,
                round_number=round_number,
                body=body,
                idempotency_key=idempotency_key,
                expected_sites=expected_sites,
            )
        except FedheError as exc:
            self._jobs.metrics.reject(exc.code)
            raise

    def _check_idempotency_key(self, key: str | None, digest: str) -> None:
        if key is None:
            return
        try:
            earlier = self._coordination.idempotency_fingerprint(key)
        except CoordinationUnavailable:
            return  # the database's digest check still makes replays safe
        if earlier is not None and earlier != digest:
            raise Conflict("Idempotency-Key was already used for a different body", code="idempotency_key_reused")

    def _remember_idempotency_key(self, key: str | None, digest: str) -> None:
        if key is None:
            return
        # If Redis is down only the early refusal of a reused key is lost; replays stay safe.
        with contextlib.suppress(CoordinationUnavailable):
            self._coordination.remember_idempotency_key(key, digest, IDEMPOTENCY_TTL_S)

    def _accept(
        self,
        *,
        site_id: str,
        job_id: str,
        round_number: int,
        body: bytes,
        idempotency_key: str | None,
        expected_sites: int,
    ) -> UpdateAccepted:
        envelope = decode_envelope(body)
        digest = hashlib.sha256(body).hexdigest()
        scoped_key = None if idempotency_key is None else f"{site_id}:{job_id}:{idempotency_key}"
        self._check_idempotency_key(scoped_key, digest)
        with self._jobs.locked_job(job_id) as change:
            repo, job = change.repo, change.job
            spec = job_spec(job)
            replay = self._replayed(change, site_id, round_number, digest)
            if replay is not None:
                return replay
            row = self._jobs.accepting_round(change, round_number)
            if repo.submission(row.id, site_id) is not None:
                raise Conflict(f"site already uploaded to round {round_number}", code="duplicate_update")
            if repo.decline(row.id, site_id) is not None:
                raise Conflict(f"site declined round {round_number}; it cannot upload to it", code="round_declined")
            num_samples = check_envelope(envelope, spec=spec, key_id=job.key_id, num_parameters=job.num_parameters)
            check_environment(envelope.meta, Environment.model_validate(job.environment))
            codec = self._contexts.codec(job.key_id, spec.format_id)
            initial = decode_envelope(row.running_sum).chunks if row.running_sum is not None else None
            accumulator = codec.accumulator(job.num_parameters, initial)
            accumulator.add(envelope.chunks)
            row.running_sum = encode_envelope(
                Envelope(
                    format_id=spec.format_id,
                    key_id=job.key_id,
                    num_values=job.num_parameters,
                    chunks=accumulator.to_chunks(),
                )
            )
            row.num_submissions += 1
            row.total_samples += num_samples
            repo.add(
                SubmissionRow(
                    round_id=row.id,
                    site_id=site_id,
                    num_samples=num_samples,
                    num_bytes=len(body),
                    sha256=digest,
                    envelope=body,
                    metrics=envelope.meta.get("metrics", {}),
                )
            )
            detail = {"round": round_number, "attempt": row.attempt, "sha256": digest, "num_samples": num_samples}
            repo.audit(actor=f"site:{site_id}", action="update.accept", subject=job.id, detail=detail)
            change.emit("update.accepted", site_id=site_id, num_submissions=row.num_submissions, **detail)
            next_state = rules_for(spec).after_upload(row.num_submissions)
            if next_state == RoundState.CLOSED:
                self._jobs.finish_round(change, row, RoundState.CLOSED)
            else:
                if row.state == RoundState.OPEN.value:
                    row.state = RoundStateMachine.transition(RoundState.OPEN, RoundState.COLLECTING).value
                self._jobs.close_if_everyone_answered(change, row, expected_sites)
            result = UpdateAccepted(
                job_id=job.id,
                round=round_number,
                attempt=row.attempt,
                round_state=RoundState(row.state),
                num_submissions=row.num_submissions,
                sha256=digest,
            )
        self._remember_idempotency_key(scoped_key, digest)
        self._jobs.metrics.accept(len(body))
        return result

    @staticmethod
    def _replayed(change: JobChange, site_id: str, round_number: int, digest: str) -> UpdateAccepted | None:
        """The original acceptance if this exact body was already accepted for this round."""
        row = change.repo.current_round(change.job.id, round_number)
        if row is None:
            return None
        earlier = change.repo.submission(row.id, site_id)
        if earlier is None or earlier.sha256 != digest:
            return None
        return UpdateAccepted(
            job_id=change.job.id,
            round=round_number,
            attempt=row.attempt,
            round_state=RoundState(row.state),
            num_submissions=row.num_submissions,
            sha256=digest,
            replayed=True,
        )
