"""Background upkeep on the replica holding the lease: deadlines, closed rounds, stray uploads.

Deadlines live in the database, so whichever replica holds the lease sees every one of them;
if the holder dies its lease expires and another replica takes over within ``lease_ttl``. If
Redis is unreachable every replica does the upkeep (the job row lock and the summing lock keep
that safe) rather than letting deadlines slip. Each tick:

1. finishes every round past its deadline (closes it, or fails it below ``min_sites``);
2. sums and publishes every closed round not yet published (rounds closed by a replica that
   died before publishing, and rounds the deadline just closed);
3. removes uploads that never counted (cut off mid-stream, or refused) once they are old;
4. with a retention period, removes the ciphertext of counted uploads whose round was published
   or failed longer ago than that (a batch per tick, audited per round). The submission rows
   (site, samples, size, hash) and the published sums stay: sites replaying the job's rounds
   still download every aggregate, and ``job verify`` reports the round's uploads as pruned.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

from aggregator.coordination import Coordination, CoordinationUnavailable
from aggregator.jobs import JobCoordinator
from aggregator.publisher import RoundPublisher
from aggregator.repository import AggregatorRepository
from fedhe.db import utcnow

logger = logging.getLogger(__name__)

# Uploads whose ciphertext one tick removes at most: a short transaction, the rest next tick.
_PRUNE_BATCH = 200


class RoundWatcher:
    """Runs the upkeep every ``interval_s`` on whichever replica holds the lease."""

    def __init__(
        self,
        jobs: JobCoordinator,
        publisher: RoundPublisher,
        coordination: Coordination,
        interval_s: float,
        orphan_after_s: float,
        retention_days: float | None = None,
    ):
        self._jobs = jobs
        self._publisher = publisher
        self._coordination = coordination
        self._interval_s = interval_s
        self._orphan_after = timedelta(seconds=orphan_after_s)
        self._retention = timedelta(days=retention_days) if retention_days is not None else None
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease_ttl_s = max(5.0, 5 * interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedhe-rounds", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                fence = self._coordination.hold_lease("deadline-watcher", self._holder, self._lease_ttl_s)
                if fence is None:
                    continue
            except CoordinationUnavailable:
                fence = None
            try:
                self.tick(fence)
            except Exception:  # a transient database error must not kill the watcher
                logger.exception("round upkeep failed; retrying")

    def tick(self, fence: int | None = None) -> None:
        """One round of upkeep (see the module docstring)."""
        self._jobs.expire_overdue_rounds(fence=fence)
        self._publisher.publish_closed()
        with self._jobs.sessions.transaction() as session:
            repo = AggregatorRepository(session)
            for upload_id in repo.orphan_uploads(utcnow() - self._orphan_after):
                repo.delete_upload(upload_id)
            if self._retention is not None:
                self._prune_uploads(repo, finished_before=utcnow() - self._retention)

    @staticmethod
    def _prune_uploads(repo: AggregatorRepository, finished_before: datetime) -> None:
        by_round: dict[tuple[str, int, int], list[str]] = defaultdict(list)
        for job_id, number, attempt, upload_id in repo.expired_uploads(finished_before, _PRUNE_BATCH):
            by_round[(job_id, number, attempt)].append(upload_id)
        for (job_id, number, attempt), upload_ids in by_round.items():
            repo.delete_upload_chunks(upload_ids)
            detail = {"round": number, "attempt": attempt, "uploads": len(upload_ids)}
            repo.audit(actor="aggregator", action="uploads.prune", subject=job_id, detail=detail)
