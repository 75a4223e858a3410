"""A round's figures are computed once, by the aggregator, from what it stored.

``bytes_uploaded`` is the sum of the stored submissions' byte counts and ``duration_s`` the time
from opening to publication (to closing, for a failed attempt; none while the attempt runs). The
CLI (tests/unit/test_cli_operator.py, tests/unit/test_cli_watch.py), the demo and the dashboard
(tests/browser/test_dashboard.py) show these served fields and compute neither again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from aggregator.repository import AggregatorRepository
from aggregator.rounds import round_duration_s
from aggregator.tables import AggregatorBase, EvaluationContextRow, JobRow, RoundRow, SiteRow, SubmissionRow, UploadRow
from aggregator.views import round_public
from fedhe.schemas import RoundState
from fedhe_demo.demo import _round_row
from tests.factories import plain_job_create

OPENED = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
SPEC = plain_job_create("key-" + "ab" * 16, name="figures", rounds=3, min_sites=1)
UPLOAD_BYTES = {"site-000000000000000a": 1_398_112, "site-000000000000000b": 1_398_240, "site-000000000000000c": 977}


@pytest.fixture
def repo() -> Iterator[AggregatorRepository]:
    engine = create_engine("sqlite://")
    AggregatorBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(EvaluationContextRow(key_id=SPEC.key_id, federation_id="fed-0123456789abcdef", context=b""))
        session.add(
            JobRow(
                id="job-0123456789abcdef",
                name=SPEC.name,
                key_id=SPEC.key_id,
                federation_id="fed-0123456789abcdef",
                spec=SPEC.model_dump(mode="json"),
                status="running",
                num_parameters=10,
            )
        )
        for site_id in UPLOAD_BYTES:
            session.add(
                SiteRow(id=site_id, name=site_id, organisation="o", contact="c", public_key="k", status="approved")
            )
        session.flush()
        yield AggregatorRepository(session)
    engine.dispose()


def _round(
    repo: AggregatorRepository, number: int, state: RoundState, uploads: dict[str, int], **times: datetime
) -> RoundRow:
    row = RoundRow(
        job_id="job-0123456789abcdef",
        number=number,
        attempt=1,
        state=state.value,
        opened_at=OPENED,
        deadline_at=OPENED + timedelta(minutes=5),
        num_submissions=len(uploads),
        total_samples=40 * len(uploads),
        **times,
    )
    repo.add(row)
    repo.flush()
    for index, (site_id, num_bytes) in enumerate(uploads.items()):
        upload_id = f"up{number}{index}"
        repo.add(UploadRow(id=upload_id, round_id=row.id, site_id=site_id, num_chunks=1))
        repo.add(
            SubmissionRow(
                round_id=row.id,
                site_id=site_id,
                upload_id=upload_id,
                num_samples=40,
                num_bytes=num_bytes,
                sha256="ab" * 32,
                metrics={},
            )
        )
    repo.flush()
    return row


@pytest.mark.parametrize("operator", [True, False])
def test_a_published_round_serves_its_stored_bytes_and_its_open_to_publish_time(
    repo: AggregatorRepository, operator: bool
) -> None:
    published_at = OPENED + timedelta(seconds=73, milliseconds=250)
    row = _round(
        repo, 0, RoundState.PUBLISHED, UPLOAD_BYTES, closed_at=OPENED + timedelta(seconds=70), published_at=published_at
    )
    served = round_public(
        repo, SPEC, row, include_submissions=operator, caller_site=None if operator else "site-000000000000000a"
    )
    stored = sum(s.num_bytes for s in repo.submissions(row.id))
    assert stored == sum(UPLOAD_BYTES.values())
    assert served.bytes_uploaded == stored
    assert served.duration_s == (published_at - OPENED).total_seconds() == 73.25
    if operator:
        assert sum(s.num_bytes for s in served.submissions) == served.bytes_uploaded
    else:
        assert served.submissions == [], "a site sees the total, not the other sites' uploads"


def test_a_failed_attempt_lasts_until_it_closed_and_a_running_one_has_no_duration_yet(
    repo: AggregatorRepository,
) -> None:
    closed_at = OPENED + timedelta(minutes=5)
    failed = _round(repo, 0, RoundState.FAILED, {"site-000000000000000a": 977}, closed_at=closed_at)
    collecting = _round(repo, 1, RoundState.COLLECTING, {"site-000000000000000b": 1_398_240})
    closed = _round(repo, 2, RoundState.CLOSED, {}, closed_at=closed_at)
    figures = [
        (r.bytes_uploaded, r.duration_s)
        for r in (
            round_public(repo, SPEC, row, include_submissions=True, caller_site=None)
            for row in (failed, collecting, closed)
        )
    ]
    assert figures == [(977, 300.0), (1_398_240, None), (0, None)]
    assert round_duration_s(failed) == 300.0


def test_the_demo_reports_the_served_figures(repo: AggregatorRepository) -> None:
    published_at = OPENED + timedelta(seconds=12, microseconds=500_000)
    row = _round(repo, 0, RoundState.PUBLISHED, UPLOAD_BYTES, closed_at=published_at, published_at=published_at)
    served = round_public(repo, SPEC, row, include_submissions=True, caller_site=None)
    reported = _round_row(served)
    assert (reported["bytes_uploaded"], reported["round_seconds"]) == (sum(UPLOAD_BYTES.values()), 12.5)
    # What the aggregator serves is what the demo reports, whatever the submissions listed.
    shown = _round_row(served.model_copy(update={"submissions": [], "bytes_uploaded": 7, "duration_s": 1.5}))
    assert (shown["bytes_uploaded"], shown["round_seconds"]) == (7, 1.5)
