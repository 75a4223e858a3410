"""The site daemon: follows jobs round by round, trains, encrypts, uploads, evaluates, exports.

It never needs an operator: network failures are retried with exponential backoff, a
restart resumes from the aggregator's view of the round (``submitted_by_caller``) and from the
global model chain on disk (``client_agent.global_chain``), and the privacy ledger carries the
budget across restarts. It tells the operator what it does: a heartbeat with its state and
versions, and a decline with the reason whenever it will not upload to a round (budget spent,
data unusable, versions that differ, refused), so a round need not wait for its deadline. It
logs once per round step, not once per poll.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from client_agent.global_chain import GlobalModelChain
from client_agent.heartbeat import Heartbeat
from client_agent.ledger import LedgerEntry, PrivacyLedger
from client_agent.outcomes import DECLINE_REASONS, JobOutcome, OutcomeStatus
from client_agent.policy import SitePolicy, load_policy
from client_agent.settings import AgentSettings
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, private_key_from_pem, sign_request
from fedhe.cpus import usable_cpus
from fedhe.datasets import Dataset, load_dataset, split
from fedhe.environment import current as current_environment
from fedhe.environment import differences
from fedhe.errors import (
    BudgetExhausted,
    Conflict,
    DataProblem,
    FedheError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unauthenticated,
    UpstreamUnavailable,
)
from fedhe.files import PRIVATE_FILE, private_dir, write_private
from fedhe.global_model import decode_aggregate, weighted_update
from fedhe.he import Envelope, UpdateCodec, codec_for, encode_envelope, load_secret_context, quantisation_report
from fedhe.logs import request_id
from fedhe.normalisation import statistics_upload
from fedhe.privacy import local_training_pass
from fedhe.schemas import (
    AgentState,
    DeclineCreate,
    EvaluationCreate,
    JobPublic,
    JobStatus,
    KeyReleaseRequest,
    PrivacyReport,
    RoundPublic,
    RoundState,
)

logger = logging.getLogger("fedhe.agent")

DATA_PROBLEM_NOTICE = "this site's data does not fit the job (the site's agent log names the file, row and column)"

_STATUS_OF_CODE = {
    "data_problem": OutcomeStatus.DATA_PROBLEM,
    "too_many_samples": OutcomeStatus.DATA_PROBLEM,
    "too_few_samples": OutcomeStatus.DATA_PROBLEM,
    "environment_mismatch": OutcomeStatus.ENVIRONMENT_MISMATCH,
    "model_fingerprint_mismatch": OutcomeStatus.ENVIRONMENT_MISMATCH,
}


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
        self._contexts: dict[str, ts.Context] = {}
        self._codecs: dict[tuple[str, str, str], UpdateCodec] = {}
        self._data: dict[str, tuple[Dataset, Dataset]] = {}
        self._chains: dict[str, GlobalModelChain] = {}
        self._evaluated: dict[str, set[int]] = {}
        self._backoff = settings.poll_interval_s

    def _secret_context(self, key_id: str) -> ts.Context:
        if key_id not in self._contexts:
            timestamp, nonce, signature = sign_request(
                self._signing_key, KEY_RELEASE_PURPOSE, self.settings.keyserver_audience(), [key_id]
            )
            secret = self._keyserver.secret_context(
                key_id,
                KeyReleaseRequest(site_id=self.settings.site_id, timestamp=timestamp, nonce=nonce, signature=signature),
            )
            self._contexts[key_id] = load_secret_context(secret)
        return self._contexts[key_id]

    def _codec(self, job: JobPublic, number: int) -> UpdateCodec:
        """The codec of round ``number`` (the statistics step packs its own way)."""
        packing = job.round_packing(number)
        key = (job.key_id, job.format_id, packing.model_dump_json() if packing is not None else "")
        if key not in self._codecs:
            workers = self.settings.encrypt_workers or usable_cpus()
            self._codecs[key] = codec_for(job.format_id, self._secret_context(job.key_id), workers, options=packing)
        return self._codecs[key]

    def _site_data(self, job: JobPublic) -> tuple[Dataset, Dataset]:
        """This site's (training, validation) rows as the job's model reads them; ``DataProblem`` if unusable."""
        if job.id not in self._data:
            data = load_dataset(self.settings.data_path, self.settings.label_column, job.model.data_schema())
            self._data[job.id] = split(data, self.settings.validation_fraction, seed=0)
            self._heartbeat.set_data_size(len(self._data[job.id][0]))
        return self._data[job.id]

    def _chain(self, job: JobPublic) -> GlobalModelChain:
        if job.id not in self._chains:
            self._chains[job.id] = GlobalModelChain(
                job, self._state_file(f"{job.id}-global.npz"), custom_modules=self.settings.custom_modules
            )
        return self._chains[job.id]

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
        logger.info("job %s: taking part (%d rounds, model of %d parameters)", job.id, job.rounds, job.num_parameters)
        while True:
            try:
                job = self._aggregator.job(job.id)
                chain = self._chain(job)
                self._catch_up(job, chain)
                if job.status != JobStatus.RUNNING:
                    return self._finish(job, chain, outcome)
                current = self._aggregator.round(job.id, job.current_round)
                if not self._asked_to_upload(current):
                    self._heartbeat.report(AgentState.WAITING, job_id=job.id, round_number=job.current_round)
                    self._wait(failed=False)
                    continue
                with request_id(f"{job.id}-r{job.current_round}-a{current.attempt}"):
                    self._check_can_train(job)
                    if job.is_statistics_round(job.current_round):
                        self._upload(job, current.attempt, partial(self._encrypt_statistics, job))
                    else:
                        make = partial(self._train_and_encrypt, job, current, chain, outcome)
                        self._upload(job, current.attempt, make)
                        outcome.rounds_trained += 1
            except BudgetExhausted as exc:
                return self._stop_taking_part(job, outcome, OutcomeStatus.BUDGET_EXHAUSTED, exc)
            except (InvalidRequest, PermissionDenied, Unauthenticated, NotFound) as exc:
                # Retrying cannot fix these (a refused update, a revoked credential, a job this site
                # may no longer see, a site or data this job does not fit).
                return self._stop_taking_part(job, outcome, _STATUS_OF_CODE.get(exc.code, OutcomeStatus.REFUSED), exc)
            except Conflict as exc:
                if exc.code == "stale_key_id":
                    return self._stop_taking_part(job, outcome, OutcomeStatus.STALE_KEY, exc)
                logger.debug("job %s: %s; following the job's new state", job.id, exc.message)
                self._wait(failed=False)
            except (UpstreamUnavailable, TooManyRequests) as exc:
                logger.warning("job %s: %s; retrying", job.id, exc.message)
                self._wait(failed=True)

    @staticmethod
    def _asked_to_upload(current: RoundPublic) -> bool:
        """Whether the round takes an upload from this site that it has not made yet."""
        return (
            current.state in (RoundState.OPEN, RoundState.COLLECTING)
            and not current.submitted_by_caller
            and current.caller_selected is not False
        )

    def _catch_up(self, job: JobPublic, chain: GlobalModelChain) -> None:
        """Apply every published round the chain has not seen, then evaluate the newest model once."""
        published = job.total_rounds if job.status == JobStatus.COMPLETED else job.current_round
        while chain.next_round < published:
            number = chain.next_round
            codec = self._codec(job, number)

            def check(envelope: Envelope, number: int = number, codec: UpdateCodec = codec) -> UpdateCodec:
                expected = job.round_num_values(number, job.num_parameters)
                if envelope.key_id != job.key_id or envelope.format_id != job.format_id:
                    raise InvalidRequest("the aggregate's key or format is not the job's")
                if envelope.num_values != expected:
                    raise InvalidRequest(f"round {number}'s aggregate has {envelope.num_values} values, not {expected}")
                return codec

            chain.apply(decode_aggregate(self._aggregator.aggregate(job.id, number), check))
            if job.is_statistics_round(number):
                logger.info("job %s: pooled statistics received; inputs are normalised with them", job.id)
        latest = published - 1
        if latest >= 0 and not job.is_statistics_round(latest) and latest not in self._evaluated.get(job.id, set()):
            self._evaluate(job, latest, chain)

    def _check_can_train(self, job: JobPublic) -> None:
        """Refuse, before any privacy budget is spent, a round this site cannot do properly."""
        mismatched = differences(job.environment, self._environment)
        if mismatched:
            raise InvalidRequest(
                "this site runs other versions than the job: " + "; ".join(mismatched), code="environment_mismatch"
            )
        self._site_data(job)

    def _stop_taking_part(
        self, job: JobPublic, outcome: JobOutcome, status: OutcomeStatus, exc: FedheError
    ) -> JobOutcome:
        """Record why this site stops, tell the operator (decline and heartbeat), and return the outcome."""
        logger.error("job %s: %s (%s); this site stops taking part", job.id, exc.message, exc.code)
        outcome.status = status
        outcome.notes.append(f"{exc.code}: {exc.message}")
        # A data problem's message quotes the site's own cells and file names: it stays in the
        # site's log; the coordinator learns only that the data did not fit.
        told = DATA_PROBLEM_NOTICE if isinstance(exc, DataProblem) else exc.message[:500]
        self._heartbeat.report(AgentState.DECLINED, job_id=job.id, round_number=job.current_round, message=told)
        if job.status == JobStatus.RUNNING and status in DECLINE_REASONS:
            try:
                self._aggregator.decline_round(
                    job.id, job.current_round, DeclineCreate(reason=DECLINE_REASONS[status], message=told)
                )
            except FedheError as declined:
                logger.warning("job %s: the decline was not recorded (%s)", job.id, declined.code)
        return outcome

    def _evaluate(self, job: JobPublic, number: int, chain: GlobalModelChain) -> None:
        """Score round ``number``'s published model on the validation split (and the public test set) and report it."""
        from client_agent.evaluation import evaluate_model
        from client_agent.training import load_model

        _, validation = self._site_data(job)
        model = load_model(chain.spec, chain.weights, custom_modules=self.settings.custom_modules)
        metrics = evaluate_model(model, validation)
        if job.public_test_set is not None:
            public = Dataset(
                np.asarray(job.public_test_set.x, dtype=np.float64).reshape(-1, *job.model.input_shape),
                np.asarray(job.public_test_set.y),
            )
            metrics |= {f"public_{name}": value for name, value in evaluate_model(model, public).items()}
        try:
            self._aggregator.post_evaluation(
                job.id, number, EvaluationCreate(num_examples=len(validation), metrics=metrics)
            )
        except Conflict as exc:
            if exc.code != "duplicate_evaluation":
                raise
        self._evaluated.setdefault(job.id, set()).add(number)
        logger.info(
            "job %s round %d global model: accuracy %.3f on %d local validation rows",
            job.id,
            number,
            metrics["accuracy"],
            len(validation),
        )

    def _state_file(self, name: str) -> Path:
        """A file directly inside the state directory; a name that would leave it is refused."""
        path = (self._state_dir / name).resolve()
        if path.parent != self._state_dir:
            raise InvalidRequest(f"refusing to write {name!r} outside the state directory", code="unsafe_path")
        return path

    def _upload(self, job: JobPublic, attempt: int, make_body: Callable[[], bytes]) -> None:
        """Upload this round's update, making it only if no encrypted update is already waiting.

        The encrypted update is written to the state directory before the first upload try, so
        a lost connection or a restart re-sends the same bytes (the aggregator treats that as a
        replay) instead of training again and spending privacy budget twice.
        """
        pending = self._state_file(f"pending-{job.id}-r{job.current_round}-a{attempt}.fedhe")
        if pending.exists():
            body = pending.read_bytes()
            logger.info("job %s round %d: re-sending the saved update", job.id, job.current_round)
        else:
            self._heartbeat.report(AgentState.TRAINING, job_id=job.id, round_number=job.current_round)
            body = make_body()
            write_private(pending, body)
        self._heartbeat.report(AgentState.UPLOADING, job_id=job.id, round_number=job.current_round)
        try:
            accepted = self._aggregator.upload_update(
                job.id, job.current_round, body, idempotency_key=f"{job.id}:{job.current_round}:{attempt}"
            )
        except (Conflict, InvalidRequest, PermissionDenied, NotFound):
            pending.unlink(missing_ok=True)  # refused, or the round moved on: these bytes can never count
            raise
        pending.unlink(missing_ok=True)
        logger.info(
            "job %s round %d: uploaded %d bytes%s; round is %s",
            job.id,
            job.current_round,
            len(body),
            " (replay of an accepted upload)" if accepted.replayed else "",
            accepted.round_state.value,
        )

    def _envelope(self, job: JobPublic, chunks: list[bytes], num_samples: int, metrics: dict[str, float]) -> bytes:
        meta = {
            "num_samples": num_samples,
            "metrics": metrics,
            "environment": self._environment.model_dump(),
            "model_sha256": self._chain(job).architecture_sha256,
        }
        return encode_envelope(
            Envelope(
                format_id=job.format_id,
                key_id=job.key_id,
                num_values=job.round_num_values(job.current_round, job.num_parameters),
                chunks=chunks,
                meta=meta,
            )
        )

    def _encrypt_statistics(self, job: JobPublic) -> bytes:
        """The statistics step's upload: count, sums and sums of squares of the training inputs."""
        assert job.statistics is not None
        train, _ = self._site_data(job)
        vector, clipped = statistics_upload(
            np.asarray(train.x), job.statistics.feature_bounds, job.max_samples_per_round
        )
        chunks = self._codec(job, job.current_round).encrypt_update(vector)
        logger.info(
            "job %s: statistics of %d rows encrypted (%.2f%% of values clipped)", job.id, len(train), 100 * clipped
        )
        return self._envelope(job, chunks, len(train), {"clipped_fraction": clipped})

    def _train_and_encrypt(
        self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome
    ) -> bytes:
        from client_agent.evaluation import evaluate
        from client_agent.training import LocalTraining, train_dp_sgd

        train, validation = self._site_data(job)
        if len(train) > job.max_samples_per_round:
            raise InvalidRequest(
                f"this site has {len(train)} training rows, more than the job's "
                f"max_samples_per_round={job.max_samples_per_round}; ask the operator to raise it",
                code="too_many_samples",
            )
        dp = self._policy.tighten(job.dp)
        planned = local_training_pass(
            num_samples=len(train),
            batch_size=job.batch_size,
            epochs=job.local_epochs,
            noise_multiplier=dp.noise_multiplier,
        )
        if self._policy.max_epsilon is not None:
            would_be = self._ledger.epsilon(dp.delta, planned)
            if would_be > self._policy.max_epsilon:
                raise BudgetExhausted(
                    f"round {job.current_round} would bring ε to {would_be:.2f}, "
                    f"over the site's limit {self._policy.max_epsilon}"
                )
        local_training = LocalTraining(
            epochs=job.local_epochs,
            batch_size=job.batch_size,
            learning_rate=job.learning_rate,
            proximal_mu=job.algorithm.proximal_mu,
            momentum=job.algorithm.local_momentum,
            custom_modules=self.settings.custom_modules,
            test_stream=f"{self.settings.site_id}/{job.id}/{job.current_round}/{current.attempt}",
        )
        result = train_dp_sgd(chain.spec, chain.weights, train, local_training, dp=dp)
        self._ledger.record(
            LedgerEntry(job_id=job.id, round=job.current_round, attempt=current.attempt, training=result.training)
        )
        epsilon = self._ledger.epsilon(dp.delta)
        outcome.epsilon = epsilon
        self._heartbeat.report(
            AgentState.UPLOADING,
            job_id=job.id,
            round_number=job.current_round,
            privacy=PrivacyReport(epsilon=epsilon, delta=dp.delta, max_epsilon=self._policy.max_epsilon),
        )
        local = evaluate(chain.spec, result.weights, validation, custom_modules=self.settings.custom_modules)
        update = weighted_update(result.weights, chain.weights, result.num_samples, job.max_samples_per_round)
        packing = job.round_packing(job.current_round)
        started = time.perf_counter()
        chunks = self._codec(job, job.current_round).encrypt_update(update)
        metrics = {
            "train_loss": result.train_loss,
            "local_val_accuracy": local["accuracy"],
            "local_val_loss": local["loss"],
            "epsilon": epsilon,
            "delta": dp.delta,
            "noise_multiplier": dp.noise_multiplier,
            "l2_norm_clip": dp.l2_norm_clip,
            "clipped_fraction": quantisation_report(update, packing)["clipped_fraction"] if packing else 0.0,
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
        return self._envelope(job, chunks, result.num_samples, metrics)

    def _finish(self, job: JobPublic, chain: GlobalModelChain, outcome: JobOutcome) -> JobOutcome:
        outcome.status = OutcomeStatus(job.status.value)
        self._heartbeat.report(AgentState.FINISHED, job_id=job.id)
        logger.info("job %s ended %s", job.id, job.status.value)
        outcome.epsilon = self._ledger.epsilon(self._policy.tighten(job.dp).delta)
        if job.status != JobStatus.COMPLETED:
            return outcome
        from client_agent.export import export_model

        outcome.exported_model = export_model(
            chain.spec,
            chain.weights,
            self._state_file(f"{job.id}-final.keras"),
            custom_modules=self.settings.custom_modules,
        )
        os.chmod(outcome.exported_model, PRIVATE_FILE)
        write_private(self._state_file(f"{job.id}-final-weights.npy"), _npy(chain.weights))
        logger.info("job %s completed; final model saved to %s", job.id, outcome.exported_model)
        return outcome

    def export(self, job_id: str, directory: Path) -> list[Path]:
        """``fedhe export``: the completed job's model as .keras, SavedModel and TFLite, each checked."""
        from client_agent.export import export_all

        job = self._aggregator.job(job_id)
        if job.status != JobStatus.COMPLETED:
            raise Conflict(
                f"job {job_id} is {job.status.value}; its model exists once it completes", code="job_not_completed"
            )
        chain = self._chain(job)
        self._catch_up(job, chain)
        _, validation = self._site_data(job)
        exported = export_all(
            chain.spec,
            chain.weights,
            directory,
            np.asarray(validation.x[:64]),
            name=job.id,
            custom_modules=self.settings.custom_modules,
        )
        return [exported.keras, exported.saved_model, exported.tflite_float16, exported.tflite_int8]


def _npy(weights: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, weights)
    return buffer.getvalue()
