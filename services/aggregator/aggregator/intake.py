"""Accepting encrypted updates as they stream in, without ever touching the round's sum.

An upload is read chunk by chunk: the envelope header is checked against the job first, then
the ciphertext chunks are checked by the codec and stored as they arrive, about 2 MiB at a
time, so neither the body nor the sum is ever held whole. Only then, in one short transaction
under the job's lock, does a submission row make the stored upload count (ADR 0007). Uploads
to one job therefore proceed concurrently; the lock covers a few row updates, not ciphertext
work. The round's encrypted sum is computed once, when the round closes
(``aggregator.publisher``).

A refused upload changes nothing that counts: its stored chunks are deleted, and an upload cut
off mid-stream (a lost connection, a killed replica) is left unreferenced and swept later.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from aggregator.contexts import EvaluationContexts
from aggregator.coordination import Coordination, CoordinationUnavailable
from aggregator.jobs import (
    JobChange,
    JobCoordinator,
    RoundEncoding,
    check_selected,
    job_spec,
    round_encoding,
)
from aggregator.publisher import RoundPublisher
from aggregator.repository import AggregatorRepository
from aggregator.secure_rounds import check_statement
from aggregator.tables import RoundRow, SubmissionRow, UploadRow
from fedhe.environment import differences
from fedhe.errors import Conflict, FedheError, InvalidUpdate, PayloadTooLarge
from fedhe.he.codec import UpdateCodec
from fedhe.he.envelope import PREFIX_BYTES, EnvelopeHeader, header_length, parse_header
from fedhe.identifiers import new_id
from fedhe.modelspec import ModelSpec
from fedhe.schemas import Environment, JobCreate, RoundState, UpdateAccepted, check_metrics
from fedhe.secagg.messages import UploadStatement
from fedhe.secagg.statements import ChunkHasher, UploadFacts

IDEMPOTENCY_TTL_S = 24 * 3600
# Chunks are checked and stored in batches of about this many bytes, one worker-thread call and one
# transaction per batch: the memory an upload holds while it streams in.
BATCH_BYTES = 2 * 1024 * 1024


def check_environment(meta: dict[str, object], expected: Environment, model: ModelSpec) -> None:
    """Refuse an update made with other versions, or another model build, than the job's, naming each difference."""
    try:
        actual = Environment.model_validate(meta.get("environment"))
    except ValidationError as exc:
        raise InvalidUpdate(
            "the update does not say which versions made it (meta.environment)", code="environment_mismatch"
        ) from exc
    mismatched = differences(expected, actual)
    built = meta.get("model_sha256")
    if model.fingerprint is not None and built != model.fingerprint.architecture_sha256:
        mismatched.append(
            f"model: job has architecture {model.fingerprint.architecture_sha256[:12]}, site built {str(built)[:12]}"
        )
    if mismatched:
        raise InvalidUpdate(
            "this site runs other versions than the job: " + "; ".join(mismatched),
            code="environment_mismatch",
            detail={"differences": mismatched},
        )


def check_header(header: EnvelopeHeader, *, spec: JobCreate, encoding: RoundEncoding) -> int:
    """Check an update's header against its job and round; returns the sample count n_k."""
    key_id, num_values = encoding.key_id, encoding.num_values
    if header.key_id != key_id:
        raise Conflict(
            f"update is encrypted under key {header.key_id!r}; this job uses {key_id!r}",
            code="stale_key_id",
            detail={"expected": key_id},
        )
    if header.format_id != encoding.format_id:
        raise InvalidUpdate(
            f"update format {header.format_id!r} is not this job's {encoding.format_id!r}",
            code="unsupported_format",
            detail={"expected": encoding.format_id},
        )
    if header.num_values != num_values:
        raise InvalidUpdate(
            f"update has {header.num_values} values; this round takes {num_values}",
            code="wrong_num_values",
            detail={"expected": num_values},
        )
    num_samples = header.meta.get("num_samples")
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
        check_metrics(header.meta.get("metrics", {}))
    except ValueError as exc:
        raise InvalidUpdate(str(exc), code="invalid_metrics") from exc
    return num_samples


def check_room(repo: AggregatorRepository, spec: JobCreate, row: RoundRow, site_id: str) -> None:
    """``Conflict`` unless round ``row`` may still take this site's upload (checked as the upload
    starts, and again under the job's lock when it counts)."""
    check_selected(row, site_id)
    if repo.decline(row.id, site_id) is not None:
        raise Conflict(f"site declined round {row.number}; it cannot upload to it", code="round_declined")
    if row.roster is not None and site_id not in {member["site_id"] for member in row.roster}:
        raise Conflict(
            f"this site is not in round {row.number} attempt {row.attempt}'s roster; it may take part in a later one",
            code="not_in_roster",
        )
    if spec.packing is not None and row.num_submissions >= spec.packing.max_sites:
        raise Conflict(
            f"round {row.number} already has the job's max_sites={spec.packing.max_sites} updates", code="round_full"
        )


class BodyReader:
    """Exact reads from a streamed request body, hashing everything read and counting it.

    The body's parts are kept as they arrive and each read is cut from them with one copy (none
    when a read is exactly one part), rather than appended to and sliced out of one buffer.
    """

    def __init__(self, stream: AsyncIterator[bytes], limit: int):
        self._stream = stream
        self._parts: deque[bytes] = deque()
        self._start = 0  # bytes of the first part already read
        self._buffered = 0  # bytes received and not yet read
        self.limit = limit
        self.read_bytes = 0
        self.digest = hashlib.sha256()

    async def read_exactly(self, size: int, what: str) -> bytes:
        """The next ``size`` bytes; ``InvalidUpdate`` if the body ends first."""
        while self._buffered < size:
            try:
                part = await anext(self._stream)
            except StopAsyncIteration:
                raise InvalidUpdate(f"the body ends inside {what}", code="truncated_update") from None
            if self.read_bytes + self._buffered + len(part) > self.limit:
                raise PayloadTooLarge(f"body is over the {self.limit}-byte limit", detail={"limit": self.limit})
            if part:
                self._parts.append(part)
                self._buffered += len(part)
        data = self._take(size)
        self.read_bytes += size
        self.digest.update(data)
        return data

    def _take(self, size: int) -> bytes:
        """Cut the next ``size`` buffered bytes from the parts."""
        if size == 0:
            return b""
        self._buffered -= size
        first = self._parts[0]
        if self._start + size <= len(first):
            if self._start == 0 and size == len(first):
                return self._parts.popleft()
            data = first[self._start : self._start + size]
            self._start += size
            return data
        pieces: list[memoryview] = []
        needed = size
        while needed:
            first = self._parts[0]
            taken = min(len(first) - self._start, needed)
            pieces.append(memoryview(first)[self._start : self._start + taken])
            needed -= taken
            if self._start + taken == len(first):
                self._parts.popleft()
                self._start = 0
            else:
                self._start += taken
        return b"".join(pieces)

    async def expect_end(self) -> None:
        """``InvalidUpdate`` if anything follows the declared chunks."""
        if self._buffered:
            raise InvalidUpdate("the body carries bytes after its last declared chunk", code="truncated_update")
        async for part in self._stream:
            if part:
                raise InvalidUpdate("the body carries bytes after its last declared chunk", code="truncated_update")


@dataclass(frozen=True)
class _Admission:
    """What the header check found, for the streaming and the final commit."""

    round_id: int
    attempt: int
    num_samples: int
    codec: UpdateCodec
    already_submitted: bool
    statement: UploadStatement | None = None


@dataclass(frozen=True)
class _NewUpload:
    """The ``uploads`` row an upload's chunks are stored under (inserted with the first batch)."""

    id: str
    round_id: int
    site_id: str
    num_chunks: int


@dataclass(frozen=True)
class _Staged:
    """An upload read to its end: its header, its stored chunks and its digest."""

    header: EnvelopeHeader
    admission: _Admission
    upload_id: str | None
    digest: str
    num_bytes: int


class UpdateIntake:
    """Streams uploads into storage and makes each count in one short locked transaction."""

    def __init__(
        self,
        jobs: JobCoordinator,
        contexts: EvaluationContexts,
        coordination: Coordination,
        publisher: RoundPublisher,
    ):
        self._jobs = jobs
        self._contexts = contexts
        self._coordination = coordination
        self._publisher = publisher

    async def accept(
        self,
        *,
        site_id: str,
        job_id: str,
        round_number: int,
        body: AsyncIterator[bytes],
        max_bytes: int,
        declared_bytes: int | None = None,
        idempotency_key: str | None = None,
        expected_sites: int = 0,
    ) -> UpdateAccepted:
        """Accept one streamed upload or raise the error naming what is wrong (nothing counted).

        Sending the same bytes again (a retry after a lost response) is not a duplicate: it
        returns the original acceptance with ``replayed`` set, and counts nothing twice.
        """
        try:
            if declared_bytes is not None and declared_bytes > max_bytes:
                raise PayloadTooLarge(
                    f"body of {declared_bytes} bytes is over the {max_bytes}-byte limit", detail={"limit": max_bytes}
                )
            reader = BodyReader(body, max_bytes)
            return await self._accept(site_id, job_id, round_number, reader, idempotency_key, expected_sites)
        except FedheError as exc:
            self._jobs.metrics.reject(exc.code)
            raise

    async def _accept(
        self,
        site_id: str,
        job_id: str,
        round_number: int,
        reader: BodyReader,
        idempotency_key: str | None,
        expected_sites: int,
    ) -> UpdateAccepted:
        prefix = await reader.read_exactly(PREFIX_BYTES, "the envelope's prefix")
        raw_header = await reader.read_exactly(header_length(prefix), "the envelope's header")
        header = parse_header(raw_header, reader.limit)
        if PREFIX_BYTES + len(raw_header) + header.body_bytes > reader.limit:
            limit = reader.limit
            raise PayloadTooLarge(f"update declares more than the {limit}-byte limit", detail={"limit": limit})
        admission = await run_in_threadpool(self._admit, site_id, job_id, round_number, header)
        # The upload's row is inserted with its first batch of chunks (one transaction fewer).
        upload = None
        if not admission.already_submitted:
            upload = _NewUpload(new_id("upl"), admission.round_id, site_id, len(header.chunk_sizes))
        upload_id = None if upload is None else upload.id
        scoped_key = None if idempotency_key is None else f"{site_id}:{job_id}:{idempotency_key}"
        try:
            chunks_sha256 = await self._stream_chunks(
                reader, header, admission.codec, upload, hash_chunks=admission.statement is not None
            )
            await reader.expect_end()
            if admission.statement is not None and admission.statement.chunks_sha256 != chunks_sha256:
                raise InvalidUpdate(
                    "the ciphertext chunks are not the ones the site's signed statement names", code="invalid_statement"
                )
            digest = reader.digest.hexdigest()
            await run_in_threadpool(self._check_idempotency_key, scoped_key, digest)
            staged = _Staged(header, admission, upload_id, digest, reader.read_bytes)
            accepted = await run_in_threadpool(self._commit, site_id, job_id, round_number, staged, expected_sites)
        except BaseException:
            if upload_id is not None:
                await run_in_threadpool(self._drop_upload, upload_id)
            raise
        if accepted.replayed and upload_id is not None:
            await run_in_threadpool(self._drop_upload, upload_id)
        if not accepted.replayed:
            self._remember_idempotency_key(scoped_key, digest)
            self._jobs.metrics.accept(reader.read_bytes)
        if accepted.round_state == RoundState.CLOSED:
            # The upload that closed the round waits for its sum; a crash here leaves the round
            # closed, and the deadline watcher publishes it.
            if await run_in_threadpool(self._publisher.publish, job_id, admission.round_id):
                state = RoundState.PUBLISHED
            else:  # another process holds the sum, or it failed: say what the round is now
                state = await run_in_threadpool(self._round_state, admission.round_id)
            accepted = accepted.model_copy(update={"round_state": state})
        return accepted

    def _round_state(self, round_id: int) -> RoundState:
        with self._jobs.sessions.transaction() as session:
            row = AggregatorRepository(session).round_by_id(round_id)
            assert row is not None
            return RoundState(row.state)

    def _admit(self, site_id: str, job_id: str, round_number: int, header: EnvelopeHeader) -> _Admission:
        """Everything that can be checked before a ciphertext byte is read (no lock, no write)."""
        with self._jobs.sessions.transaction() as session:
            repo = AggregatorRepository(session)
            job = repo.job(job_id)
            spec = job_spec(job)
            encoding = round_encoding(job, round_number)
            codec = self._contexts.codec(encoding.key_id, encoding.format_id, encoding.packing)
            already = self._earlier_submission(repo, job_id, round_number, site_id)
            if already is not None:
                # Keep reading: the same bytes again are a replay, other bytes a duplicate.
                return _Admission(already.round_id, 0, already.num_samples, codec, already_submitted=True)
            row = self._jobs.accepting_round(JobChange(repo, job), round_number)
            check_room(repo, spec, row, site_id)
            num_samples = check_header(header, spec=spec, encoding=encoding)
            check_environment(header.meta, Environment.model_validate(job.environment), spec.model)
            codec.check_count(header.chunk_sizes, codec.num_chunks(encoding.num_values))
            statement = None
            if spec.secure_aggregation is not None:
                facts = UploadFacts(
                    key_id=encoding.key_id, format_id=encoding.format_id, num_values=encoding.num_values
                )
                statement = check_statement(
                    repo, spec, row, site_id, header.meta.get("secagg"), num_samples=num_samples, facts=facts
                )
            return _Admission(row.id, row.attempt, num_samples, codec, already_submitted=False, statement=statement)

    @staticmethod
    def _earlier_submission(
        repo: AggregatorRepository, job_id: str, round_number: int, site_id: str
    ) -> SubmissionRow | None:
        row = repo.current_round(job_id, round_number)
        return None if row is None else repo.submission(row.id, site_id)

    async def _stream_chunks(
        self,
        reader: BodyReader,
        header: EnvelopeHeader,
        codec: UpdateCodec,
        upload: _NewUpload | None,
        *,
        hash_chunks: bool,
    ) -> str | None:
        """Read every chunk and (unless it is a possible replay) check and store it, a batch of
        about ``BATCH_BYTES`` per worker-thread call, the first with the upload's row; returns the
        chunks' hash (``fedhe.secagg.statements.chunks_sha256``) if ``hash_chunks`` (a signed
        statement names it)."""
        hasher = ChunkHasher() if hash_chunks else None
        batch: list[tuple[int, bytes]] = []
        batch_bytes = 0
        unstored = upload  # the row, until the first batch stores it
        for index, size in enumerate(header.chunk_sizes):
            data = await reader.read_exactly(size, f"chunk {index}")
            if hasher is not None:
                hasher.update(data)
            if upload is None:
                continue
            batch.append((index, data))
            batch_bytes += size
            if batch_bytes >= BATCH_BYTES:
                await run_in_threadpool(self._check_and_store, codec, upload, batch, unstored is not None)
                batch, batch_bytes, unstored = [], 0, None
        if upload is not None and (batch or unstored is not None):
            await run_in_threadpool(self._check_and_store, codec, upload, batch, unstored is not None)
        return None if hasher is None else hasher.hexdigest()

    def _check_and_store(
        self, codec: UpdateCodec, upload: _NewUpload, chunks: list[tuple[int, bytes]], first: bool
    ) -> None:
        """Check every chunk of a batch (the first bad one raises ``InvalidUpdate``), then store
        them, with the upload's row if this is its ``first`` batch."""
        for index, data in chunks:
            codec.check_chunk(index, data)
        with self._jobs.sessions.transaction() as session:
            if first:
                session.add(
                    UploadRow(
                        id=upload.id, round_id=upload.round_id, site_id=upload.site_id, num_chunks=upload.num_chunks
                    )
                )
                session.flush()
            if chunks:
                AggregatorRepository(session).add_upload_chunks(upload.id, chunks)

    def _drop_upload(self, upload_id: str) -> None:
        with contextlib.suppress(FedheError), self._jobs.sessions.transaction() as session:
            AggregatorRepository(session).delete_upload(upload_id)

    def _commit(
        self, site_id: str, job_id: str, round_number: int, staged: _Staged, expected_sites: int
    ) -> UpdateAccepted:
        """Make the stored upload count, in one short transaction under the job's lock."""
        header, admission, upload_id, digest = staged.header, staged.admission, staged.upload_id, staged.digest
        with self._jobs.locked_job(job_id) as change:
            repo, job = change.repo, change.job
            replay = self._replayed(change, site_id, round_number, digest)
            if replay is not None:
                return replay
            row = self._jobs.accepting_round(change, round_number)
            if upload_id is None or repo.submission(row.id, site_id) is not None:
                raise Conflict(f"site already uploaded to round {round_number}", code="duplicate_update")
            if row.id != admission.round_id:
                raise Conflict(f"round {round_number} was reopened while this update streamed in", code="round_closed")
            check_room(repo, job_spec(job), row, site_id)
            row.num_submissions += 1
            row.total_samples += admission.num_samples
            repo.add(
                SubmissionRow(
                    round_id=row.id,
                    site_id=site_id,
                    upload_id=upload_id,
                    num_samples=admission.num_samples,
                    num_bytes=staged.num_bytes,
                    sha256=digest,
                    metrics=header.meta.get("metrics", {}),
                    statement=None if admission.statement is None else admission.statement.model_dump(),
                )
            )
            detail = {
                "round": round_number,
                "attempt": row.attempt,
                "sha256": digest,
                "num_samples": admission.num_samples,
            }
            repo.audit(actor=f"site:{site_id}", action="update.accept", subject=job.id, detail=detail)
            change.emit(
                "update.accepted",
                site_id=site_id,
                num_submissions=row.num_submissions,
                num_bytes=staged.num_bytes,
                **detail,
            )
            self._jobs.lifecycle.advance(change, row, expected_sites)
            return UpdateAccepted(
                job_id=job.id,
                round=round_number,
                attempt=row.attempt,
                round_state=RoundState(row.state),
                num_submissions=row.num_submissions,
                sha256=digest,
            )

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
