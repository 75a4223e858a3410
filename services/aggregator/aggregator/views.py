"""Conversions from stored rows to the public wire schemas."""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.repository import ONLINE_WITHIN, AggregatorRepository
from aggregator.rounds import round_duration_s
from aggregator.site_metrics import combine_metrics
from aggregator.tables import EvaluationRow, JobRow, RoundRow, SiteRow, SiteStatusRow, SubmissionRow
from fedhe.db import utcnow
from fedhe.schemas import (
    AgentState,
    DeclinePublic,
    DeclineReason,
    Environment,
    EvaluationPublic,
    JobCreate,
    JobPublic,
    JobStatus,
    PrivacyReport,
    RoundPublic,
    RoundState,
    SitePublic,
    SiteStatus,
    SiteStatusReport,
    SubmissionPublic,
)


def site_status(row: SiteStatusRow) -> SiteStatusReport:
    """A site's last heartbeat; online if it came within ``ONLINE_WITHIN``."""
    return SiteStatusReport(
        state=AgentState(row.state),
        online=utcnow() - row.last_seen_at <= ONLINE_WITHIN,
        last_seen_at=row.last_seen_at,
        job_id=row.job_id,
        round=row.round,
        message=row.message,
        environment=Environment.model_validate(row.environment),
        privacy=PrivacyReport.model_validate(row.privacy) if row.privacy else None,
        data_size=row.data_size,
    )


def site_public(row: SiteRow, status: SiteStatusRow | None = None) -> SitePublic:
    """A site as operators see it, with its agent's last heartbeat."""
    return SitePublic(
        id=row.id,
        name=row.name,
        organisation=row.organisation,
        contact=row.contact,
        public_key=row.public_key,
        status=SiteStatus(row.status),
        created_at=row.created_at,
        decided_at=row.decided_at,
        agent=site_status(status) if status is not None else None,
    )


def job_public(row: JobRow) -> JobPublic:
    """A job with its progress."""
    return JobPublic.model_validate(
        {
            **row.spec,
            "id": row.id,
            "federation_id": row.federation_id,
            "environment": row.environment,
            "status": JobStatus(row.status),
            "current_round": row.current_round,
            "created_at": row.created_at,
            "finished_at": row.finished_at,
            "num_parameters": row.num_parameters,
            "privacy_plan": row.privacy_plan,
            "largest_site_plan": row.largest_site_plan,
            "warnings": row.warnings or [],
            "upload_cost": row.upload_cost,
        }
    )


def global_metrics(evaluations: list[EvaluationRow], min_sites: int) -> dict[str, float] | None:
    """The sites' evaluations combined (sample-weighted), once at least ``min_sites`` sites evaluated."""
    if len(evaluations) < min_sites:
        return None
    return combine_metrics((e.metrics, e.num_examples) for e in evaluations)


def round_bytes_uploaded(submissions: Sequence[SubmissionRow]) -> int:
    """The encrypted bytes of an attempt's accepted uploads, as stored with each submission.

    Served with the round (``bytes_uploaded``) so the CLI, the demo and the dashboard show one figure.
    """
    return sum(s.num_bytes for s in submissions)


def round_public(
    repo: AggregatorRepository, spec: JobCreate, row: RoundRow, *, include_submissions: bool, caller_site: str | None
) -> RoundPublic:
    """A round attempt; other sites' submissions, evaluations and the sampled sites only for operators."""
    submissions = repo.submissions(row.id)
    evaluations = repo.evaluations(row.id)
    roster = None if row.roster is None else [member["site_id"] for member in row.roster]
    return RoundPublic(
        job_id=row.job_id,
        number=row.number,
        attempt=row.attempt,
        state=RoundState(row.state),
        opened_at=row.opened_at,
        deadline_at=row.deadline_at,
        closed_at=row.closed_at,
        published_at=row.published_at,
        failure_reason=row.failure_reason,
        num_submissions=row.num_submissions,
        total_samples=row.total_samples,
        submissions=[
            SubmissionPublic(
                site_id=s.site_id,
                num_samples=s.num_samples,
                num_bytes=s.num_bytes,
                sha256=s.sha256,
                metrics=s.metrics,
                received_at=s.received_at,
            )
            for s in submissions
        ]
        if include_submissions
        else [],
        evaluations=[
            EvaluationPublic(
                site_id=e.site_id, num_examples=e.num_examples, metrics=e.metrics, received_at=e.received_at
            )
            for e in evaluations
            if include_submissions or e.site_id == caller_site
        ],
        declines=[
            DeclinePublic(site_id=d.site_id, reason=DeclineReason(d.reason), message=d.message, at=d.at)
            for d in repo.declines(row.id)
        ]
        if include_submissions
        else [],
        submitted_by_caller=None if caller_site is None else any(s.site_id == caller_site for s in submissions),
        kind="statistics" if spec.is_statistics_round(row.number) else "training",
        selected_sites=row.selected_sites if include_submissions else None,
        caller_selected=None
        if caller_site is None
        else row.selected_sites is None or caller_site in row.selected_sites,
        secure=spec.secure_aggregation is not None,
        num_advertised=repo.count_advertisements(row.id),
        roster=roster,
        advertised=sorted(a.site_id for a in repo.advertisements(row.id)) if include_submissions else [],
        answered=sorted(a.site_id for a in repo.unmasking_answers(row.id)) if include_submissions else [],
        advertised_by_caller=None if caller_site is None else repo.advertisement(row.id, caller_site) is not None,
        answered_by_caller=None if caller_site is None else repo.unmasking_answer(row.id, caller_site) is not None,
        # A site that knew the weighted mean could back out another site's metrics from its own.
        global_metrics=global_metrics(evaluations, spec.min_eval_sites) if include_submissions else None,
        duration_s=round_duration_s(row),
        bytes_uploaded=round_bytes_uploaded(submissions),
    )
