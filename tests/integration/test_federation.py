"""Two full rounds with real services, real agents (DP-SGD, TenSEAL) and real Postgres.

Checks the protocol's central promise: the aggregate the aggregator publishes, once a site
decrypts it, equals the plaintext weighted FedAvg of exactly the updates it accepted.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sqlalchemy import text

from fedhe.api_client import AggregatorClient
from fedhe.datasets import load_bundled, partition_dirichlet, save_csv, split
from fedhe.global_model import decode_global_model
from fedhe.local_cluster import provision_site, start_agent
from fedhe.modelspec import InputNormalisation, ModelSpec
from fedhe.privacy import DPSettings
from fedhe.schemas import FederationCreate, JobCreate, JobStatus, RoundState
from tests.conftest import Cluster
from tests.integration.helpers import database_connection, site_codec, stored_submissions

FEDAVG_TOLERANCE = 1e-6
ROUNDS = 2


@pytest.fixture(scope="module")
def finished_federation(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("federation")
    pool, _ = split(load_bundled("breast_cancer"), 0.2, seed=3)
    parts = partition_dirichlet(pool.y, 3, alpha=1.0, seed=3, min_size=64)
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="it-federation"))
    spec = ModelSpec(
        input_dim=30,
        hidden_units=[8],
        num_classes=2,
        normalisation=InputNormalisation(mean=pool.x.mean(0).tolist(), std=pool.x.std(0).tolist()),
    )
    request = JobCreate(
        name="it-two-rounds",
        key_id=federation.key_id,
        model=spec,
        rounds=ROUNDS,
        min_sites=3,
        round_deadline_s=240,
        local_epochs=1,
        batch_size=16,
        learning_rate=0.2,
        dp=DPSettings(),
        max_samples_per_round=10_000,
    )
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(request)
    sites, agents = [], []
    for index, rows in enumerate(parts):
        name = f"it-site{index}"
        site = provision_site(
            aggregator_url=cluster.aggregator_url,
            keyserver_url=cluster.keyserver_url,
            secrets=cluster.secrets,
            directory=workdir,
            name=name,
            federation_id=federation.id,
        )
        save_csv(pool.subset(rows), workdir / name / "data.csv")
        sites.append(site)
        agents.append(
            start_agent(
                site=site,
                name=name,
                aggregator_url=cluster.aggregator_url,
                keyserver_url=cluster.keyserver_url,
                secrets=cluster.secrets,
                data_path=workdir / name / "data.csv",
                state_dir=workdir / name / "state",
                job_id=job.id,
                log_dir=workdir / "logs",
            )
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(a.process.poll() is None for a in agents):
            time.sleep(1)
        for agent in agents:
            assert agent.process.returncode == 0, agent.tail()
    finally:
        for agent in agents:
            agent.stop()
    return {"job": job, "sites": sites, "workdir": workdir, "key_id": federation.key_id}


def test_job_completes_with_every_round_published_by_all_sites(cluster: Cluster, finished_federation) -> None:
    job = finished_federation["job"]
    with cluster.aggregator_admin() as operator:
        assert operator.job(job.id).status == JobStatus.COMPLETED
        rounds = operator.rounds(job.id)
    assert [(r.number, r.state, r.num_submissions) for r in rounds] == [
        (n, RoundState.PUBLISHED, 3) for n in range(ROUNDS)
    ]
    for r in rounds:
        assert sorted(s.site_id for s in r.submissions) == sorted(s.site_id for s in finished_federation["sites"])
        assert len(r.evaluations) == 3
        assert all(0.0 <= e.metrics["accuracy"] <= 1.0 for e in r.evaluations)
        assert all(s.metrics["epsilon"] > 0 for s in r.submissions)


def test_published_aggregate_equals_plaintext_weighted_fedavg(cluster: Cluster, finished_federation) -> None:
    job, site = finished_federation["job"], finished_federation["sites"][0]
    codec = site_codec(cluster.keyserver_url, cluster.secrets, site, finished_federation["key_id"])
    with AggregatorClient(cluster.aggregator_url, site.credential, tls=cluster.secrets.tls) as client:
        for number in range(ROUNDS):
            published = decode_global_model(client.model(job.id, number + 1), lambda env: codec)
            uploads = stored_submissions(cluster.aggregator_database_url, job.id, number)
            samples = np.array([n for n, _ in uploads])
            site_weights = [codec.decrypt_aggregate(chunks, job.num_parameters) * (10_000 / n) for n, chunks in uploads]
            expected = np.average(np.stack(site_weights), axis=0, weights=samples)
            assert np.max(np.abs(published - expected)) <= FEDAVG_TOLERANCE
            assert np.max(np.abs(expected)) > 0.01


def test_epsilon_accumulates_across_rounds_in_each_site_ledger(finished_federation) -> None:
    for site_dir in sorted(finished_federation["workdir"].glob("it-site*")):
        ledger = json.loads((site_dir / "state" / "privacy-ledger.json").read_text())
        assert [entry["round"] for entry in ledger] == list(range(ROUNDS))
        assert (site_dir / "state" / f"{finished_federation['job'].id}-final.keras").exists()


def test_site_files_are_private(finished_federation) -> None:
    for site_dir in sorted(finished_federation["workdir"].glob("it-site*")):
        state = site_dir / "state"
        assert state.stat().st_mode & 0o777 == 0o700
        files = [path for path in state.iterdir() if path.is_file()]
        assert files, "the agent wrote no state"
        assert {path.name: path.stat().st_mode & 0o777 for path in files} == {path.name: 0o600 for path in files}


def test_every_accepted_update_and_publication_is_audited(cluster: Cluster, finished_federation) -> None:
    with database_connection(cluster.aggregator_database_url) as conn:
        actions = conn.execute(
            text("SELECT action, count(*) FROM audit_events WHERE subject = :job GROUP BY action"),
            {"job": finished_federation["job"].id},
        ).all()
    assert dict(actions) == {
        "job.create": 1,
        "update.accept": 3 * ROUNDS,
        "round.close": ROUNDS,
        "round.publish": ROUNDS,
    }
