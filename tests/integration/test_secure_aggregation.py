"""Secure aggregation against the real services over TLS: exactness, collusion, dropouts, forged inputs.

Sites here are ``ProtocolSite``s driven step by step (``secure_sites``), so a test can keep
what colluders hold, stop a site at any phase, or forge an input; the agents' own run of the
protocol is tested in ``test_federation`` and ``test_dishonest_coordinator``.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from fedhe.errors import ImplausibleAggregate
from fedhe.he.packing import unpack
from fedhe.modelspec import ModelSpec
from fedhe.schemas import (
    DeclineCreate,
    DeclineReason,
    FederationCreate,
    JobPublic,
    JobStatus,
    RoundPublic,
    RoundState,
)
from fedhe.secagg.masks import CoefficientMasks, MaskTerm, pairwise_sign, self_mask_key
from fedhe.secagg.shares import combine_shares
from fedhe.secagg.statements import RoundAttempt, positions, self_mask_commitment
from fedhe_demo.local_cluster import ProvisionedSite
from tests.conftest import Cluster
from tests.factories import job_create
from tests.integration.helpers import decrypted_coefficients, round_snapshot, stored_uploads
from tests.integration.secure_sites import ProtocolSite, envelope_bytes, in_state, wait_for_round

MODEL = ModelSpec(input_dim=200, num_classes=10)  # 2,010 values: one chunk
S = 500


def _federation(cluster: Cluster, tmp_path: Path, count: int) -> tuple[str, list[ProtocolSite]]:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name=tmp_path.name[:60]))
    sites = []
    for index in range(count):
        provisioned: ProvisionedSite = cluster.provision_site(tmp_path, f"s{index}", federation.id)
        sites.append(ProtocolSite(provisioned, cluster.aggregator_url, cluster.keyserver_url, cluster.secrets))
    return federation.key_id, sites


def _job(
    cluster: Cluster, key_id: str, *, min_sites: int, threshold: int, phase_s: float = 30, **fields: Any
) -> JobPublic:
    request = job_create(
        key_id,
        name="secure",
        model=MODEL,
        rounds=1,
        min_sites=min_sites,
        max_samples_per_round=S,
        round_deadline_s=fields.pop("round_deadline_s", 60),
        secure_aggregation={"threshold": threshold, "phase_deadline_s": phase_s},
        **fields,
    )
    with cluster.aggregator_admin() as operator:
        return operator.create_job(request)


def _updates(count: int, seed: int = 0, length: int = MODEL.num_parameters()) -> list[tuple[NDArray[Any], int]]:
    """What each site uploads: (w_k − w)·n_k/S for a random change (or a statistics vector) and n_k."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(50, S))
        out.append((rng.normal(0, 0.05, length) * n / S, n))
    return out


def _weighted_mean(updates: list[tuple[NDArray[Any], int]]) -> NDArray[Any]:
    return np.sum([values for values, _ in updates], axis=0) * S / sum(n for _, n in updates)


def _run_to_unmasking(job: JobPublic, sites: list[ProtocolSite], updates: list[tuple[NDArray[Any], int]]) -> None:
    for site in sites:
        site.advertise(job, 0, 1)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.COLLECTING))
    for site, (values, n) in zip(sites, updates, strict=True):
        site.masked_upload(job, 0, 1, values, n)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.UNMASKING))


def _tolerance(job: JobPublic, updates: list[tuple[NDArray[Any], int]]) -> float:
    assert job.packing is not None
    return job.packing.sum_error_bound(len(updates)) * S / sum(n for _, n in updates)


def test_every_member_decrypts_the_exact_weighted_mean_of_the_roster(cluster: Cluster, tmp_path: Path) -> None:
    key_id, sites = _federation(cluster, tmp_path, 4)
    job = _job(cluster, key_id, min_sites=4, threshold=2)
    updates = _updates(4)
    _run_to_unmasking(job, sites, updates)
    answered = sorted(site.site_id for site in sites if site.answer(job, 0, 1))
    with sites[0].client() as client:
        published = wait_for_round(client, job.id, 0, in_state(RoundState.PUBLISHED))
    assert published.total_samples == sum(n for _, n in updates)
    expected = _weighted_mean(updates)
    for site in sites:
        np.testing.assert_allclose(site.decrypt_published(job, 0), expected, rtol=0, atol=_tolerance(job, updates))
    with cluster.aggregator_admin() as operator:
        assert operator.verify_round(job.id, 0).sum_matches
        seen = operator.round(job.id, 0)
    # Operators see who advertised and who answered; a site sees neither. The round closed as soon
    # as every seed had t shares from members other than its owner: after t or t + 1 answers.
    assert (seen.advertised, seen.answered) == (sorted(site.site_id for site in sites), answered)
    assert job.threshold is not None
    assert job.threshold <= len(answered) <= job.threshold + 1
    assert (published.advertised, published.answered) == ([], [])


def _coalition_view(
    job: JobPublic, honest: ProtocolSite, colluders: list[ProtocolSite], upload: list[bytes], attempt: int
) -> NDArray[np.int64]:
    """What the coordinator and ``colluders`` make of ``honest``'s stored upload: decrypted with the
    member's key, its self mask removed once it is published, every mask a colluder shares with it removed."""
    at = RoundAttempt(job.id, 0, attempt)
    codec = colluders[0].codec(job, 0)
    transcript = colluders[0].received_shares(job, 0, attempt)
    keys = {m.site_id: m.public_key for m in transcript.roster.members}
    terms = []
    for colluder in colluders:
        pair = colluder.keys[(0, attempt)].pair_keys(at, colluder.site_id, honest.site_id, keys[honest.site_id])
        terms.append(MaskTerm(pair.mask_key, -pairwise_sign(honest.site_id, colluder.site_id)))
    seed = transcript.self_mask_seeds.get(honest.site_id)
    if seed is not None:
        terms.append(MaskTerm(self_mask_key(at, honest.site_id, base64.b64decode(seed)), -1))
    coefficients = decrypted_coefficients(codec, upload)
    codec._add_masks(coefficients, CoefficientMasks(tuple(terms)), 0)
    return unpack(coefficients, codec.layout, job.round_num_values(0))


def _levels_of(job: JobPublic, values: NDArray[Any]) -> NDArray[Any]:
    packing = job.round_packing(0)
    assert packing is not None
    return values / packing.step


@pytest.mark.parametrize("kind", ["statistics", "training"])
def test_the_coordinator_with_t_minus_1_members_learns_no_honest_update(
    cluster: Cluster, tmp_path: Path, kind: str
) -> None:
    """5 members, t = 3: the coordinator (every stored row, every seed it rebuilt) with 2 members (the
    federation's secret key, their X25519 keys, the shares sealed for them) reads no honest upload,
    a statistics vector or a training update; the same view with the honest members' masks also
    known reads each upload exactly (so the test can fail)."""
    key_id, sites = _federation(cluster, tmp_path, 5)
    statistics = {"statistics": {"feature_bounds": [1.0] * 200}} if kind == "statistics" else {}
    job = _job(cluster, key_id, min_sites=4, threshold=3, target_sites=5, **statistics)
    updates = _updates(5, seed=1, length=job.round_num_values(0))
    _run_to_unmasking(job, sites, updates)
    colluders, honest = sites[:2], sites[2:]
    at = RoundAttempt(job.id, 0, 1)
    for target in honest:  # the colluders hold t − 1 = 2 shares of each honest seed: one short of it
        shares, commitment = {}, ""
        for colluder in colluders:
            transcript = colluder.received_shares(job, 0, 1)
            statement = next(s for s in transcript.statements if s.site_id == target.site_id)
            target_key = next(m.public_key for m in transcript.roster.members if m.site_id == target.site_id)
            pair = colluder.keys[(0, 1)].pair_keys(at, colluder.site_id, target.site_id, target_key)
            sealed = statement.sealed_shares[colluder.site_id]
            shares[positions(transcript.roster)[colluder.site_id]] = pair.open(
                at, target.site_id, colluder.site_id, sealed
            )
            commitment = statement.self_mask_commitment
        assert self_mask_commitment(at, target.site_id, combine_shares(shares)) != commitment
    for site in sites:
        site.answer(job, 0, 1)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.PUBLISHED))
    stored = stored_uploads(cluster.aggregator_database_url, job.id, 0)
    for target, (values, _) in zip(honest, updates[2:], strict=True):
        seen = _coalition_view(job, target, colluders, stored[target.site_id], 1)
        truth = _levels_of(job, values)
        assert np.mean(np.abs(seen - truth) <= 1) < 0.01  # chance: 3 levels of a 2^23 (or 2^46) slot
        # Independent vectors of length n correlate with a standard deviation of 1/√n: 5σ fails by chance
        # once in ~2 million, while any leak of the update shows as a correlation near 1.
        assert abs(np.corrcoef(seen, truth)[0, 1]) < 5 / np.sqrt(len(truth))
        # Positive control: with the honest members' masks too, the same view is the update itself.
        everyone = _coalition_view(job, target, [s for s in sites if s is not target], stored[target.site_id], 1)
        assert np.all(np.abs(everyone - truth) <= 1)


def test_a_member_that_vanishes_after_uploading_is_still_in_the_mean(cluster: Cluster, tmp_path: Path) -> None:
    key_id, sites = _federation(cluster, tmp_path, 5)
    job = _job(cluster, key_id, min_sites=4, threshold=2, phase_s=20, target_sites=5)
    updates = _updates(5, seed=2)
    _run_to_unmasking(job, sites, updates)
    vanished = sites[4]  # uploaded, never answers
    for site in sites[:4]:
        site.answer(job, 0, 1)
    with sites[0].client() as client:
        published = wait_for_round(client, job.id, 0, in_state(RoundState.PUBLISHED))
    assert published.num_submissions == 5
    np.testing.assert_allclose(
        sites[0].decrypt_published(job, 0), _weighted_mean(updates), atol=_tolerance(job, updates)
    )
    assert vanished.site_id in (published.roster or [])


def test_too_few_answers_fail_the_attempt_at_the_unmasking_deadline(cluster: Cluster, tmp_path: Path) -> None:
    """5 members, t = 2: with only 2 answering, the seed of each answerer has one other answering holder."""
    key_id, sites = _federation(cluster, tmp_path, 5)
    job = _job(cluster, key_id, min_sites=4, threshold=2, phase_s=3, on_round_failure="stop", target_sites=5)
    _run_to_unmasking(job, sites, _updates(5, seed=3))
    for site in sites[:2]:
        site.answer(job, 0, 1)
    with sites[0].client() as client:
        failed = wait_for_round(client, job.id, 0, in_state(RoundState.FAILED), timeout_s=30)
    assert failed.failure_reason is not None
    assert failed.failure_reason.startswith("unmasking_incomplete")


def test_a_member_that_vanishes_before_uploading_costs_an_attempt_and_the_survivors_publish(
    cluster: Cluster, tmp_path: Path
) -> None:
    key_id, sites = _federation(cluster, tmp_path, 5)
    job = _job(cluster, key_id, min_sites=4, threshold=2, phase_s=3, round_deadline_s=8, target_sites=5)
    updates = _updates(5, seed=4)
    for site in sites:
        site.advertise(job, 0, 1)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.COLLECTING))
    for site, (values, n) in zip(sites[:4], updates[:4], strict=True):
        site.masked_upload(job, 0, 1, values, n)
    with sites[0].client() as client:
        second = wait_for_round(client, job.id, 0, in_state(RoundState.OPEN, attempt=2), timeout_s=30)
        first = client.rounds(job.id)[0]
    assert first.state == RoundState.FAILED
    assert first.failure_reason is not None
    assert first.failure_reason.startswith("roster_incomplete: 4 of the roster's 5 members uploaded")
    survivors, kept = sites[:4], updates[:4]
    for site in survivors:
        site.advertise(job, 0, second.attempt)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.COLLECTING, attempt=2), timeout_s=30)
    for site, (values, n) in zip(survivors, kept, strict=True):
        site.masked_upload(job, 0, 2, values, n)  # the same noised update, under fresh masks
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.UNMASKING))
    for site in survivors:
        site.answer(job, 0, 2)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.PUBLISHED))
    np.testing.assert_allclose(sites[0].decrypt_published(job, 0), _weighted_mean(kept), atol=_tolerance(job, kept))


def test_fewer_members_than_min_sites_advertising_fail_the_attempt_with_a_named_reason(
    cluster: Cluster, tmp_path: Path
) -> None:
    key_id, sites = _federation(cluster, tmp_path, 4)
    job = _job(cluster, key_id, min_sites=4, threshold=2, round_deadline_s=3, on_round_failure="stop")
    for site in sites[:3]:
        site.advertise(job, 0, 1)
    with sites[0].client() as client:
        failed = wait_for_round(client, job.id, 0, in_state(RoundState.FAILED), timeout_s=30)
    assert failed.failure_reason == "3 advertised a key and 0 declined by the deadline, fewer than min_sites=4"


@pytest.mark.parametrize("forgery", ["beyond_range", "slot_edge"])
def test_a_forged_input_is_refused_by_every_member_as_implausible(
    cluster: Cluster, tmp_path: Path, forgery: str
) -> None:
    """A member packs levels of ±122 R (±4,000,000), or puts values at the slot edge so they wrap."""
    key_id, sites = _federation(cluster, tmp_path, 4)
    job = _job(cluster, key_id, min_sites=4, threshold=2)
    assert job.packing is not None
    updates = _updates(4, seed=5)
    for site in sites:
        site.advertise(job, 0, 1)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.COLLECTING))
    forger = sites[3]
    codec = forger.codec(job, 0)
    levels = np.zeros(job.num_parameters, dtype=np.int64)
    if forgery == "beyond_range":
        levels[:100] = 4_000_000 * np.where(np.arange(100) % 2, 1, -1)
    else:
        levels[:3] = (1 << (codec.layout.slot_bits - 1)) - 1
    for site, (values, n) in zip(sites[:3], updates[:3], strict=True):
        site.masked_upload(job, 0, 1, values, n)
    forger.masked_upload(job, 0, 1, updates[3][0], 1, forge_levels=levels)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.UNMASKING))
    for site in sites:
        site.answer(job, 0, 1)
    with sites[0].client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.PUBLISHED))
    for site in sites[:3]:
        with pytest.raises(ImplausibleAggregate) as refused:
            site.decrypt_published(job, 0)
        assert refused.value.detail["values_beyond"] >= (100 if forgery == "beyond_range" else 3)
    with sites[0].client() as client:  # as an agent reports it
        client.decline_round(job.id, 0, DeclineCreate(reason=DeclineReason.IMPLAUSIBLE_AGGREGATE, message="forged"))
    with cluster.aggregator_admin() as operator:
        failed, status = operator.round(job.id, 0), operator.job(job.id).status
    assert (failed.state, status) == (RoundState.FAILED, JobStatus.FAILED)
    assert failed.failure_reason is not None
    assert failed.failure_reason.startswith("implausible_aggregate")


def test_a_bad_secure_upload_is_refused_by_name_and_changes_nothing(cluster: Cluster, tmp_path: Path) -> None:
    key_id, sites = _federation(cluster, tmp_path, 4)
    job = _job(cluster, key_id, min_sites=3, threshold=2)  # target 3: the fourth site misses the roster
    values, n = _updates(1, seed=6)[0]
    a, b, c, outsider = sites

    def refused(site: ProtocolSite, body: bytes, status: int, code: str) -> str:
        before = round_snapshot(cluster.aggregator_database_url, job.id, 0)
        response = httpx.post(
            f"{cluster.aggregator_url}/v1/jobs/{job.id}/rounds/0/updates",
            content=body,
            headers={"Authorization": f"Bearer {site.site.credential}"},
            verify=cluster.secrets.tls.ssl_context(),
            timeout=60,
        )
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        assert round_snapshot(cluster.aggregator_database_url, job.id, 0) == before
        return str(response.json()["error"]["message"])

    a.advertise(job, 0, 1)
    early = envelope_bytes(job, None, a.codec(job, 0).encrypt_update(values), len(values), num_samples=n)
    assert "roster is fixed" in refused(a, early, 409, "no_roster")
    for site in (b, c):
        site.advertise(job, 0, 1)
    with a.client() as client:
        wait_for_round(client, job.id, 0, in_state(RoundState.COLLECTING))
    statement, chunks = a.masked(job, 0, 1, values, n)
    assert "meta.secagg" in refused(
        a, envelope_bytes(job, None, chunks, len(values), num_samples=n), 400, "invalid_statement"
    )
    other_chunks = a.codec(job, 0).encrypt_update(values)  # valid ciphertexts, not the signed ones
    says = refused(a, envelope_bytes(job, statement, other_chunks, len(values)), 400, "invalid_statement")
    assert "not the ones the site's signed statement names" in says
    assert "names another site" in refused(
        b, envelope_bytes(job, statement, chunks, len(values)), 400, "invalid_statement"
    )
    inflated = statement.model_copy(update={"num_samples": n + 1})
    assert "signature does not verify" in refused(
        a, envelope_bytes(job, inflated, chunks, len(values)), 400, "invalid_statement"
    )
    other_roster = statement.model_copy(update={"roster_sha256": "0" * 64})
    says = refused(a, envelope_bytes(job, other_roster, chunks, len(values)), 400, "invalid_statement")
    assert "masked for another roster" in says
    outsider_body = envelope_bytes(job, statement.model_copy(update={"site_id": outsider.site_id}), chunks, len(values))
    assert "not in round 0 attempt 1's roster" in refused(outsider, outsider_body, 409, "not_in_roster")
    with a.client() as client:
        client.upload_update(job.id, 0, envelope_bytes(job, statement, chunks, len(values)))
    assert round_snapshot(cluster.aggregator_database_url, job.id, 0)["num_submissions"] == 1


def test_a_site_waiting_on_its_round_is_answered_when_the_phase_changes(cluster: Cluster, tmp_path: Path) -> None:
    key_id, sites = _federation(cluster, tmp_path, 3)
    job = _job(cluster, key_id, min_sites=3, threshold=2)
    with sites[0].client() as client:
        seen = client.round(job.id, 0)
        unchanged = client.round(job.id, 0, changed_from=seen, wait_s=0.5)
    assert (seen.state, unchanged.state, unchanged.attempt) == (RoundState.OPEN, RoundState.OPEN, 1)
    answered: list[RoundPublic] = []

    def wait() -> None:
        with sites[0].client() as waiting:
            answered.append(waiting.round(job.id, 0, changed_from=seen, wait_s=20))

    waiter = threading.Thread(target=wait)
    waiter.start()
    for site in sites:
        site.advertise(job, 0, 1)
    waiter.join(timeout=60)
    assert [(r.state, r.roster is not None) for r in answered] == [(RoundState.COLLECTING, True)]
