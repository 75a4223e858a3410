"""The site daemon: follows jobs round by round, trains, encrypts, uploads, evaluates.

It never needs an operator: network failures are retried with exponential backoff, a
restart resumes from the aggregator's view of the round (``submitted_by_caller``), and the
privacy ledger on disk carries the budget across restarts. It tells the operator what it does:
a heartbeat with its state and versions, and a decline with the reason whenever it will not
upload to a round (budget spent, data unusable, versions that differ, refused), so a round
need not wait for its deadline. It logs once per round step, not once per poll.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.heartbeat import Heartbeat
from client_agent.ledger import LedgerEntry, PrivacyLedger
from client_agent.outcomes import DECLINE_REASONS, JobOutcome, OutcomeStatus
from client_agent.policy import SitePolicy, load_policy
from client_agent.settings import AgentSettings
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, private_key_from_pem, sign_request
from fedhe.datasets import load_dataset, split
from fedhe.environment import current as current_environment
from fedhe.environment import differences
from fedhe.errors import (
    BudgetExhausted,
    Conflict,
    FedheError,
    InvalidRequest,
    PermissionDenied,
    UpstreamUnavailable,
)
from fedhe.files import PRIVATE_FILE, private_dir, write_private
from fedhe.global_model import decode_global_model, scale_for_upload
from fedhe.he import Envelope, UpdateCodec, codec_for, encode_envelope, load_secret_context
from fedhe.logs import request_id
from fedhe.privacy import local_training_pass
from fedhe.schemas import (
    AgentState,
    DeclineCreate,
    EvaluationCreate,
    JobPublic,
    JobStatus,
    KeyReleaseRequest,
    PrivacyReport,
    RoundState,
)

logger = logging.getLogger("fedhe.agent")


class SiteAgent:
    """One site's participation in the federation."""

    def __init__(
        self,
        settings: AgentSettings,
        aggregator: AggregatorClient | None = None,
        keyserver: KeyserverClient | None = None,
    ):
        self.settings = settings
        tls = settings.client_tls()
        self._aggregator = aggregator or AggregatorClient(
            settings.aggregator_url,
            settings.credential_secret().get_secret_value(),
            tls=tls,
            timeout=settings.request_timeout_s,
        )
        self._keyserver = keyserver or KeyserverClient(
            settings.keyserver_url, tls=tls, timeout=settings.request_timeout_s
        )
        self._signing_key = private_key_from_pem(settings.signing_key_file.read_bytes())
        self._policy: SitePolicy = load_policy(settings.policy_file)
        self._state_dir = private_dir(settings.state_dir).resolve()
        self._ledger = PrivacyLedger(self._state_file("privacy-ledger.json"))
        self._environment = current_environment()
        self._heartbeat = Heartbeat(self._aggregator, self._environment, settings.heartbeat_interval_s)
        self._data_problem: str | None = None
        try:
            data = load_dataset(settings.data_path, settings.label_column)
            self.train_data, self.validation_data = split(data, settings.validation_fraction, seed=0)
        except InvalidRequest as exc:
            # Told to the operator (a decline for each round it would join) instead of a traceback.
            self._data_problem = exc.message
        self._codecs: dict[str, UpdateCodec] = {}
        self._backoff = settings.poll_interval_s

    def _codec(self, key_id: str, format_id: str) -> UpdateCodec:
        if key_id not in self._codecs:
            timestamp, nonce, signature = sign_request(
                self._signing_key, KEY_RELEASE_PURPOSE, self.settings.keyserver_audience(), [key_id]
            )
            secret = self._keyserver.secret_context(
                key_id,
                KeyReleaseRequest(site_id=self.settings.site_id, timestamp=timestamp, nonce=nonce, signature=signature),
            )
            workers = self.settings.encrypt_workers or os.cpu_count() or 1
            self._codecs[key_id] = codec_for(format_id, load_secret_context(secret), workers=workers)
        return self._codecs[key_id]

    def _wait(self, failed: bool) -> None:
        """Sleep before the next poll; back off exponentially while calls fail."""
        if failed:
            self._backoff = min(self._backoff * 2, self.settings.max_backoff_s)
        else:
            self._backoff = self.settings.poll_interval_s
        time.sleep(self._backoff)

    def run(self) -> list[JobOutcome]:
        """Follow running jobs (only ``job_id`` if set); with ``once``, return after one job."""
        self._heartbeat.start()
        try:
            return self._follow_jobs()
        finally:
            self._heartbeat.stop()
            for codec in self._codecs.values():
                codec.close()

    def _follow_jobs(self) -> list[JobOutcome]:
        finished: dict[str, JobOutcome] = {}
        while True:
            try:
                jobs = [
                    job
                    for job in self._aggregator.jobs()
                    if job.id not in finished
                    and (self.settings.job_id is None or job.id == self.settings.job_id)
                    and (job.status == JobStatus.RUNNING or job.id == self.settings.job_id)
                ]
            except UpstreamUnavailable as exc:
                logger.warning("aggregator unreachable (%s); retrying", exc.message)
                self._wait(failed=True)
                continue
            for job in jobs:
                finished[job.id] = self.participate(job)
                if self.settings.once:
                    return list(finished.values())
            self._heartbeat.report(AgentState.IDLE)
            self._wait(failed=False)

    def participate(self, job: JobPublic) -> JobOutcome:
        """Take part in ``job`` until it ends, or until this site cannot (and then say why)."""
        outcome = JobOutcome(job_id=job.id, status=OutcomeStatus.COMPLETED)
        evaluated: set[int] = set()
        logger.info("job %s: taking part (%d rounds, model of %d parameters)", job.id, job.rounds, job.num_parameters)
        while True:
            try:
                job = self._aggregator.job(job.id)
                if job.status != JobStatus.RUNNING:
                    return self._finish(job, outcome, evaluated)
                current = self._aggregator.round(job.id, job.current_round)
                if current.submitted_by_caller or current.state not in (RoundState.OPEN, RoundState.COLLECTING):
                    self._heartbeat.report(AgentState.WAITING, job_id=job.id, round_number=job.current_round)
                    self._wait(failed=False)
                    continue
                with request_id(f"{job.id}-r{job.current_round}-a{current.attempt}"):
                    self._check_can_train(job)
                    codec = self._codec(job.key_id, job.format_id)
                    weights = self._global_weights(job, job.current_round, codec, evaluated)
                    self._train_and_upload(job, current.attempt, weights, codec, outcome)
            except BudgetExhausted as exc:
                return self._stop_taking_part(job, outcome, OutcomeStatus.BUDGET_EXHAUSTED, exc)
            except (InvalidRequest, PermissionDenied) as exc:
                # Retrying cannot fix these (a refused update, a site or data this job does not fit).
                status = {
                    "data_problem": OutcomeStatus.DATA_PROBLEM,
                    "too_many_samples": OutcomeStatus.DATA_PROBLEM,
                    "environment_mismatch": OutcomeStatus.ENVIRONMENT_MISMATCH,
                }.get(exc.code, OutcomeStatus.REFUSED)
                return self._stop_taking_part(job, outcome, status, exc)
            except Conflict as exc:
                if exc.code == "stale_key_id":
                    return self._stop_taking_part(job, outcome, OutcomeStatus.STALE_KEY, exc)
                logger.debug("job %s: %s; following the job's new state", job.id, exc.message)
                self._wait(failed=False)
            except UpstreamUnavailable as exc:
                logger.warning("job %s: %s; retrying", job.id, exc.message)
                self._wait(failed=True)

    def _check_can_train(self, job: JobPublic) -> None:
        """Refuse, before any privacy budget is spent, a round this site cannot do properly."""
        if self._data_problem is not None:
            raise InvalidRequest(self._data_problem, code="data_problem")
        mismatched = differences(job.environment, self._environment)
        if mismatched:
            raise InvalidRequest(
                "this site runs other versions than the job: " + "; ".join(mismatched), code="environment_mismatch"
            )

    def _stop_taking_part(
        self, job: JobPublic, outcome: JobOutcome, status: OutcomeStatus, exc: FedheError
    ) -> JobOutcome:
        """Record why this site stops, tell the operator (decline and heartbeat), and return the outcome."""
        logger.error("job %s: %s (%s); this site stops taking part", job.id, exc.message, exc.code)
        outcome.status = status
        outcome.notes.append(f"{exc.code}: {exc.message}")
        self._heartbeat.report(AgentState.DECLINED, job_id=job.id, round_number=job.current_round, message=exc.message)
        if job.status == JobStatus.RUNNING and status in DECLINE_REASONS:
            try:
                self._aggregator.decline_round(
                    job.id, job.current_round, DeclineCreate(reason=DECLINE_REASONS[status], message=exc.message[:500])
                )
            except FedheError as declined:
                logger.warning("job %s: the decline was not recorded (%s)", job.id, declined.code)
        return outcome

    def _global_weights(self, job: JobPublic, number: int, codec: UpdateCodec, evaluated: set[int]) -> NDArray[Any]:
        weights = self._decode(job, self._aggregator.model(job.id, number), codec)
        if number > 0 and number - 1 not in evaluated:
            self._evaluate(job, number - 1, weights, evaluated)
        return weights

    def _decode(self, job: JobPublic, envelope: bytes, codec: UpdateCodec) -> NDArray[Any]:
        def check(env: Envelope) -> UpdateCodec:
            if env.key_id != job.key_id or env.format_id != job.format_id:
                raise InvalidRequest("the aggregate's key or format is not the job's")
            return codec

        weights = decode_global_model(envelope, check)
        if weights.size != job.num_parameters:
            raise InvalidRequest(f"global model has {weights.size} values, the job's model {job.num_parameters}")
        return weights

    def _evaluate(self, job: JobPublic, number: int, weights: NDArray[Any], evaluated: set[int]) -> None:
        from client_agent.evaluation import evaluate

        metrics = evaluate(job.model, weights, self.validation_data)
        try:
            self._aggregator.post_evaluation(
                job.id, number, EvaluationCreate(num_examples=len(self.validation_data), metrics=metrics)
            )
        except Conflict as exc:
            if exc.code != "duplicate_evaluation":
                raise
        evaluated.add(number)
        logger.info(
            "job %s round %d global model: accuracy %.3f on %d local validation rows",
            job.id,
            number,
            metrics["accuracy"],
            len(self.validation_data),
        )

    def _state_file(self, name: str) -> Path:
        """A file directly inside the state directory; a name that would leave it is refused."""
        path = (self._state_dir / name).resolve()
        if path.parent != self._state_dir:
            raise InvalidRequest(f"refusing to write {name!r} outside the state directory", code="unsafe_path")
        return path

    def _pending_path(self, job: JobPublic, attempt: int) -> Path:
        return self._state_file(f"pending-{job.id}-r{job.current_round}-a{attempt}.fedhe")

    def _train_and_upload(
        self, job: JobPublic, attempt: int, weights: NDArray[Any], codec: UpdateCodec, outcome: JobOutcome
    ) -> None:
        """Upload this round's update, training only if no encrypted update is already waiting.

        The encrypted update is written to the state directory before the first upload try, so
        a lost connection or a restart re-sends the same bytes (the aggregator treats that as a
        replay) instead of training again and spending privacy budget twice.
        """
        pending = self._pending_path(job, attempt)
        if pending.exists():
            body = pending.read_bytes()
            logger.info("job %s round %d: re-sending the saved update", job.id, job.current_round)
        else:
            self._heartbeat.report(AgentState.TRAINING, job_id=job.id, round_number=job.current_round)
            body = self._train_and_encrypt(job, attempt, weights, codec, outcome)
            write_private(pending, body)
        self._heartbeat.report(AgentState.UPLOADING, job_id=job.id, round_number=job.current_round)
        try:
            accepted = self._aggregator.upload_update(
                job.id, job.current_round, body, idempotency_key=f"{job.id}:{job.current_round}:{attempt}"
            )
        except (Conflict, InvalidRequest):
            pending.unlink(missing_ok=True)  # refused, or the round moved on: these bytes can never count
            raise
        pending.unlink(missing_ok=True)
        outcome.rounds_trained += 1
        logger.info(
            "job %s round %d: uploaded %d bytes%s; round is %s",
            job.id,
            job.current_round,
            len(body),
            " (replay of an accepted upload)" if accepted.replayed else "",
            accepted.round_state.value,
        )

    def _train_and_encrypt(
        self, job: JobPublic, attempt: int, weights: NDArray[Any], codec: UpdateCodec, outcome: JobOutcome
    ) -> bytes:
        from client_agent.evaluation import evaluate
        from client_agent.training import train_dp_sgd

        if len(self.train_data) > job.max_samples_per_round:
            raise InvalidRequest(
                f"this site has {len(self.train_data)} training rows, more than the job's "
                f"max_samples_per_round={job.max_samples_per_round}; ask the operator to raise it",
                code="too_many_samples",
            )
        dp = self._policy.tighten(job.dp)
        if self._policy.max_epsilon is not None:
            planned = local_training_pass(
                num_samples=len(self.train_data),
                batch_size=job.batch_size,
                epochs=job.local_epochs,
                noise_multiplier=dp.noise_multiplier,
            )
            would_be = self._ledger.epsilon(dp.delta, planned)
            if would_be > self._policy.max_epsilon:
                raise BudgetExhausted(
                    f"round {job.current_round} would bring ε to {would_be:.2f}, "
                    f"over the site's limit {self._policy.max_epsilon}"
                )
        result = train_dp_sgd(
            job.model,
            weights,
            self.train_data,
            dp=dp,
            epochs=job.local_epochs,
            batch_size=job.batch_size,
            learning_rate=job.learning_rate,
        )
        self._ledger.record(
            LedgerEntry(job_id=job.id, round=job.current_round, attempt=attempt, training=result.training)
        )
        epsilon = self._ledger.epsilon(dp.delta)
        outcome.epsilon = epsilon
        self._heartbeat.report(
            AgentState.UPLOADING,
            job_id=job.id,
            round_number=job.current_round,
            privacy=PrivacyReport(epsilon=epsilon, delta=dp.delta, max_epsilon=self._policy.max_epsilon),
        )
        local = evaluate(job.model, result.weights, self.validation_data)
        started = time.perf_counter()
        chunks = codec.encrypt_update(scale_for_upload(result.weights, result.num_samples, job.max_samples_per_round))
        metrics = {
            "train_loss": result.train_loss,
            "local_val_accuracy": local["accuracy"],
            "local_val_loss": local["loss"],
            "epsilon": epsilon,
            "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier,
            "l2_norm_clip": dp.l2_norm_clip,
            "train_seconds": result.seconds,
            "encrypt_seconds": time.perf_counter() - started,
        }
        logger.info(
            "job %s round %d: trained on n=%d, ε=%.2f at δ=%g",
            job.id,
            job.current_round,
            result.num_samples,
            epsilon,
            dp.delta,
        )
        return encode_envelope(
            Envelope(
                format_id=job.format_id,
                key_id=job.key_id,
                num_values=job.num_parameters,
                chunks=chunks,
                meta={
                    "num_samples": result.num_samples,
                    "metrics": metrics,
                    "environment": self._environment.model_dump(),
                },
            )
        )

    def _finish(self, job: JobPublic, outcome: JobOutcome, evaluated: set[int]) -> JobOutcome:
        outcome.status = OutcomeStatus(job.status.value)
        self._heartbeat.report(AgentState.FINISHED, job_id=job.id)
        logger.info("job %s ended %s", job.id, job.status.value)
        outcome.epsilon = self._ledger.epsilon(self._policy.tighten(job.dp).delta)
        if job.status != JobStatus.COMPLETED:
            return outcome
        from client_agent.export import export_model

        codec = self._codec(job.key_id, job.format_id)
        weights = self._decode(job, self._aggregator.final_model(job.id), codec)
        last = job.rounds - 1
        if last not in evaluated:
            try:
                self._evaluate(job, last, weights, evaluated)
            except FedheError as exc:
                outcome.notes.append(f"final evaluation not recorded: {exc.message}")
        outcome.exported_model = export_model(job.model, weights, self._state_file(f"{job.id}-final.keras"))
        os.chmod(outcome.exported_model, PRIVATE_FILE)
        buffer = io.BytesIO()
        np.save(buffer, weights)
        write_private(self._state_file(f"{job.id}-final-weights.npy"), buffer.getvalue())
        logger.info("job %s completed; final model saved to %s", job.id, outcome.exported_model)
        return outcome
