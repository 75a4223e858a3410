"""Storage of sites, jobs, rounds, submissions and audit events behind a small interface."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from aggregator.tables import (
    AdvertisementRow,
    AggregateChunkRow,
    AuditRow,
    DeclineRow,
    EvaluationContextRow,
    EvaluationRow,
    InitialWeightsRow,
    JobRow,
    RoundRow,
    SiteRow,
    SiteStatusRow,
    SubmissionRow,
    UnmaskingAnswerRow,
    UploadChunkRow,
    UploadRow,
)
from fedhe.db import AuditingRepository, utcnow
from fedhe.errors import NotFound
from fedhe.schemas import RoundState, SiteStatus

ONLINE_WITHIN = timedelta(seconds=60)


@dataclass(frozen=True)
class Counts:
    """What the gauges report: sites by status, sites online, jobs by status."""

    sites: dict[str, int]
    sites_online: int
    jobs: dict[str, int]


class AggregatorRepository(AuditingRepository):
    """Reads and writes the aggregator's rows within one session (one transaction)."""

    audit_row = AuditRow

    def __init__(self, session: Session):
        self.session = session

    def add(self, row: object) -> None:
        """Stage a new row."""
        self.session.add(row)

    def flush(self) -> None:
        """Send staged changes (assigns generated ids) without committing."""
        self.session.flush()

    def counts(self) -> Counts:
        """Sites and jobs by status, and sites whose agent sent a heartbeat within ``ONLINE_WITHIN``."""
        sites = dict(self.session.execute(select(SiteRow.status, func.count()).group_by(SiteRow.status)).all())
        jobs = dict(self.session.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        online = self.session.scalar(select(func.count()).where(SiteStatusRow.last_seen_at >= utcnow() - ONLINE_WITHIN))
        return Counts(sites=sites, sites_online=int(online or 0), jobs=jobs)

    def site(self, site_id: str) -> SiteRow:
        """The site, or ``NotFound``."""
        row = self.session.get(SiteRow, site_id)
        if row is None:
            raise NotFound(f"no site {site_id!r}")
        return row

    def site_by_credential(self, credential_sha256: str) -> SiteRow | None:
        """The site holding a credential with this hash."""
        return self.session.scalars(select(SiteRow).where(SiteRow.credential_sha256 == credential_sha256)).first()

    def sites(self) -> list[SiteRow]:
        """All sites, oldest first."""
        return list(self.session.scalars(select(SiteRow).order_by(SiteRow.created_at)))

    def approved_site_keys(self) -> dict[str, str]:
        """Each approved site's public key by site id (asked on every upload: two columns, not rows)."""
        query = select(SiteRow.id, SiteRow.public_key).where(SiteRow.status == SiteStatus.APPROVED.value)
        return {str(site_id): str(key) for site_id, key in self.session.execute(query).all()}

    def evaluation_context(self, key_id: str) -> EvaluationContextRow | None:
        """A cached keyless context."""
        return self.session.get(EvaluationContextRow, key_id)

    def initial_weights(self, sha256: str) -> InitialWeightsRow | None:
        """Stored given round-0 weights, if any."""
        return self.session.get(InitialWeightsRow, sha256)

    def job(self, job_id: str, *, for_update: bool = False) -> JobRow:
        """The job, or ``NotFound``; ``for_update`` locks its row until the transaction ends."""
        query = select(JobRow).where(JobRow.id == job_id)
        if for_update:
            query = query.with_for_update()
        row = self.session.scalars(query).first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    def jobs(self) -> list[JobRow]:
        """All jobs, oldest first."""
        return list(self.session.scalars(select(JobRow).order_by(JobRow.created_at)))

    def current_round(self, job_id: str, number: int) -> RoundRow | None:
        """The latest attempt of round ``number``."""
        query = (
            select(RoundRow)
            .where(RoundRow.job_id == job_id, RoundRow.number == number)
            .order_by(RoundRow.attempt.desc())
        )
        return self.session.scalars(query).first()

    def round_attempt(self, job_id: str, number: int, attempt: int) -> RoundRow | None:
        """One attempt of round ``number``."""
        query = select(RoundRow).where(
            RoundRow.job_id == job_id, RoundRow.number == number, RoundRow.attempt == attempt
        )
        return self.session.scalars(query).first()

    def rounds(self, job_id: str) -> list[RoundRow]:
        """Every attempt of every round of a job, in order."""
        query = select(RoundRow).where(RoundRow.job_id == job_id).order_by(RoundRow.number, RoundRow.attempt)
        return list(self.session.scalars(query))

    def overdue_job_ids(self, now: Any) -> list[str]:
        """Jobs with a round still waiting for sites past its phase's deadline."""
        accepting = (RoundState.OPEN.value, RoundState.COLLECTING.value, RoundState.UNMASKING.value)
        query = select(RoundRow.job_id).where(RoundRow.state.in_(accepting), RoundRow.deadline_at <= now).distinct()
        return list(self.session.scalars(query))

    def submission(self, round_id: int, site_id: str) -> SubmissionRow | None:
        """A site's accepted upload in a round."""
        query = select(SubmissionRow).where(SubmissionRow.round_id == round_id, SubmissionRow.site_id == site_id)
        return self.session.scalars(query).first()

    def submissions(self, round_id: int) -> list[SubmissionRow]:
        """A round's accepted uploads, in arrival order."""
        query = select(SubmissionRow).where(SubmissionRow.round_id == round_id).order_by(SubmissionRow.id)
        return list(self.session.scalars(query))

    def decline(self, round_id: int, site_id: str) -> DeclineRow | None:
        """A site's decline of a round."""
        query = select(DeclineRow).where(DeclineRow.round_id == round_id, DeclineRow.site_id == site_id)
        return self.session.scalars(query).first()

    def declines(self, round_id: int) -> list[DeclineRow]:
        """A round's declines, in arrival order."""
        query = select(DeclineRow).where(DeclineRow.round_id == round_id).order_by(DeclineRow.id)
        return list(self.session.scalars(query))

    def advertisement(self, round_id: int, site_id: str) -> AdvertisementRow | None:
        """A site's advertised key in a round attempt."""
        return self.session.get(AdvertisementRow, (round_id, site_id))

    def advertisements(self, round_id: int) -> list[AdvertisementRow]:
        """Every key advertised in a round attempt."""
        return list(self.session.scalars(select(AdvertisementRow).where(AdvertisementRow.round_id == round_id)))

    def count_advertisements(self, round_id: int) -> int:
        """How many sites advertised a key in a round attempt."""
        query = select(func.count()).where(AdvertisementRow.round_id == round_id)
        return int(self.session.scalar(query) or 0)

    def unmasking_answer(self, round_id: int, site_id: str) -> UnmaskingAnswerRow | None:
        """A roster member's unmasking answer."""
        return self.session.get(UnmaskingAnswerRow, (round_id, site_id))

    def unmasking_answers(self, round_id: int) -> list[UnmaskingAnswerRow]:
        """Every unmasking answer of a round attempt."""
        return list(self.session.scalars(select(UnmaskingAnswerRow).where(UnmaskingAnswerRow.round_id == round_id)))

    def site_status(self, site_id: str) -> SiteStatusRow | None:
        """The last heartbeat of a site."""
        return self.session.get(SiteStatusRow, site_id)

    def site_statuses(self) -> dict[str, SiteStatusRow]:
        """The last heartbeat of every site that sent one."""
        return {row.site_id: row for row in self.session.scalars(select(SiteStatusRow))}

    def round_by_id(self, round_id: int) -> RoundRow | None:
        """A round attempt by its row id."""
        return self.session.get(RoundRow, round_id)

    def rounds_in_state(self, state: RoundState) -> list[tuple[str, int]]:
        """(job id, round id) of every round attempt in ``state``."""
        query = select(RoundRow.job_id, RoundRow.id).where(RoundRow.state == state.value).order_by(RoundRow.id)
        return [(job, round_id) for job, round_id in self.session.execute(query).all()]

    def add_upload_chunks(self, upload_id: str, chunks: list[tuple[int, bytes]]) -> None:
        """Store chunks of an upload as they arrive."""
        self.session.execute(
            insert(UploadChunkRow), [{"upload_id": upload_id, "index": index, "data": data} for index, data in chunks]
        )

    def delete_upload(self, upload_id: str) -> None:
        """Remove an upload that will never count, with its chunks."""
        self.session.execute(delete(UploadChunkRow).where(UploadChunkRow.upload_id == upload_id))
        self.session.execute(delete(UploadRow).where(UploadRow.id == upload_id))

    def expired_uploads(self, finished_before: datetime, limit: int) -> list[tuple[str, int, int, str]]:
        """(job id, round number, attempt, upload id) of counted uploads that still hold chunks,
        of rounds published or failed before ``finished_before`` (never a round still to be summed)."""
        has_chunks = select(UploadChunkRow.upload_id).where(UploadChunkRow.upload_id == SubmissionRow.upload_id)
        query = (
            select(RoundRow.job_id, RoundRow.number, RoundRow.attempt, SubmissionRow.upload_id)
            .join(RoundRow, RoundRow.id == SubmissionRow.round_id)
            .where(
                RoundRow.state.in_([RoundState.PUBLISHED.value, RoundState.FAILED.value]),
                RoundRow.closed_at < finished_before,
                has_chunks.exists(),
            )
            .order_by(RoundRow.id, SubmissionRow.id)
            .limit(limit)
        )
        return [(job, number, attempt, upload) for job, number, attempt, upload in self.session.execute(query).all()]

    def delete_upload_chunks(self, upload_ids: list[str]) -> None:
        """Remove the ciphertext of counted uploads; their submission rows (sizes, hashes) stay."""
        self.session.execute(delete(UploadChunkRow).where(UploadChunkRow.upload_id.in_(upload_ids)))

    def uploads_without_chunks(self, upload_ids: list[str]) -> int:
        """How many of ``upload_ids`` hold no chunk any more."""
        with_chunks = select(func.count(func.distinct(UploadChunkRow.upload_id))).where(
            UploadChunkRow.upload_id.in_(upload_ids)
        )
        return len(upload_ids) - int(self.session.scalar(with_chunks) or 0)

    def orphan_uploads(self, older_than: datetime) -> list[str]:
        """Uploads no submission refers to, started before ``older_than`` (cut off or refused)."""
        referenced = select(SubmissionRow.upload_id)
        query = select(UploadRow.id).where(UploadRow.created_at < older_than, UploadRow.id.not_in(referenced))
        return list(self.session.scalars(query))

    def upload_chunk_column(self, upload_ids: list[str], index: int) -> list[bytes]:
        """The ``index``-th chunk of each upload, in the order of ``upload_ids`` (``NotFound`` if
        one is not stored)."""
        rows = self._binary_rows(
            'SELECT upload_id, data FROM upload_chunks WHERE upload_id = ANY(%s) AND "index" = %s',
            (upload_ids, index),
        )
        if rows is None:
            query = select(UploadChunkRow.upload_id, UploadChunkRow.data).where(
                UploadChunkRow.upload_id.in_(upload_ids), UploadChunkRow.index == index
            )
            rows = [tuple(row) for row in self.session.execute(query).all()]
        found = {upload_id: bytes(data) for upload_id, data in rows}
        missing = [upload_id for upload_id in upload_ids if upload_id not in found]
        if missing:
            raise NotFound(f"chunk {index} of {len(missing)} uploads is not stored (removed by the retention period?)")
        return [found[upload_id] for upload_id in upload_ids]

    def _binary_rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        """On Postgres, the rows of ``sql`` fetched in binary format, in the session's transaction;
        ``None`` elsewhere (SQLite: run the portable query).

        Through SQLAlchemy, psycopg fetches results as text, and a bytea arrives hex-encoded: Postgres
        writes two characters per byte and this process decodes them. Ciphertext chunks are read
        in bulk (every upload's chunk at the close, the sum's chunks for each model download), so
        they are fetched as raw bytes instead.
        """
        connection = self.session.connection()
        if connection.dialect.name != "postgresql":
            return None
        self.session.flush()  # the raw query must see what this session added
        driver = connection.connection.driver_connection
        with driver.cursor(binary=True) as cursor:  # type: ignore[union-attr]
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def put_aggregate_chunk(self, round_id: int, index: int, data: bytes) -> None:
        """Store (or replace, when a sum is redone) one chunk of a round's sum."""
        self.session.execute(
            delete(AggregateChunkRow).where(AggregateChunkRow.round_id == round_id, AggregateChunkRow.index == index)
        )
        self.session.add(AggregateChunkRow(round_id=round_id, index=index, data=data))

    def aggregate_chunk_sizes(self, round_id: int) -> list[int]:
        """The sizes of a round's summed chunks, in order."""
        query = (
            select(func.length(AggregateChunkRow.data))
            .where(AggregateChunkRow.round_id == round_id)
            .order_by(AggregateChunkRow.index)
        )
        return [int(size) for size in self.session.scalars(query)]

    def aggregate_chunks(self, round_id: int, start: int, stop: int) -> list[bytes]:
        """Chunks ``start`` to ``stop - 1`` of a round's sum, in order (``NotFound`` if one is missing)."""
        rows = self._binary_rows(
            'SELECT data FROM aggregate_chunks WHERE round_id = %s AND "index" >= %s AND "index" < %s ORDER BY "index"',
            (round_id, start, stop),
        )
        if rows is None:
            query = (
                select(AggregateChunkRow.data)
                .where(
                    AggregateChunkRow.round_id == round_id,
                    AggregateChunkRow.index >= start,
                    AggregateChunkRow.index < stop,
                )
                .order_by(AggregateChunkRow.index)
            )
            rows = [(data,) for data in self.session.scalars(query)]
        if len(rows) != stop - start:
            raise NotFound(f"chunks {start}-{stop - 1} of round {round_id} are not all stored")
        return [bytes(row[0]) for row in rows]

    def evaluation(self, round_id: int, site_id: str) -> EvaluationRow | None:
        """A site's evaluation of a round's model."""
        query = select(EvaluationRow).where(EvaluationRow.round_id == round_id, EvaluationRow.site_id == site_id)
        return self.session.scalars(query).first()

    def evaluations(self, round_id: int) -> list[EvaluationRow]:
        """All evaluations of a round's model."""
        query = select(EvaluationRow).where(EvaluationRow.round_id == round_id).order_by(EvaluationRow.id)
        return list(self.session.scalars(query))
