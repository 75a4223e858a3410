"""Faults mid-round: nothing accepted is lost and nothing is counted twice.

Each test checks the published aggregate, decrypted as a site would, against the plaintext
weighted average of exactly the uploads the aggregator acknowledged.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psycopg
import pytest
import redis

from client_agent.datasets import load_bundled, partition_dirichlet, save_csv, split
from fedhe.schemas import FederationCreate
from fedhe_demo.local_cluster import RedisServer, provision_site, start_agent
from tests.conftest import POSTGRES_ADMIN_URL, PostgresDatabases
from tests.factories import job_create, model_spec
from tests.integration.faults_support import (
    MODEL,
    REDIS_KEY_PREFIX,
    FaultCluster,
    assert_published_average,
    federation_with_job,
    start_fault_cluster,
)
from tests.integration.helpers import round_snapshot

pytestmark = pytest.mark.faults
N = MODEL.num_parameters()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cluster(postgres: PostgresDatabases, tmp_path: Path, redis_server: RedisServer) -> Iterator[FaultCluster]:
    cluster = start_fault_cluster(postgres, tmp_path, redis_server.url)
    yield cluster
    cluster.stop()


def _updates(count: int, seed: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-3, 3, N), int(rng.integers(10, 500))) for _ in range(count)]


def test_sigkill_of_the_aggregator_mid_round(cluster: FaultCluster) -> None:
    job_id, sites = federation_with_job(cluster, 3, min_sites=3, rounds=1)
    updates = _updates(3, seed=1)
    bodies = [site.body(w, n) for site, (w, n) in zip(sites, updates, strict=True)]
    url = cluster.urls[0]
    for site, body in zip(sites[:2], bodies[:2], strict=True):
        assert site.post(url, job_id, 0, body).status_code == 201
    port, process = cluster.replicas.pop()
    process.kill()
    restarted = cluster.add_replica(port, name="aggregator-restarted")
    replay = sites[1].post(restarted, job_id, 0, bodies[1])
    assert replay.status_code == 200, replay.text
    assert replay.json()["replayed"] is True
    final = sites[2].post(restarted, job_id, 0, bodies[2])
    assert final.json()["round_state"] == "published"
    assert final.json()["num_submissions"] == 3
    assert_published_average(sites[0], restarted, job_id, 0, updates)
    with cluster.admin(restarted) as operator:
        verification = operator.verify_round(job_id, 0)
    assert (verification.submissions, verification.counters_match, verification.sum_matches) == (3, True, True)


def test_redis_killed_and_restarted_mid_round(cluster: FaultCluster, redis_server: RedisServer) -> None:
    job_id, sites = federation_with_job(cluster, 3, min_sites=3, rounds=1)
    updates = _updates(3, seed=2)
    url = cluster.urls[0]
    assert sites[0].post(url, job_id, 0, sites[0].body(*updates[0])).status_code == 201
    redis_server.kill()
    during_outage = sites[1].post(url, job_id, 0, sites[1].body(*updates[1]))
    assert during_outage.status_code == 201, during_outage.text
    redis_server.start()
    assert sites[2].post(url, job_id, 0, sites[2].body(*updates[2])).json()["round_state"] == "published"
    assert_published_average(sites[0], url, job_id, 0, updates)


def test_postgres_connections_dropped_mid_round(cluster: FaultCluster) -> None:
    job_id, sites = federation_with_job(cluster, 3, min_sites=3, rounds=1)
    updates = _updates(3, seed=3)
    url = cluster.urls[0]
    assert sites[0].post(url, job_id, 0, sites[0].body(*updates[0])).status_code == 201
    database = urlparse(cluster.database_url).path.lstrip("/")
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        dropped = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert dropped is not None
    assert dropped[0] >= 1
    for site, update in zip(sites[1:], updates[1:], strict=True):
        response = site.post(url, job_id, 0, site.body(*update))
        assert response.status_code == 201, response.text
    assert_published_average(sites[0], url, job_id, 0, updates)


def test_site_connection_cut_mid_upload_then_retry(cluster: FaultCluster) -> None:
    job_id, sites = federation_with_job(cluster, 2, min_sites=2, rounds=1)
    updates = _updates(2, seed=4)
    url = cluster.urls[0]
    assert sites[0].post(url, job_id, 0, sites[0].body(*updates[0])).status_code == 201
    before = round_snapshot(cluster.database_url, job_id, 0)
    body = sites[1].body(*updates[1])
    host, port = urlparse(url).hostname, urlparse(url).port
    with socket.create_connection((host, port)) as raw:
        head = (
            f"POST /v1/jobs/{job_id}/rounds/0/updates HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {sites[1].site.credential}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        raw.sendall(head.encode() + body[: len(body) // 2])
    time.sleep(1)
    assert round_snapshot(cluster.database_url, job_id, 0) == before
    retry = sites[1].post(url, job_id, 0, body)
    assert retry.status_code == 201, retry.text
    assert retry.json()["round_state"] == "published"
    assert_published_average(sites[0], url, job_id, 0, updates)


def _wait_for_round(
    cluster: FaultCluster, url: str, job_id: str, number: int, state: str, timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    with cluster.admin(url) as operator:
        while time.monotonic() < deadline:
            rounds = [r for r in operator.rounds(job_id) if r.number == number]
            if any(r.state.value == state for r in rounds):
                return
            time.sleep(0.3)
    raise AssertionError(f"round {number} never became {state}")


def test_straggler_deadline_publishes_with_min_sites(cluster: FaultCluster) -> None:
    job_id, sites = federation_with_job(cluster, 3, min_sites=2, target_sites=3, rounds=2, round_deadline_s=3)
    updates = _updates(2, seed=5)
    url = cluster.urls[0]
    for site, update in zip(sites[:2], updates, strict=True):
        assert site.post(url, job_id, 0, site.body(*update)).status_code == 201
    _wait_for_round(cluster, url, job_id, 0, "published")
    late = sites[2].post(url, job_id, 0, sites[2].body(*_updates(1, seed=9)[0]))
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "wrong_round"
    assert_published_average(sites[0], url, job_id, 0, updates)


def test_round_below_min_sites_at_deadline_fails_and_is_retried(cluster: FaultCluster) -> None:
    job_id, sites = federation_with_job(cluster, 2, min_sites=2, rounds=1, round_deadline_s=2, max_round_attempts=2)
    url = cluster.urls[0]
    assert sites[0].post(url, job_id, 0, sites[0].body(*_updates(1, seed=6)[0])).status_code == 201
    _wait_for_round(cluster, url, job_id, 0, "failed")
    with cluster.admin(url) as operator:
        attempts = [(r.attempt, r.state.value) for r in operator.rounds(job_id)]
        assert attempts[0] == (1, "failed")
        assert attempts[1][0] == 2
        assert operator.job(job_id).status.value == "running"
    _wait_for_round(cluster, url, job_id, 0, "failed", timeout_s=30)
    deadline = time.monotonic() + 30
    with cluster.admin(url) as operator:
        while operator.job(job_id).status.value == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert operator.job(job_id).status.value == "failed"
        assert [r.state.value for r in operator.rounds(job_id)] == ["failed", "failed"]


def test_stop_policy_fails_the_job_at_the_first_failed_round(cluster: FaultCluster) -> None:
    job_id, _ = federation_with_job(cluster, 1, min_sites=1, rounds=3, round_deadline_s=1, on_round_failure="stop")
    url = cluster.urls[0]
    _wait_for_round(cluster, url, job_id, 0, "failed")
    with cluster.admin(url) as operator:
        assert operator.job(job_id).status.value == "failed"
        assert len(operator.rounds(job_id)) == 1


def test_real_agents_ride_out_an_aggregator_crash_without_help(cluster: FaultCluster) -> None:
    """Two DP-SGD agents keep going through a SIGKILL and restart of the aggregator."""

    pool, _ = split(load_bundled("breast_cancer"), 0.2, seed=5)
    parts = partition_dirichlet(pool.y, 3, alpha=5.0, seed=5, min_size=64)
    url = cluster.urls[0]

    with cluster.secrets.keyserver_admin(cluster.keyserver_url) as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="crash"))
    key_id = federation.key_id
    with cluster.admin(url) as operator:
        job = operator.create_job(
            job_create(
                key_id,
                name="crash",
                model=model_spec(30),
                rounds=3,
                min_sites=3,  # secure aggregation (the default): every phase must survive the crash
                batch_size=16,
                max_samples_per_round=10_000,
            )
        )
    agents = []
    for index, rows in enumerate(parts):
        site = provision_site(
            aggregator_url=url,
            keyserver_url=cluster.keyserver_url,
            secrets=cluster.secrets,
            directory=cluster.workdir / "agents",
            name=f"a{index}",
            federation_id=federation.id,
        )
        data = cluster.workdir / "agents" / f"a{index}" / "data.csv"
        save_csv(pool.subset(rows), data)
        agents.append(
            start_agent(
                site=site,
                name=f"agent{index}",
                aggregator_url=url,
                keyserver_url=cluster.keyserver_url,
                secrets=cluster.secrets,
                data_path=data,
                state_dir=data.parent / "state",
                job_id=job.id,
                log_dir=cluster.workdir / "logs",
            )
        )
    try:
        _wait_for_round(cluster, url, job.id, 0, "published", timeout_s=120)
        port, process = cluster.replicas.pop()
        process.kill()
        time.sleep(3)
        restarted = cluster.add_replica(port, name="aggregator-after-crash")
        for agent in agents:
            agent.process.wait(timeout=240)
            assert agent.process.returncode == 0, agent.tail()
    finally:
        for agent in agents:
            agent.stop()
    with cluster.admin(restarted) as operator:
        assert operator.job(job.id).status.value == "completed"
        rounds = operator.rounds(job.id)
        published = [(r.number, r.num_submissions) for r in rounds if r.state.value == "published"]
        assert published == [(n, 3) for n in range(3)]
        for number in range(3):
            check = operator.verify_round(job.id, number)
            assert check.counters_match
            assert check.sum_matches


def test_deadline_fires_after_the_lease_holding_replica_dies(cluster: FaultCluster, redis_server: RedisServer) -> None:
    cluster.add_replica(name="aggregator-b")
    job_id, sites = federation_with_job(cluster, 3, min_sites=2, target_sites=3, rounds=1, round_deadline_s=6)
    for site, update in zip(sites[:2], _updates(2, seed=8), strict=True):
        assert site.post(cluster.urls[0], job_id, 0, site.body(*update)).status_code == 201
    holder = redis.Redis.from_url(redis_server.url).get(f"{REDIS_KEY_PREFIX}:lease:deadline-watcher")
    assert holder is not None
    holder_pid = int(holder.decode().split(":")[1])
    index = next(i for i, (_, p) in enumerate(cluster.replicas) if p.process.pid == holder_pid)
    _, process = cluster.replicas.pop(index)
    process.kill()
    survivor = cluster.urls[0]
    _wait_for_round(cluster, survivor, job_id, 0, "published", timeout_s=30)
    with cluster.admin(survivor) as operator:
        assert operator.round(job_id, 0).num_submissions == 2


def test_a_retention_period_removes_finished_rounds_ciphertext_and_nothing_else(cluster: FaultCluster) -> None:
    _, first = cluster.replicas.pop()
    first.stop()
    url = cluster.add_replica(name="aggregator-retention", env={"FEDHE_AGGREGATOR_UPLOAD_RETENTION_DAYS": "0"})
    job_id, sites = federation_with_job(cluster, 2, min_sites=2, rounds=2)
    updates = _updates(3, seed=11)
    for site, (change, n) in zip(sites, updates[:2], strict=True):
        assert site.post(url, job_id, 0, site.body(change, n)).status_code == 201
    assert sites[0].post(url, job_id, 1, sites[0].body(*updates[2])).status_code == 201
    published = round_snapshot(cluster.database_url, job_id, 0)
    collecting = round_snapshot(cluster.database_url, job_id, 1)

    with cluster.admin(url) as operator:
        deadline = time.monotonic() + 60  # the new replica takes the watcher lease once the old one's expires
        while not (verification := operator.verify_round(job_id, 0)).uploads_pruned:
            assert time.monotonic() < deadline, "the finished round's uploads were not pruned"
            time.sleep(0.5)
        events = [e for e in operator.audit_events(200) if e.action == "uploads.prune" and e.subject == job_id]
        assert operator.verify_round(job_id, 1).uploads_pruned is False

    assert (verification.counters_match, verification.sum_matches) == (True, False)
    assert [(e.actor, e.detail) for e in events] == [("aggregator", {"round": 0, "attempt": 1, "uploads": 2})]
    pruned = round_snapshot(cluster.database_url, job_id, 0)
    empty = hashlib.sha256(b"").hexdigest()
    # The watcher may prune before the first snapshot is read; the audit event's two uploads show that
    # something was removed, this shows that nothing else was.
    assert pruned == {**published, "counted_chunks_sha256": empty}  # submissions and the sum stay
    assert round_snapshot(cluster.database_url, job_id, 1) == collecting  # a round still to be summed keeps all
    assert_published_average(sites[1], url, job_id, 0, updates[:2])  # sites replaying the job still can
