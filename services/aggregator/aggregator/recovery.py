"""Recomputing a round's running sum from its stored submissions.

The running sum kept on the round row is a cache: every accepted upload is stored whole, so the
sum can always be rebuilt from them. Operators use this to check a round after an incident
(``GET /v1/jobs/{id}/rounds/{n}/verify``); the fault tests use it to prove nothing was lost or
counted twice.
"""

from __future__ import annotations

from aggregator.contexts import EvaluationContexts
from aggregator.jobs import job_spec
from aggregator.repository import AggregatorRepository
from fedhe.db import SessionFactory
from fedhe.errors import NotFound
from fedhe.he.envelope import decode_envelope
from fedhe.schemas import RoundVerification


def verify_round(sessions: SessionFactory, contexts: EvaluationContexts, job_id: str, number: int) -> RoundVerification:
    """Rebuild the latest attempt's sum from its submissions and compare it with the stored one."""
    with sessions.transaction() as session:
        repo = AggregatorRepository(session)
        job = repo.job(job_id)
        row = repo.current_round(job_id, number)
        if row is None:
            raise NotFound(f"job {job_id} has no round {number}")
        submissions = repo.submissions(row.id)
        stored = decode_envelope(row.running_sum).chunks if row.running_sum is not None else None
        spec = job_spec(job)
        num_parameters = job.num_parameters
        key_id = job.key_id
        total_samples, num_submissions = row.total_samples, row.num_submissions
    recomputed = None
    if submissions:
        accumulator = contexts.codec(key_id, spec.format_id).accumulator(num_parameters)
        for submission in submissions:
            accumulator.add(decode_envelope(submission.envelope).chunks)
        recomputed = accumulator.to_chunks()
    return RoundVerification(
        job_id=job_id,
        number=number,
        submissions=len(submissions),
        counters_match=num_submissions == len(submissions) and total_samples == sum(s.num_samples for s in submissions),
        sum_matches=recomputed == stored,
    )
