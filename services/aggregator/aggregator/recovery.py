"""Checking a round's published sum against the submissions it was made from.

Every accepted upload is stored chunk by chunk, so a round's sum can be recomputed from them
until a retention period (``FEDHE_AGGREGATOR_UPLOAD_RETENTION_DAYS``) removes them. Operators use
this to check a round after an incident (``GET /v1/jobs/{id}/rounds/{n}/verify``); the fault
tests use it to prove nothing was lost or counted twice.
"""

from __future__ import annotations

from aggregator.publisher import RoundPublisher
from aggregator.repository import AggregatorRepository
from fedhe.db import SessionFactory
from fedhe.errors import NotFound
from fedhe.schemas import RoundState, RoundVerification


def verify_round(sessions: SessionFactory, publisher: RoundPublisher, job_id: str, number: int) -> RoundVerification:
    """Recompute the latest attempt's sum from its submissions and compare it with the stored one."""
    with sessions.transaction() as session:
        repo = AggregatorRepository(session)
        repo.job(job_id)
        row = repo.current_round(job_id, number)
        if row is None:
            raise NotFound(f"job {job_id} has no round {number}")
        submissions = repo.submissions(row.id)
        round_id, published = row.id, row.state == RoundState.PUBLISHED.value
        counters_match = row.num_submissions == len(submissions) and row.total_samples == sum(
            s.num_samples for s in submissions
        )
        stored_sizes = repo.aggregate_chunk_sizes(row.id)
        upload_ids = [s.upload_id for s in submissions]
        pruned = bool(submissions) and repo.uploads_without_chunks(upload_ids) > 0
    sum_matches = False
    if published and submissions and not pruned:
        plan = publisher.plan(job_id, round_id, require_state=RoundState.PUBLISHED)
        sum_matches = plan is not None and len(stored_sizes) == plan.num_chunks
        try:
            for index, data in publisher.sums(plan) if plan is not None and sum_matches else []:
                with sessions.transaction() as session:
                    sum_matches = AggregatorRepository(session).aggregate_chunks(round_id, index, index + 1) == [data]
                if not sum_matches:
                    break
        except NotFound:
            # Only the retention sweep, removing the uploads' chunks while they were summed again,
            # may end this early; anything else missing is the operator's to hear about.
            with sessions.transaction() as session:
                pruned = AggregatorRepository(session).uploads_without_chunks(upload_ids) > 0
            if not pruned:
                raise
            sum_matches = False
    return RoundVerification(
        job_id=job_id,
        number=number,
        submissions=len(submissions),
        counters_match=counters_match,
        sum_matches=sum_matches,
        uploads_pruned=pruned,
    )
