"""The aggregator's cores through its FastAPI app, in process, on SQLite, behind a fake keyserver.

Sites register and are approved, a job is created, sites upload to its round and the round
closes and publishes (``JobCoordinator``, ``UpdateIntake``, ``RoundPublisher`` through their real
routes); a bad upload is refused and leaves the round exactly as it was. The same flows run
against the real services and Postgres in tests/integration (test_federation, test_bad_uploads);
these take seconds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from aggregator.publisher import RoundPublisher, SumPlan
from aggregator.recovery import verify_round
from aggregator.repository import AggregatorRepository
from fedhe.db import SessionFactory
from fedhe.environment import current as current_environment
from fedhe.errors import Conflict, NotFound, PermissionDenied
from fedhe.he import (
    PACKED_FORMAT_ID,
    BfvParameters,
    Envelope,
    KeyMaterial,
    PackingSettings,
    UpdateCodec,
    codec_for,
    create_key_material,
    decode_envelope,
    encode_envelope,
    load_secret_context,
)
from fedhe.he.codec import PLAINTEXT_FORMAT_ID
from fedhe.he.plaintext import SWITCH
from fedhe.schemas import DEFAULT_CLIP_RANGE, JobStatus, RoundState, SiteStatus
from tests.factories import plain_job_create, site_identity
from tests.unit.service_fakes import KEY_ID, InProcessAggregator, Site, aggregator_app, raw_upload

NUM_VALUES = 6  # the factories' model: 2 features x 2 classes + 2 biases


@pytest.fixture(scope="module")
def bfv_material() -> KeyMaterial:
    """One BFV context (the packed codec's; the default parameters, about a second to make)."""
    return create_key_material(BfvParameters())


@pytest.fixture
def plaintext_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH, "benchmark-only")


@pytest.fixture
def aggregator(tmp_path: Path, bfv_material: KeyMaterial) -> Iterator[InProcessAggregator]:
    with aggregator_app(tmp_path, bfv_material) as running:
        yield running


def envelope(
    chunks: list[bytes], *, num_samples: object = 50, format_id: str = PLAINTEXT_FORMAT_ID, **over: Any
) -> bytes:
    fields: dict[str, Any] = {
        "format_id": format_id,
        "key_id": KEY_ID,
        "num_values": NUM_VALUES,
        "chunks": chunks,
        "meta": {
            "num_samples": num_samples,
            "metrics": {"loss": 0.5},
            "environment": current_environment().model_dump(),
        },
    }
    return encode_envelope(Envelope(**(fields | over)))


def plain(values: list[float]) -> list[bytes]:
    return [np.asarray(values, dtype="<f8").tobytes()]


def round_snapshot(aggregator: InProcessAggregator, job_id: str, number: int) -> dict[str, Any]:
    """Everything an upload could change about a round, read straight from the SQLite file."""
    engine = create_engine(aggregator.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT id, state, attempt, num_submissions, total_samples FROM rounds "
                    "WHERE job_id = :job AND number = :n ORDER BY attempt DESC LIMIT 1"
                ),
                {"job": job_id, "n": number},
            ).one()
            submissions = conn.execute(
                text("SELECT site_id, sha256, upload_id FROM submissions WHERE round_id = :r ORDER BY id"),
                {"r": row.id},
            ).all()
            chunks = conn.execute(
                text(
                    'SELECT c.upload_id, c."index", c.data FROM upload_chunks c JOIN submissions s '
                    'ON s.upload_id = c.upload_id WHERE s.round_id = :r ORDER BY c.upload_id, c."index"'
                ),
                {"r": row.id},
            ).all()
            job = conn.execute(text("SELECT status, current_round FROM jobs WHERE id = :j"), {"j": job_id}).one()
    finally:
        engine.dispose()
    digest = hashlib.sha256(b"".join(c.upload_id.encode() + bytes(c.data) for c in chunks)).hexdigest()
    return {
        "round": (row.state, row.attempt, row.num_submissions, row.total_samples),
        "submissions": [tuple(s) for s in submissions],
        "chunks_sha256": digest,
        "job": tuple(job),
    }


def test_a_site_registers_is_approved_and_only_then_may_upload(aggregator: InProcessAggregator) -> None:
    with aggregator.client() as anonymous:
        registered = anonymous.register_site(site_identity("pending").site_create())
    assert registered.status == SiteStatus.PENDING
    assert [s.id for s in aggregator.admin.sites()] == [registered.id]

    site = aggregator.register_and_approve("hospital-a")
    assert aggregator.admin.site(site.site_id).status == SiteStatus.APPROVED
    assert site.client.whoami().site_id == site.site_id
    revoked = aggregator.admin.revoke_site(site.site_id)
    assert revoked.status == SiteStatus.REVOKED
    with pytest.raises(PermissionDenied):
        site.client.jobs()


def test_a_job_is_created_on_the_federation_key_and_opens_round_zero(aggregator: InProcessAggregator) -> None:
    job = aggregator.admin.create_job(plain_job_create(KEY_ID, name="first", rounds=2))
    assert (job.name, job.status, job.current_round, job.rounds) == ("first", JobStatus.RUNNING, 0, 2)
    assert job.format_id == PACKED_FORMAT_ID  # the federation's BFV context takes the packed codec
    assert [j.id for j in aggregator.admin.jobs()] == [job.id]
    first = aggregator.admin.round(job.id, 0)
    assert (first.state, first.attempt, first.num_submissions) == (RoundState.OPEN, 1, 0)
    assert aggregator.keyserver.calls == [f"evaluation_context {KEY_ID}"]  # fetched once, then stored
    # The job names what each site's update will cost on this federation's parameters.
    assert job.upload_cost is not None
    assert aggregator.admin.job(job.id).upload_cost == job.upload_cost
    values = job.model.num_update_values()
    assert (job.upload_cost.bits, job.upload_cost.num_values) == (16, values)
    assert job.upload_cost.upload_bytes == -(-values // 16_384) * 61_606
    assert job.upload_cost.bytes_per_parameter == pytest.approx(61_606 / 16_384)
    with pytest.raises(NotFound):
        aggregator.admin.create_job(plain_job_create("key-" + "9" * 32))


@pytest.mark.usefixtures("plaintext_allowed")
def test_a_plaintext_round_sums_the_uploads_publishes_and_ends_the_job(aggregator: InProcessAggregator) -> None:
    job = aggregator.admin.create_job(plain_job_create(KEY_ID, format_id=PLAINTEXT_FORMAT_ID))
    a, b = aggregator.register_and_approve("a"), aggregator.register_and_approve("b")
    first = a.client.upload_update(job.id, 0, envelope(plain([0.5, -1, 2, 0, 0.25, 8]), num_samples=30))
    assert (first.round_state, first.num_submissions, first.replayed) == (RoundState.COLLECTING, 1, False)
    again = a.client.upload_update(job.id, 0, envelope(plain([0.5, -1, 2, 0, 0.25, 8]), num_samples=30))
    assert (again.replayed, again.num_submissions, again.sha256) == (True, 1, first.sha256)

    second = b.client.upload_update(job.id, 0, envelope(plain([1.5, 1, -2, 4, 0.5, -8]), num_samples=50))
    assert (second.round_state, second.num_submissions) == (RoundState.PUBLISHED, 2)

    published = aggregator.admin.round(job.id, 0)
    assert (published.state, published.num_submissions, published.total_samples) == (RoundState.PUBLISHED, 2, 80)
    assert sorted(s.site_id for s in published.submissions) == sorted([a.site_id, b.site_id])
    aggregate = decode_envelope(a.client.aggregate(job.id, 0))
    assert (aggregate.format_id, aggregate.key_id, aggregate.num_values) == (PLAINTEXT_FORMAT_ID, KEY_ID, NUM_VALUES)
    assert np.frombuffer(b"".join(aggregate.chunks), dtype="<f8").tolist() == [2.0, 0.0, 0.0, 4.0, 0.75, 0.0]
    assert aggregate.meta["total_samples"] == 80
    verification = aggregator.admin.verify_round(job.id, 0)
    assert (verification.submissions, verification.counters_match, verification.sum_matches) == (2, True, True)
    ended = aggregator.admin.job(job.id)
    assert (ended.status, ended.current_round) == (JobStatus.COMPLETED, 0)


def _site_codec(material: KeyMaterial) -> UpdateCodec:
    """The packed codec with the secret context, as a member site holds it."""
    return codec_for(
        PACKED_FORMAT_ID,
        load_secret_context(material.secret_context),
        options=PackingSettings(clip_range=DEFAULT_CLIP_RANGE),
    )


def test_an_encrypted_round_publishes_the_homomorphic_sum(
    aggregator: InProcessAggregator, bfv_material: KeyMaterial
) -> None:
    job = aggregator.admin.create_job(plain_job_create(KEY_ID))
    codec = _site_codec(bfv_material)
    values = [np.array([0.5, -0.25, 0.125, 0.0, -0.5, 0.75]), np.array([0.25, 0.25, -0.125, 0.5, 0.0, -0.25])]
    sites = [aggregator.register_and_approve(name) for name in ("a", "b")]
    uploads = [codec.encrypt_update(v) for v in values]
    for site, chunks in zip(sites, uploads, strict=True):
        site.client.upload_update(job.id, 0, envelope(chunks, format_id=PACKED_FORMAT_ID))

    assert aggregator.admin.round(job.id, 0).state == RoundState.PUBLISHED
    aggregate = decode_envelope(sites[0].client.aggregate(job.id, 0))
    published = codec.decrypt_aggregate(aggregate.chunks, NUM_VALUES, summed_inputs=2)
    expected = codec.decrypt_aggregate(codec.sum_updates(uploads, NUM_VALUES), NUM_VALUES, summed_inputs=2)
    assert published.tolist() == expected.tolist()  # exactly the sum of the two ciphertexts
    np.testing.assert_allclose(published, values[0] + values[1], atol=1e-4)
    verification = aggregator.admin.verify_round(job.id, 0)
    assert (verification.submissions, verification.counters_match, verification.sum_matches) == (2, True, True)


class _RedoneSum:
    """The aggregator's publisher, but its re-sum meets a missing upload chunk: swept by the
    retention period just before (``sweep``), or gone without any sweep."""

    def __init__(self, publisher: RoundPublisher, sessions: SessionFactory, *, sweep: bool):
        self._publisher, self._sessions, self._sweep = publisher, sessions, sweep

    def plan(self, *args: Any, **kwargs: Any) -> SumPlan | None:
        return self._publisher.plan(*args, **kwargs)

    def sums(self, plan: SumPlan) -> Iterator[tuple[int, bytes]]:
        if not self._sweep:
            raise NotFound("chunk 0 of 1 uploads is not stored")
        with self._sessions.transaction() as session:
            AggregatorRepository(session).delete_upload_chunks(plan.upload_ids)
        yield from self._publisher.sums(plan)


def test_verifying_while_the_retention_sweep_removes_the_uploads_says_they_were_pruned(
    tmp_path: Path, bfv_material: KeyMaterial
) -> None:
    with aggregator_app(tmp_path, bfv_material) as aggregator:
        job = aggregator.admin.create_job(plain_job_create(KEY_ID))
        codec = _site_codec(bfv_material)
        sites = [aggregator.register_and_approve(name) for name in ("a", "b")]
        for site in sites:
            update = envelope(codec.encrypt_update(np.zeros(NUM_VALUES)), format_id=PACKED_FORMAT_ID)
            site.client.upload_update(job.id, 0, update)
        assert aggregator.admin.verify_round(job.id, 0).sum_matches
        sessions, publisher = aggregator.app.state.sessions, aggregator.app.state.publisher
        gone = cast(RoundPublisher, _RedoneSum(publisher, sessions, sweep=False))
        with pytest.raises(NotFound):  # a chunk missing for any other reason is not hidden
            verify_round(sessions, gone, job.id, 0)
        raced = verify_round(sessions, cast(RoundPublisher, _RedoneSum(publisher, sessions, sweep=True)), job.id, 0)
        assert (raced.submissions, raced.counters_match, raced.sum_matches, raced.uploads_pruned) == (
            2,
            True,
            False,
            True,
        )
        assert aggregator.admin.verify_round(job.id, 0).uploads_pruned  # and so it stays


def test_the_summing_processes_start_with_the_service_and_sum_its_first_round(
    tmp_path: Path, bfv_material: KeyMaterial
) -> None:
    before = {child.pid for child in multiprocessing.active_children()}
    with aggregator_app(tmp_path, bfv_material, sum_workers=2) as aggregator:
        started = {child.pid for child in multiprocessing.active_children()} - before
        assert len(started) == 2  # before any round closes
        job = aggregator.admin.create_job(plain_job_create(KEY_ID))
        codec = _site_codec(bfv_material)
        values = np.array([0.5, -0.25, 0.125, 0.0, -0.5, 0.75])
        sites = [aggregator.register_and_approve(name) for name in ("a", "b")]
        for site in sites:
            site.client.upload_update(job.id, 0, envelope(codec.encrypt_update(values), format_id=PACKED_FORMAT_ID))
        assert aggregator.admin.round(job.id, 0).state == RoundState.PUBLISHED
        published = codec.decrypt_aggregate(decode_envelope(site.client.aggregate(job.id, 0)).chunks, NUM_VALUES)
        np.testing.assert_allclose(published, 2 * values, atol=2 * PackingSettings(clip_range=DEFAULT_CLIP_RANGE).step)
        assert {child.pid for child in multiprocessing.active_children()} - before == started  # no new ones


@dataclass
class BadUploadScene:
    """One aggregator for every bad-upload case: two member sites, one approved site that is not a member."""

    aggregator: InProcessAggregator
    first: Site
    second: Site
    outsider: Site


@pytest.fixture(scope="module")
def bad_upload_scene(tmp_path_factory: pytest.TempPathFactory, bfv_material: KeyMaterial) -> Iterator[BadUploadScene]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SWITCH, "benchmark-only")
        with aggregator_app(tmp_path_factory.mktemp("bad-uploads"), bfv_material) as running:
            first, second = running.register_and_approve("a"), running.register_and_approve("b")
            yield BadUploadScene(running, first, second, running.register_and_approve("outsider", member=False))


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("wrong-round", 409, "wrong_round"),
        ("truncated-body", 400, "truncated_update"),
        ("not-an-envelope", 400, "invalid_envelope"),
        ("wrong-num-values", 400, "wrong_num_values"),
        ("garbage-chunk", 400, "invalid_ciphertext"),
        ("wrong-format", 400, "unsupported_format"),
        ("num-samples-over-bound", 400, "invalid_num_samples"),
        ("duplicate", 409, "duplicate_update"),
        ("not-a-member", 404, "not_found"),
    ],
)
def test_a_bad_upload_is_refused_and_leaves_the_round_exactly_as_it_was(
    bad_upload_scene: BadUploadScene, case: str, status: int, code: str
) -> None:
    scene = bad_upload_scene
    aggregator, first, second = scene.aggregator, scene.first, scene.second
    job = aggregator.admin.create_job(plain_job_create(KEY_ID, format_id=PLAINTEXT_FORMAT_ID, name=case))
    good = envelope(plain([1, 2, 3, 4, 5, 6]))
    first.client.upload_update(job.id, 0, good)
    uploads: dict[str, tuple[Site, int, bytes]] = {
        "wrong-round": (second, 1, good),
        "truncated-body": (second, 0, good[:-9]),
        "not-an-envelope": (second, 0, b'{"weights": [1, 2, 3]}'),
        "wrong-num-values": (second, 0, envelope(plain([1, 2, 3, 4, 5, 6, 7]), num_values=7)),
        "garbage-chunk": (second, 0, envelope([b"\x01" * 7])),
        "wrong-format": (second, 0, envelope(plain([1, 2, 3, 4, 5, 6]), format_id="ckks-tenseal-v0")),
        "num-samples-over-bound": (second, 0, envelope(plain([1, 2, 3, 4, 5, 6]), num_samples=1001)),
        "duplicate": (first, 0, envelope(plain([6, 5, 4, 3, 2, 1]))),
        "not-a-member": (scene.outsider, 0, good),
    }
    site, number, body = uploads[case]
    before = round_snapshot(aggregator, job.id, 0)
    assert before["round"] == ("collecting", 1, 1, 50)

    response = raw_upload(aggregator, site, job.id, number, body)

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert round_snapshot(aggregator, job.id, 0) == before
    # ... and the round still takes the next good upload and publishes exactly the two sums.
    assert second.client.upload_update(job.id, 0, envelope(plain([1, 1, 1, 1, 1, 1]))).num_submissions == 2
    aggregate = decode_envelope(first.client.aggregate(job.id, 0))
    assert np.frombuffer(b"".join(aggregate.chunks), dtype="<f8").tolist() == [2, 3, 4, 5, 6, 7]


@pytest.mark.usefixtures("plaintext_allowed")
def test_a_stopped_job_takes_no_upload(aggregator: InProcessAggregator) -> None:
    job = aggregator.admin.create_job(plain_job_create(KEY_ID, format_id=PLAINTEXT_FORMAT_ID))
    site = aggregator.register_and_approve("a")
    stopped = aggregator.admin.stop_job(job.id)
    assert stopped.status == JobStatus.STOPPED
    before = round_snapshot(aggregator, job.id, 0)
    with pytest.raises(Conflict):
        site.client.upload_update(job.id, 0, envelope(plain([1, 2, 3, 4, 5, 6])))
    assert round_snapshot(aggregator, job.id, 0) == before


@pytest.mark.usefixtures("plaintext_allowed")
def test_a_round_short_of_uploads_at_its_deadline_fails_and_so_does_the_job(
    tmp_path: Path, bfv_material: KeyMaterial
) -> None:
    """The deadline watcher (RoundWatcher) closes a round that has fewer than min_sites uploads."""
    with aggregator_app(tmp_path, bfv_material, deadline_check_interval_s=0.05) as aggregator:
        job = aggregator.admin.create_job(
            plain_job_create(KEY_ID, format_id=PLAINTEXT_FORMAT_ID, round_deadline_s=0.3, on_round_failure="stop")
        )
        site = aggregator.register_and_approve("a")
        site.client.upload_update(job.id, 0, envelope(plain([1, 2, 3, 4, 5, 6])))
        deadline = time.monotonic() + 10
        while aggregator.admin.job(job.id).status == JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = aggregator.admin.round(job.id, 0)
        assert (failed.state, failed.num_submissions) == (RoundState.FAILED, 1)
        assert failed.failure_reason
        assert aggregator.admin.job(job.id).status == JobStatus.FAILED
        with pytest.raises(Conflict, match="not published"):
            site.client.aggregate(job.id, 0)
