"""Publishing a closed round: its stored uploads summed chunk index by chunk index (ADR 0007).

Memory holds the chunks of one index (one per upload) per worker, never a whole update or the
whole sum. Indices are summed by a pool of processes (SEAL holds the GIL), started with the
service (``start``) and fed a bounded number at a time; each chunk is read once here, by SEAL,
which must expand its seed (ADR 0011). The sum's chunks are written as they are made; the round
is published, and the next one opened, in one short transaction under the job's lock once all
of them are stored.

Exactly one process sums a round at a time: on Postgres it holds a session advisory lock, which
the database releases if the process dies, so another replica can take over; the deadline
watcher picks up rounds left closed by a crash. A sum that is interrupted is simply redone: it
is a pure function of the stored submissions.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from sqlalchemy import text

from aggregator.contexts import EvaluationContexts
from aggregator.jobs import JobCoordinator, round_encoding
from aggregator.repository import AggregatorRepository
from fedhe.db import SessionFactory
from fedhe.he import PackingSettings, UpdateCodec, codec_for, load_evaluation_context
from fedhe.schemas import RoundState

logger = logging.getLogger(__name__)

# Keyed by the evaluation context's bytes themselves (under 100 bytes for BFV, 1 KiB for CKKS),
# so two federations' codecs can never be confused.
_WORKER_CODECS: dict[tuple[str, bytes, str], UpdateCodec] = {}


def _sum_in_worker(format_id: str, context: bytes, options: str, index: int, chunks: list[bytes]) -> bytes:
    key = (format_id, context, options)
    codec = _WORKER_CODECS.get(key)
    if codec is None:
        settings = PackingSettings.model_validate_json(options) if options else None
        codec = codec_for(format_id, load_evaluation_context(context), options=settings)
        _WORKER_CODECS[key] = codec
    return codec.sum_chunk(index, chunks)


def _started() -> None:
    """Run once in each summing process as the service starts: importing this module (and
    with it SEAL) is the start-up a round's close must not wait for."""


@dataclass(frozen=True)
class SumPlan:
    """What summing one round needs."""

    job_id: str
    round_id: int
    upload_ids: list[str]
    num_chunks: int
    key_id: str
    format_id: str
    packing: PackingSettings | None


class RoundPublisher:
    """Sums closed rounds and publishes them."""

    def __init__(self, sessions: SessionFactory, contexts: EvaluationContexts, jobs: JobCoordinator, workers: int):
        self._sessions = sessions
        self._contexts = contexts
        self._jobs = jobs
        self._workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._local = threading.Lock()
        self._summing: set[int] = set()

    def start(self) -> None:
        """Start the summing processes now, with the service, so the upload that closes the
        first round does not wait for them (each process is spawned by a submission finding
        none idle)."""
        if self._workers == 1:
            return
        pool = self._worker_pool()
        for _ in range(self._workers):
            pool.submit(_started)

    def _worker_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Stop the summing processes."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def publish_closed(self) -> int:
        """Sum and publish every closed round; returns how many this call published."""
        with self._sessions.transaction() as session:
            closed = AggregatorRepository(session).rounds_in_state(RoundState.CLOSED)
        return sum(1 for job, round_id in closed if self.publish(job, round_id))

    def publish(self, job_id: str, round_id: int) -> bool:
        """Sum round ``round_id`` and publish it, unless another process is doing so."""
        with self._exclusive(round_id) as mine:
            if not mine:
                return False
            plan = self.plan(job_id, round_id)
            if plan is None:
                return False
            self._sum_and_store(plan)
            return self._jobs.publish_round(job_id, round_id)

    @contextlib.contextmanager
    def _exclusive(self, round_id: int) -> Iterator[bool]:
        with self._local:
            if round_id in self._summing:
                yield False
                return
            self._summing.add(round_id)
        try:
            if self._sessions.is_sqlite:
                yield True  # one process in embedded mode: the set above is the lock
                return
            with self._sessions.engine.connect() as connection:
                key = zlib.crc32(f"fedhe-publish-{round_id}".encode())
                if not connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                    yield False
                    return
                try:
                    yield True
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            with self._local:
                self._summing.discard(round_id)

    def plan(self, job_id: str, round_id: int, require_state: RoundState = RoundState.CLOSED) -> SumPlan | None:
        """What summing round ``round_id`` takes, if it is in ``require_state``."""
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            job = repo.job(job_id)
            row = repo.round_by_id(round_id)
            if row is None or row.state != require_state.value:
                return None
            encoding = round_encoding(job, row.number)
            upload_ids = [s.upload_id for s in repo.submissions(round_id)]
            codec = self._contexts.codec(encoding.key_id, encoding.format_id, encoding.packing)
            return SumPlan(
                job_id=job_id,
                round_id=round_id,
                upload_ids=upload_ids,
                num_chunks=codec.num_chunks(encoding.num_values),
                key_id=job.key_id,
                format_id=encoding.format_id,
                packing=encoding.packing,
            )

    def sums(self, plan: SumPlan) -> Iterator[tuple[int, bytes]]:
        """The summed chunks of a round, index by index, in order."""
        if self._workers == 1:
            codec = self._contexts.codec(plan.key_id, plan.format_id, plan.packing)
            for index in range(plan.num_chunks):
                yield index, codec.sum_chunk(index, self._column(plan.upload_ids, index))
            return
        pool = self._worker_pool()
        context = self._contexts.context_bytes(plan.key_id)
        options = plan.packing.model_dump_json() if plan.packing is not None else ""
        pending: deque[tuple[int, Future[bytes]]] = deque()
        for index in range(plan.num_chunks):
            chunks = list(self._column(plan.upload_ids, index))
            pending.append((index, pool.submit(_sum_in_worker, plan.format_id, context, options, index, chunks)))
            if len(pending) >= 2 * self._workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    def _column(self, upload_ids: list[str], index: int) -> Iterator[bytes]:
        with self._sessions.transaction() as session:
            yield from AggregatorRepository(session).upload_chunk_column(upload_ids, index)

    def _sum_and_store(self, plan: SumPlan) -> None:
        for index, data in self.sums(plan):
            with self._sessions.transaction() as session:
                AggregatorRepository(session).put_aggregate_chunk(plan.round_id, index, data)
