"""The site daemon: follows jobs round by round, trains, encrypts, uploads, evaluates, exports.

It never needs an operator: network failures are retried with exponential backoff, a
restart resumes from the aggregator's view of the round (``submitted_by_caller``), from the
round's record on disk (``client_agent.round_record``: the update it made once, its keys and
statements) and from the global model chain (``client_agent.global_chain``), and the privacy
ledger carries the budget across restarts. In a secure round (ADR 0010) it advertises a key,
uploads its masked update once the roster checks out, answers the unmasking once the
transcript does, and applies a published aggregate only after ``published_masks`` and the
codec's bound check accept it (``client_agent.secure_aggregation``).

It tells the operator what it does: a heartbeat with its state and versions, and a decline
with the reason whenever it will not upload to a round (budget spent, data unusable, versions
that differ, refused) or will not apply its aggregate, so a round need not wait for its
deadline. It logs once per round step, not once per poll.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from client_agent.data_check import check_rows_fit, load_for_job
from client_agent.datasets import Dataset
from client_agent.dp_randomness import noise_generator
from client_agent.global_chain import GlobalModelChain
from client_agent.heartbeat import Heartbeat
from client_agent.initial_weights import InitialWeightsSource
from client_agent.ledger import LedgerEntry, PrivacyLedger
from client_agent.normalisation import statistics_upload
from client_agent.outcomes import DECLINE_REASONS, JobOutcome, OutcomeStatus
from client_agent.policy import SitePolicy, load_policy
from client_agent.round_record import MadeUpdate, RoundRecord
from client_agent.secure_aggregation import (
    PublishedRound,
    check_roster,
    prepare_upload,
    published_masks,
    sign_advertisement,
    sign_statement,
    unmasking_answer,
)
from client_agent.settings import AgentSettings
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, PINNED_KEYS_PURPOSE, private_key_from_pem, sign_request
from fedhe.cpus import usable_cpus
from fedhe.environment import current as current_environment
from fedhe.environment import differences
from fedhe.errors import (
    AggregateRefused,
    BudgetExhausted,
    Conflict,
    DataProblem,
    FedheError,
    ImplausibleAggregate,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TooManyRequests,
    Unauthenticated,
    UpstreamUnavailable,
)
from fedhe.files import PRIVATE_FILE, private_dir, write_private
from fedhe.global_model import AggregateFacts, Decryption, decode_aggregate, weighted_update
from fedhe.he import (
    Envelope,
    SecretContext,
    UpdateCodec,
    codec_for,
    encode_envelope,
    load_secret_context,
    quantisation_report,
)
from fedhe.logs import request_id
from fedhe.privacy import TrainingPass, local_training_pass, statistics_pass
from fedhe.schemas import (
    AgentState,
    DeclineCreate,
    DeclineReason,
    EvaluationCreate,
    FederationKeys,
    JobPublic,
    JobStatus,
    KeyReleaseRequest,
    PinnedKeysRequest,
    PrivacyReport,
    RoundPublic,
    RoundState,
)
from fedhe.secagg.messages import AdvertisementCreate, UploadStatement
from fedhe.secagg.statements import RoundAttempt, UploadFacts, chunks_sha256

if TYPE_CHECKING:
    import tensorflow as tf

    from client_agent.export import ExportedModels

logger = logging.getLogger("fedhe.agent")

DATA_PROBLEM_NOTICE = "this site's data does not fit the job (the site's agent log names the file, row and column)"

_RUNNING = (RoundState.OPEN, RoundState.COLLECTING, RoundState.UNMASKING)
"""The states of a round that still waits on its sites."""

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
        self._aggregator = aggregator or settings.aggregator_client()
        self._keyserver = keyserver or settings.keyserver_client()
        self._signing_key = private_key_from_pem(settings.signing_key_pem())
        self._policy: SitePolicy = load_policy(settings.policy_file)
        self._state_dir = private_dir(settings.state_dir).resolve()
        self._ledger = PrivacyLedger(self._state_file("privacy-ledger.json"))
        self._environment = current_environment()
        self._heartbeat = Heartbeat(self._aggregator, self._environment, settings.heartbeat_interval_s)
        self._contexts: dict[str, SecretContext] = {}
        self._codecs: dict[tuple[str, str, str], UpdateCodec] = {}
        self._data: dict[str, tuple[Dataset, Dataset]] = {}
        self._chains: dict[str, GlobalModelChain] = {}
        self._evaluated: dict[str, set[int]] = {}
        self._evaluation_models: dict[str, tuple[str, tf.keras.Model]] = {}
        self._pinned: dict[str, tuple[int, FederationKeys]] = {}
        self._sat_out: set[tuple[str, int, int]] = set()
        self._backoff = settings.poll_interval_s

    def _secret_context(self, key_id: str) -> SecretContext:
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
            self._data[job.id] = load_for_job(self.settings, job)
            self._heartbeat.set_data_size(len(self._data[job.id][0]))
        return self._data[job.id]

    def _chain(self, job: JobPublic) -> GlobalModelChain:
        if job.id not in self._chains:
            given = InitialWeightsSource(
                self._aggregator.initial_weights,
                self._state_dir,
                local_dir=self.settings.initial_weights_dir,
                custom_modules=self.settings.custom_modules,
            )
            self._chains[job.id] = GlobalModelChain(
                job,
                self._state_file(f"{job.id}-global.npz"),
                custom_modules=self.settings.custom_modules,
                given_weights=given,
            )
        return self._chains[job.id]

    def _wait(self, failed: bool) -> None:
        """Sleep before the next poll; back off exponentially while calls fail."""
        if failed:
            self._backoff = min(self._backoff * 2, self.settings.max_backoff_s)
        else:
            self._backoff = self.settings.poll_interval_s
        time.sleep(self._backoff)

    def _retry_after(self, waiting_for: str, exc: FedheError) -> None:
        """Say what the site waits for and why, then back off before trying again."""
        next_backoff = min(self._backoff * 2, self.settings.max_backoff_s)
        logger.warning("%s: %s (%s); trying again in %.0f s", waiting_for, exc.message, exc.code, next_backoff)
        self._wait(failed=True)

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
                self._retry_after("waiting for the aggregator to list its jobs", exc)
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
        followed: RoundPublic | None = None
        while True:
            try:
                job, chain, current = self._follow(job, followed)
                followed = None
                if current is None:
                    self._evaluate_newest(job, chain)
                    return self._finish(job, chain, outcome)
                if not self._has_work(job, current):
                    if not self._trains_next(job, current):
                        # While the round waits on others, evaluating delays nothing.
                        self._evaluate_newest(job, chain)
                    self._heartbeat.report(AgentState.WAITING, job_id=job.id, round_number=job.current_round)
                    followed = self._wait_for_change(job, current)
                    continue
                with request_id(f"{job.id}-r{job.current_round}-a{current.attempt}"):
                    self._check_can_train(job)
                    if job.secure_aggregation is None:
                        self._upload(job, current.attempt, partial(self._plain_envelope, job, current, chain, outcome))
                    else:
                        self._secure_step(job, current, chain, outcome)
            except AggregateRefused as exc:
                return self._refuse_aggregate(job, outcome, exc)
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
                self._retry_after(f"job {job.id}: waiting for the services", exc)

    def _follow(
        self, job: JobPublic, followed: RoundPublic | None
    ) -> tuple[JobPublic, GlobalModelChain, RoundPublic | None]:
        """The job, its chain (every published round applied) and its current round (None once the
        job is no longer running). A round the long poll just answered serves as it is when it is
        the job's current round and still running (stopping a job fails its round): the job, its
        chain and its data are then as they were, and a phase change costs no further requests."""
        if followed is not None and followed.number == job.current_round and followed.state in _RUNNING:
            return job, self._chain(job), followed
        job = self._aggregator.job(job.id)
        # Before any round: a site whose data does not fit declines now, naming every problem.
        self._site_data(job)
        chain = self._chain(job)
        self._catch_up(job, chain)
        if job.status != JobStatus.RUNNING:
            return job, chain, None
        return job, chain, self._aggregator.round(job.id, job.current_round)

    def _wait_for_change(self, job: JobPublic, current: RoundPublic) -> RoundPublic | None:
        """Until the round the site waits on moves on: the aggregator answers as soon as it does
        (a long poll, up to ``round_wait_s``), so a phase change reaches the site at once; the
        round as the long poll answered it (None after a plain sleep)."""
        if current.state in (*_RUNNING, RoundState.CLOSED):
            changed = self._aggregator.round(
                job.id, current.number, changed_from=current, wait_s=self.settings.round_wait_s
            )
            self._backoff = self.settings.poll_interval_s
            return changed
        self._wait(failed=False)
        return None

    @staticmethod
    def _trains_next(job: JobPublic, current: RoundPublic) -> bool:
        """Whether this site uploads as soon as the secure round's roster closes (it advertised a key,
        and trained right after), so that it waits for nothing else meanwhile."""
        return (
            job.secure_aggregation is not None
            and current.state == RoundState.OPEN
            and bool(current.advertised_by_caller)
        )

    def _has_work(self, job: JobPublic, current: RoundPublic) -> bool:
        """Whether the round waits for something from this site that it has not done yet."""
        if current.state not in (RoundState.OPEN, RoundState.COLLECTING, RoundState.UNMASKING):
            return False
        if current.caller_selected is False:
            return False
        if job.secure_aggregation is None:
            return current.state != RoundState.UNMASKING and not current.submitted_by_caller
        if current.state == RoundState.OPEN:
            return not current.advertised_by_caller and (job.id, current.number, current.attempt) not in self._sat_out
        if current.state == RoundState.COLLECTING:
            return not current.submitted_by_caller and self.settings.site_id in (current.roster or [])
        return bool(current.submitted_by_caller) and not current.answered_by_caller

    def _round_record(self, job: JobPublic, number: int) -> RoundRecord:
        return RoundRecord(self._state_file(f"{job.id}-r{number}-round.json"))

    def _pinned_keys(self, job: JobPublic, *, for_round: int | None = None) -> FederationKeys:
        """The keyserver's pinned keys of the job's federation, checked to name this job's federation and this site.

        Fetched with a fresh signed request once in each round ``for_round`` this site takes part
        in, before it trains, so a wrong keyserver or a revoked membership stops it before it
        spends budget; otherwise the last keys fetched serve.
        """
        cached = self._pinned.get(job.id)
        if cached is None or (for_round is not None and cached[0] != for_round):
            timestamp, nonce, signature = sign_request(
                self._signing_key, PINNED_KEYS_PURPOSE, self.settings.keyserver_audience(), [job.key_id]
            )
            request = PinnedKeysRequest(
                site_id=self.settings.site_id, timestamp=timestamp, nonce=nonce, signature=signature
            )
            keys = self._keyserver.pinned_keys(job.key_id, request)
            if keys.federation_id != job.federation_id or keys.key_id != job.key_id:
                raise InvalidRequest(
                    "the keyserver places the job's key in another federation than the coordinator says",
                    code="federation_mismatch",
                )
            cached = (job.current_round if for_round is None else for_round, keys)
            self._pinned[job.id] = cached
        return cached[1]

    def _active_keys(self, job: JobPublic) -> dict[str, str]:
        return {m.site_id: m.public_key for m in self._pinned_keys(job).members if m.status == "active"}

    def _secure_step(self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome) -> None:
        """This site's next step in a secure round: advertise, upload or answer (ADR 0010)."""
        number, me = job.current_round, self.settings.site_id
        record = self._round_record(job, number)
        at = RoundAttempt(job.id, number, current.attempt)
        if record.answered_attempt not in (None, current.attempt):
            self._sit_out(job, current, record.answered_attempt)
            return
        if current.state == RoundState.OPEN:
            # The key goes out before training: the roster closes as soon as every site has said
            # it takes part, and each site then uploads the moment it has trained.
            self._ready_to_make(job, record)
            key = record.attempt_key(at.attempt)
            signature = sign_advertisement(self._signing_key, at, me, key)
            self._aggregator.advertise_key(
                job.id, number, AdvertisementCreate(attempt=at.attempt, public_key=key.public_key, signature=signature)
            )
            logger.info("job %s round %d: key advertised for attempt %d", job.id, number, at.attempt)
            # Training starts at once, while the roster forms: nothing of it leaves the site
            # before the roster is fixed and checks out (``_masked_envelope``), the pass stays
            # unreleased in the ledger until then, and a later attempt re-sends the same update.
            self._made_update(job, current, chain, outcome, record)
        elif current.state == RoundState.COLLECTING:
            self._upload(job, current.attempt, partial(self._masked_envelope, job, current, chain, outcome, record))
        else:
            mine = record.statement(at.attempt)
            if mine is None:
                return
            transcript = self._aggregator.transcript(job.id, number, attempt=at.attempt)
            answer = unmasking_answer(
                transcript,
                at,
                me,
                record.attempt_key(at.attempt),
                mine,
                self._active_keys(job),
                self._facts(job, number),
            )
            record.record_answer(at.attempt)
            self._aggregator.answer_unmasking(job.id, number, answer)
            logger.info("job %s round %d: unmasking answered (%d shares)", job.id, number, len(answer.shares))

    def _sit_out(self, job: JobPublic, current: RoundPublic, answered: int) -> None:
        """After answering one attempt's unmasking, this site uploads to no other attempt of the round."""
        self._sat_out.add((job.id, current.number, current.attempt))
        message = (
            f"this site answered attempt {answered}'s unmasking; it re-sends its update to no other attempt "
            "of this round (ADR 0010) and takes part again in the next round"
        )
        logger.warning("job %s round %d: %s", job.id, current.number, message)
        if current.state == RoundState.OPEN:
            with contextlib.suppress(Conflict):
                self._aggregator.decline_round(
                    job.id, current.number, DeclineCreate(reason=DeclineReason.ALREADY_UNMASKED, message=message)
                )

    def _facts(self, job: JobPublic, number: int) -> UploadFacts:
        return UploadFacts(key_id=job.key_id, format_id=job.format_id, num_values=job.round_num_values(number))

    def _catch_up(self, job: JobPublic, chain: GlobalModelChain) -> None:
        """Apply every published round the chain has not seen, scoring each model it replaces first."""
        published = job.total_rounds if job.status == JobStatus.COMPLETED else job.current_round
        while chain.next_round < published:
            number = chain.next_round
            try:
                published_sum = self._aggregator.aggregate(job.id, number)
            except Conflict:
                if job.status == JobStatus.RUNNING:
                    raise
                break  # the job ended: a round after its last published one never will be
            try:
                decoded = decode_aggregate(published_sum, partial(self._decryption, job, number))
            except AggregateRefused as exc:
                exc.detail["round"] = number  # so the refusal names the round, not the one now open
                raise
            self._evaluate_newest(job, chain)  # every model is scored before the next replaces it
            chain.apply(decoded)
            self._ledger.drop_unreleased(job.id, number)
            self._round_record(job, number).remove()
            if job.is_statistics_round(number):
                logger.info("job %s: pooled statistics received; inputs are normalised with them", job.id)

    def _evaluate_newest(self, job: JobPublic, chain: GlobalModelChain) -> None:
        """Evaluate the newest model this site applied, once."""
        latest = chain.next_round - 1
        if latest >= 0 and not job.is_statistics_round(latest) and latest not in self._evaluated.get(job.id, set()):
            self._evaluate(job, latest, chain)

    def _decryption(self, job: JobPublic, number: int, envelope: Envelope, facts: AggregateFacts) -> Decryption:
        """How to decrypt round ``number``'s published aggregate, once everything about it checks out."""
        expected = job.round_num_values(number)
        if envelope.key_id != job.key_id or envelope.format_id != job.format_id:
            raise AggregateRefused("the aggregate's key or format is not the job's")
        if envelope.num_values != expected or facts.round_number != number:
            raise AggregateRefused(f"round {number}'s aggregate is for another round or length")
        codec = self._codec(job, number)
        if job.secure_aggregation is None:
            return Decryption(codec, None, facts.num_inputs)
        assert job.threshold is not None
        at = RoundAttempt(job.id, number, facts.attempt)
        transcript = self._aggregator.transcript(job.id, number, attempt=facts.attempt)
        record = self._round_record(job, number)
        admitted = {m.site_id: m.public_key for m in self._pinned_keys(job).members}
        masks = published_masks(
            transcript,
            at,
            self.settings.site_id,
            PublishedRound(mine=record.statement(facts.attempt), answered_attempt=record.answered_attempt),
            admitted,
            self._facts(job, number),
            min_statements=max(job.min_sites, job.threshold + 1),
            total_samples=facts.total_samples,
        )
        return Decryption(codec, masks, len(transcript.statements))

    def _check_can_train(self, job: JobPublic) -> None:
        """Refuse, before any privacy budget is spent, a round this site cannot do properly."""
        mismatched = differences(job.environment, self._environment)
        if mismatched:
            raise InvalidRequest(
                "this site runs other versions than the job: " + "; ".join(mismatched), code="environment_mismatch"
            )
        threshold = self._policy.min_secure_aggregation_threshold
        if threshold is not None and (job.threshold or 0) < threshold:
            raise InvalidRequest(
                f"the job's secure aggregation threshold is {job.threshold}, below this site's policy of {threshold}",
                code="threshold_below_policy",
            )
        self._site_data(job)

    def _refuse_aggregate(self, job: JobPublic, outcome: JobOutcome, exc: AggregateRefused) -> JobOutcome:
        """Report a refused aggregate to the operator (never applied) and stop taking part."""
        number = exc.detail.get("round", job.current_round)
        reason = (
            DeclineReason.IMPLAUSIBLE_AGGREGATE
            if isinstance(exc, ImplausibleAggregate)
            else DeclineReason.AGGREGATE_REFUSED
        )
        logger.error(
            "job %s round %s: %s; this site does not apply it and stops taking part", job.id, number, exc.message
        )
        outcome.status = OutcomeStatus.AGGREGATE_REFUSED
        outcome.notes.append(f"{exc.code}: {exc.message}")
        outcome.epsilon = self._ledger.epsilon(self._policy.tighten(job.dp).delta)
        self._heartbeat.report(AgentState.DECLINED, job_id=job.id, round_number=number, message=exc.message[:500])
        try:
            self._aggregator.decline_round(job.id, number, DeclineCreate(reason=reason, message=exc.message[:500]))
        except FedheError as declined:
            logger.warning("job %s: the refusal was not recorded (%s)", job.id, declined.code)
        return outcome

    def _stop_taking_part(
        self, job: JobPublic, outcome: JobOutcome, status: OutcomeStatus, exc: FedheError
    ) -> JobOutcome:
        """Record why this site stops, tell the operator (decline and heartbeat), and return the outcome."""
        logger.error("job %s: %s (%s); this site stops taking part", job.id, exc.message, exc.code)
        outcome.status = status
        outcome.notes.append(f"{exc.code}: {exc.message}")
        outcome.epsilon = self._ledger.epsilon(self._policy.tighten(job.dp).delta)
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

        _, validation = self._site_data(job)
        model = self._evaluation_model(job, chain)
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

    def _evaluation_model(self, job: JobPublic, chain: GlobalModelChain) -> tf.keras.Model:
        """The job's model holding the chain's weights, built once per job and model spec."""
        from client_agent.models import set_flat_weights
        from client_agent.training import load_model

        spec = chain.spec.model_dump_json()
        built = self._evaluation_models.get(job.id)
        if built is None or built[0] != spec:
            built = (spec, load_model(chain.spec, chain.weights, custom_modules=self.settings.custom_modules))
            self._evaluation_models[job.id] = built
        else:
            set_flat_weights(built[1], chain.weights)
        return built[1]

    def _state_file(self, name: str) -> Path:
        """A file directly inside the state directory; a name that would leave it is refused."""
        path = (self._state_dir / name).resolve()
        if path.parent != self._state_dir:
            raise InvalidRequest(f"refusing to write {name!r} outside the state directory", code="unsafe_path")
        return path

    def _upload(self, job: JobPublic, attempt: int, make_body: Callable[[], bytes]) -> None:
        """Upload this round attempt's envelope, making it only if none is already waiting.

        The envelope is written to the state directory before the first try, so a lost
        connection or a restart re-sends the same bytes (the aggregator treats that as a
        replay). The update inside was made once per round (``_made_update``): a new attempt
        encrypts (and masks) it afresh, but never trains again.
        """
        pending = self._state_file(f"pending-{job.id}-r{job.current_round}-a{attempt}.fedhe")
        if pending.exists():
            body = pending.read_bytes()
            logger.info("job %s round %d: re-sending the saved update", job.id, job.current_round)
        else:
            body = make_body()
            write_private(pending, body)
        self._heartbeat.report(AgentState.UPLOADING, job_id=job.id, round_number=job.current_round)
        self._ledger.mark_released(job.id, job.current_round)
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

    def _made_update(
        self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome, record: RoundRecord
    ) -> tuple[NDArray[Any], MadeUpdate]:
        """This round's noised update (training, or the statistics step), made once per round.

        Before anything is computed from the data, the site gets and checks the key and the
        federation's pinned keys, and checks its budget; what it makes is charged to the ledger
        at once and kept, so every later attempt of the round re-sends it and spends nothing new.
        """
        saved = record.update()
        if saved is not None:
            return saved
        self._ready_to_make(job, record)
        self._heartbeat.report(AgentState.TRAINING, job_id=job.id, round_number=job.current_round)
        if job.is_statistics_round(job.current_round):
            values, made = self._noised_statistics(job, current)
        else:
            values, made = self._trained_update(job, current, chain, outcome)
        record.save_update(values, made)
        return values, made

    def _ready_to_make(self, job: JobPublic, record: RoundRecord) -> None:
        """What must hold before anything is computed from the data for this round (unless it was
        made already): the key and the federation's pinned keys fetched and checked, the site's
        rows fitting the job, and the budget left for the pass it would make."""
        if record.update() is not None:
            return
        self._codec(job, job.current_round)
        self._pinned_keys(job, for_round=job.current_round)
        check_rows_fit(job, len(self._site_data(job)[0]), self._policy.tighten(job.dp).delta)
        planned = self._planned_pass(job)
        if self._policy.max_epsilon is not None:
            would_be = self._ledger.epsilon(self._policy.tighten(job.dp).delta, planned)
            if would_be > self._policy.max_epsilon:
                raise BudgetExhausted(
                    f"round {job.current_round} would bring ε to {would_be:.2f}, "
                    f"over the site's limit {self._policy.max_epsilon}"
                )

    def _planned_pass(self, job: JobPublic) -> TrainingPass:
        """The pass this round would charge: the statistics step, or local DP-SGD on the site's rows."""
        if job.is_statistics_round(job.current_round):
            assert job.statistics is not None
            return statistics_pass(job.statistics.noise_multiplier)
        train, _ = self._site_data(job)
        return local_training_pass(
            num_samples=len(train),
            batch_size=job.batch_size,
            epochs=job.local_epochs,
            noise_multiplier=self._policy.tighten(job.dp).noise_multiplier,
        )

    def _charge(self, job: JobPublic, current: RoundPublic, training: TrainingPass, delta: float) -> float:
        """Record a pass in the ledger (not yet released) and report the site's ε."""
        self._ledger.record(
            LedgerEntry(
                job_id=job.id, round=job.current_round, attempt=current.attempt, training=training, released=False
            )
        )
        epsilon = self._ledger.epsilon(delta)
        self._heartbeat.report(
            AgentState.UPLOADING,
            job_id=job.id,
            round_number=job.current_round,
            privacy=PrivacyReport(epsilon=epsilon, delta=delta, max_epsilon=self._policy.max_epsilon),
        )
        return epsilon

    def _noised_statistics(self, job: JobPublic, current: RoundPublic) -> tuple[NDArray[Any], MadeUpdate]:
        """The statistics step's vector: sums and sums of squares of the training inputs, with Gaussian noise."""
        assert job.statistics is not None
        train, _ = self._site_data(job)
        delta = self._policy.tighten(job.dp).delta
        stream = f"{self.settings.site_id}/{job.id}/statistics"
        vector, clipped = statistics_upload(
            np.asarray(train.x),
            job.statistics.feature_bounds,
            job.max_samples_per_round,
            clip_norm=job.statistics.row_clip_norm,
            noise_multiplier=job.statistics.noise_multiplier,
            rng=noise_generator(stream),
        )
        epsilon = self._charge(job, current, statistics_pass(job.statistics.noise_multiplier), delta)
        logger.info(
            "job %s: noised statistics of %d rows made (%.2f%% of values beyond their bounds, %.2f%% of rows "
            "clipped, ε=%.2f at δ=%g)",
            job.id,
            len(train),
            100 * clipped["clipped_fraction"],
            100 * clipped["rows_clipped_fraction"],
            epsilon,
            delta,
        )
        return vector, MadeUpdate(num_samples=len(train), metrics={**clipped, "epsilon": epsilon})

    def _trained_update(
        self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome
    ) -> tuple[NDArray[Any], MadeUpdate]:
        """Local DP-SGD from the global model: the change (w_k − w) · n_k / S and its plaintext metrics."""
        from client_agent.evaluation import evaluate
        from client_agent.training import LocalTraining, train_dp_sgd

        train, validation = self._site_data(job)
        dp = self._policy.tighten(job.dp)
        local_training = LocalTraining(
            epochs=job.local_epochs,
            batch_size=job.batch_size,
            learning_rate=job.learning_rate,
            proximal_mu=job.algorithm.proximal_mu,
            momentum=job.algorithm.local_momentum,
            custom_modules=self.settings.custom_modules,
            test_stream=f"{self.settings.site_id}/{job.id}/{job.current_round}",
        )
        result = train_dp_sgd(chain.spec, chain.weights, train, local_training, dp=dp)
        epsilon = self._charge(job, current, result.training, dp.delta)
        outcome.epsilon = epsilon
        outcome.rounds_trained += 1
        local = evaluate(chain.spec, result.weights, validation, custom_modules=self.settings.custom_modules)
        update = chain.update_values(
            weighted_update(result.weights, chain.weights, result.num_samples, job.max_samples_per_round)
        )
        packing = job.round_packing(job.current_round)
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
        }
        logger.info(
            "job %s round %d: trained on n=%d, ε=%.2f at δ=%g",
            job.id,
            job.current_round,
            result.num_samples,
            epsilon,
            dp.delta,
        )
        return update, MadeUpdate(num_samples=result.num_samples, metrics=metrics)

    def _envelope(
        self, job: JobPublic, chunks: list[bytes], made: MadeUpdate, seconds: float, statement: UploadStatement | None
    ) -> bytes:
        meta: dict[str, Any] = {
            "num_samples": made.num_samples,
            "metrics": made.metrics | {"encrypt_seconds": seconds},
            "environment": self._environment.model_dump(),
            "model_sha256": self._chain(job).architecture_sha256,
        }
        if statement is not None:
            meta["secagg"] = statement.model_dump()
        return encode_envelope(
            Envelope(
                format_id=job.format_id,
                key_id=job.key_id,
                num_values=job.round_num_values(job.current_round),
                chunks=chunks,
                meta=meta,
            )
        )

    def _plain_envelope(
        self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome
    ) -> bytes:
        """A round without secure aggregation: the update, encrypted (and nothing else)."""
        values, made = self._made_update(job, current, chain, outcome, self._round_record(job, job.current_round))
        started = time.perf_counter()
        chunks = self._codec(job, job.current_round).encrypt_update(values)
        return self._envelope(job, chunks, made, time.perf_counter() - started, None)

    def _masked_envelope(
        self, job: JobPublic, current: RoundPublic, chain: GlobalModelChain, outcome: JobOutcome, record: RoundRecord
    ) -> bytes:
        """A secure round's upload: the update masked for the checked roster, encrypted, its statement signed."""
        number, me = job.current_round, self.settings.site_id
        assert job.threshold is not None
        at = RoundAttempt(job.id, number, current.attempt)
        values, made = self._made_update(job, current, chain, outcome, record)
        key = record.attempt_key(at.attempt)
        roster = self._aggregator.transcript(job.id, number, attempt=at.attempt).roster
        check_roster(
            roster,
            at,
            me,
            key,
            self._active_keys(job),
            min_members=max(job.min_sites, job.threshold + 1),
            threshold=job.threshold,
        )
        prepared = prepare_upload(at, me, key, roster)
        started = time.perf_counter()
        chunks = self._codec(job, number).encrypt_update(values, masks=prepared.masks)
        seconds = time.perf_counter() - started
        statement = sign_statement(
            self._signing_key,
            at,
            self._facts(job, number),
            me=me,
            roster=roster,
            prepared=prepared,
            num_samples=made.num_samples,
            chunks_sha256=chunks_sha256(chunks),
        )
        record.save_statement(at.attempt, statement)
        return self._envelope(job, chunks, made, seconds, statement)

    def _finish(self, job: JobPublic, chain: GlobalModelChain, outcome: JobOutcome) -> JobOutcome:
        outcome.status = OutcomeStatus(job.status.value)
        self._ledger.drop_unreleased(job.id)
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

    def export(self, job_id: str, directory: Path, tflite: Collection[str]) -> ExportedModels:
        """``fedhe export``: the completed job's model as .keras and SavedModel, and each TFLite
        flavour of ``tflite`` that agrees with it on the site's validation rows."""
        from client_agent.export import export_all

        job = self._aggregator.job(job_id)
        if job.status != JobStatus.COMPLETED:
            raise Conflict(
                f"job {job_id} is {job.status.value}; its model exists once it completes", code="job_not_completed"
            )
        chain = self._chain(job)
        self._catch_up(job, chain)
        _, validation = self._site_data(job)
        return export_all(
            chain.spec,
            chain.weights,
            directory,
            np.asarray(validation.x[:64]),
            name=job.id,
            custom_modules=self.settings.custom_modules,
            tflite=tflite,
        )


def _npy(weights: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, weights)
    return buffer.getvalue()
