"""Job options at the running aggregator: format by federation, privacy plan and warnings, site sampling."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from fedhe.api_client import AggregatorClient
from fedhe.errors import Conflict, InvalidRequest
from fedhe.he import CKKS_FORMAT_ID, PACKED_FORMAT_ID, BfvParameters, CkksParameters, PackingSettings
from fedhe.job_options import SamplingMode, SamplingSettings
from fedhe.modelspec import ModelSpec
from fedhe.privacy import DPSettings, plan_epsilon
from fedhe.schemas import DeclineCreate, DeclineReason, FederationCreate, JobCreate, RoundState
from tests.conftest import Cluster
from tests.integration.faults_support import UploadingSite
from tests.integration.helpers import round_snapshot, site_codec

MODEL = ModelSpec(input_dim=4, num_classes=2)


def _job(key_id: str, **fields: object) -> JobCreate:
    return JobCreate.model_validate({"name": "options", "key_id": key_id, "model": MODEL.model_dump(), **fields})


def test_a_job_takes_its_federations_format_and_the_packed_codec_by_default(cluster: Cluster) -> None:
    with cluster.keyserver_admin() as keyserver:
        bfv = keyserver.create_federation(FederationCreate(name="bfv-by-default"))
        ckks = keyserver.create_federation(FederationCreate(name="ckks", parameters=CkksParameters()))
    assert bfv.contexts[0].parameters.scheme == "bfv"
    with cluster.aggregator_admin() as operator:
        packed = operator.create_job(_job(bfv.key_id))
        assert (packed.format_id, packed.packing) == (PACKED_FORMAT_ID, PackingSettings(clip_range=1.0))
        with pytest.raises(InvalidRequest) as secure_on_ckks:
            operator.create_job(_job(ckks.key_id))
        assert "secure aggregation needs format bfv-packed-v1" in secure_on_ckks.value.message
        unmasked = operator.create_job(_job(ckks.key_id, secure_aggregation=None))
        assert unmasked.format_id == CKKS_FORMAT_ID
        assert unmasked.warnings[0].startswith("secure aggregation is off: any one member site")
        with pytest.raises(InvalidRequest) as packing_on_ckks:
            operator.create_job(_job(ckks.key_id, packing={"clip_range": 1.0}, secure_aggregation=None))
        assert packing_on_ckks.value.code == "invalid_job"
        with pytest.raises(InvalidRequest) as wrong_scheme:
            operator.create_job(_job(ckks.key_id, format_id=PACKED_FORMAT_ID, secure_aggregation=None))
        assert wrong_scheme.value.code == "scheme_mismatch"
        jobs_before = len(operator.jobs())
        overflow = httpx.post(
            f"{cluster.aggregator_url}/v1/jobs",
            json={
                "name": "overflowing",
                "key_id": bfv.key_id,
                "model": MODEL.model_dump(),
                "packing": {"clip_range": 1.0, "bits": 40, "max_sites": 1000},
            },
            headers={"Authorization": f"Bearer {cluster.secrets.aggregator_admin_token}"},
            verify=cluster.secrets.tls.ssl_context(),
        )
        assert (overflow.status_code, overflow.json()["error"]["code"]) == (400, "packing_overflow")
        assert len(operator.jobs()) == jobs_before  # refused jobs leave nothing behind


def test_packing_is_checked_against_the_federations_own_plain_modulus(cluster: Cluster) -> None:
    """1,000 sites at 12 bits: too much noise for t = 2^46 (at most 381 sums), within the
    1,524 that t = 2^44 allows; the job is judged by its own federation's context."""
    thousand = {"clip_range": 1.0, "bits": 12, "max_sites": 1000}
    with cluster.keyserver_admin() as keyserver:
        default = keyserver.create_federation(FederationCreate(name="t46"))
        roomy = keyserver.create_federation(
            FederationCreate(name="t44", parameters=BfvParameters(plain_modulus_bits=44))
        )
    with cluster.aggregator_admin() as operator:
        with pytest.raises(InvalidRequest) as refused:
            operator.create_job(_job(default.key_id, packing=thousand, min_sites=1000))
        assert refused.value.code == "noise_budget_exceeded"
        assert refused.value.detail["most_sites"] == 381
        accepted = operator.create_job(_job(roomy.key_id, packing=thousand, min_sites=1000))
    assert accepted.packing == PackingSettings.model_validate(thousand)


def test_job_creation_plans_privacy_and_warns_over_the_threshold(cluster: Cluster) -> None:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="planned"))
    dp = DPSettings(noise_multiplier=0.8, delta=1e-5)
    with cluster.aggregator_admin() as operator:
        risky = operator.create_job(
            _job(
                federation.key_id,
                rounds=20,
                batch_size=16,
                local_epochs=2,
                dp=dp.model_dump(),
                min_site_samples=100,
                max_site_samples=900,
            )
        )
        unplanned = operator.create_job(_job(federation.key_id))
        jobs_before = len(operator.jobs())
        refused = httpx.post(
            f"{cluster.aggregator_url}/v1/jobs",
            json={**_job(federation.key_id).model_dump(mode="json"), "min_site_samples": 100, "dp": {"delta": 0.01}},
            headers={"Authorization": f"Bearer {cluster.secrets.aggregator_admin_token}"},
            verify=cluster.secrets.tls.ssl_context(),
        )
        assert len(operator.jobs()) == jobs_before
    assert refused.status_code == 400, refused.text
    assert "dp.delta=0.01 is not below 1/n = 0.01 for a site of min_site_samples=100 rows" in refused.text
    expected = plan_epsilon(num_samples=100, batch_size=16, noise_multiplier=0.8, local_epochs=2, rounds=20, delta=1e-5)
    largest = plan_epsilon(num_samples=900, batch_size=16, noise_multiplier=0.8, local_epochs=2, rounds=20, delta=1e-5)
    assert risky.privacy_plan is not None
    assert risky.privacy_plan.epsilon_per_round == pytest.approx(expected)
    assert risky.privacy_plan.final_epsilon == pytest.approx(expected[-1])
    assert risky.largest_site_plan is not None
    assert (risky.largest_site_plan.num_samples, risky.largest_site_plan.final_epsilon) == (
        900,
        pytest.approx(largest[-1]),
    )
    assert expected[-1] > 10
    assert any(f"ε={expected[-1]:.2f}" in warning for warning in risky.warnings), risky.warnings
    assert unplanned.privacy_plan is None
    assert unplanned.warnings == ["min_site_samples is not set, so the job's privacy cost was not planned"]


def test_a_sampled_round_takes_only_the_sites_it_selected(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="sampled"))
    sites = [cluster.provision_site(tmp_path, f"m{index}", federation.id) for index in range(4)]
    sampling = SamplingSettings(mode=SamplingMode.FRACTION, fraction=0.5, min_sites=2)
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(
            _job(
                federation.key_id,
                rounds=2,
                min_sites=2,
                sampling=sampling.model_dump(),
                max_samples_per_round=100,
                secure_aggregation=None,  # plain uploads; secure rounds refuse unselected sites' keys alike
            )
        )
        first = operator.round(job.id, 0)
    selected = set(first.selected_sites or [])
    assert len(selected) == 2
    assert selected <= {s.site_id for s in sites}
    by_id = {s.site_id: s for s in sites}
    codec = site_codec(cluster.keyserver_url, cluster.secrets, sites[0], federation.key_id)
    uploading = {
        site_id: UploadingSite(site, codec, federation.key_id, cluster.secrets.tls) for site_id, site in by_id.items()
    }
    change = np.linspace(-1, 1, MODEL.num_parameters())
    for site_id in sorted(set(by_id) - selected):
        with AggregatorClient(cluster.aggregator_url, by_id[site_id].credential, tls=cluster.secrets.tls) as client:
            view = client.round(job.id, 0)
            assert (view.caller_selected, view.selected_sites) == (False, None)
            before = round_snapshot(cluster.aggregator_database_url, job.id, 0)
            refused = uploading[site_id].post(cluster.aggregator_url, job.id, 0, uploading[site_id].body(change, 10))
            assert (refused.status_code, refused.json()["error"]["code"]) == (409, "not_selected")
            with pytest.raises(Conflict) as declined:
                client.decline_round(job.id, 0, DeclineCreate(reason=DeclineReason.OTHER))
            assert declined.value.code == "not_selected"
            assert round_snapshot(cluster.aggregator_database_url, job.id, 0) == before
    for site_id in sorted(selected):
        response = uploading[site_id].post(cluster.aggregator_url, job.id, 0, uploading[site_id].body(change, 10))
        assert response.status_code == 201, response.text
    with cluster.aggregator_admin() as operator:
        published = operator.round(job.id, 0)
        second = operator.round(job.id, 1)
    assert published.state == RoundState.PUBLISHED
    assert sorted(s.site_id for s in published.submissions) == sorted(selected)
    assert len(second.selected_sites or []) == 2


def test_the_aggregate_of_an_unpublished_round_is_not_served(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="not-yet"))
    site = cluster.provision_site(tmp_path, "early", federation.id)
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(_job(federation.key_id, rounds=2))
    response = httpx.get(
        f"{cluster.aggregator_url}/v1/jobs/{job.id}/rounds/0/aggregate",
        headers={"Authorization": f"Bearer {site.credential}"},
        verify=cluster.secrets.tls.ssl_context(),
    )
    assert (response.status_code, response.json()["error"]["code"]) == (409, "aggregate_not_ready")
    beyond = httpx.get(
        f"{cluster.aggregator_url}/v1/jobs/{job.id}/rounds/2/aggregate",
        headers={"Authorization": f"Bearer {site.credential}"},
        verify=cluster.secrets.tls.ssl_context(),
    )
    assert beyond.status_code == 404
