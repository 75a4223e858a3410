"""Two aggregator replicas behind one (simulated) Service: no update is lost or counted twice."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from fedhe_demo.local_cluster import RedisServer
from tests.conftest import PostgresDatabases
from tests.integration.faults_support import (
    MODEL,
    REDIS_KEY_PREFIX,
    FaultCluster,
    assert_published_average,
    federation_with_job,
    start_fault_cluster,
)

SITES = 8


@pytest.fixture(scope="module")
def replicas(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    workdir = tmp_path_factory.mktemp("replicas")
    server = RedisServer(workdir)
    server.start()
    cluster = start_fault_cluster(postgres, workdir, server.url)
    cluster.add_replica(name="aggregator-b")
    yield cluster
    cluster.stop()
    server.kill()


def test_random_replicas_and_racing_duplicates_count_each_update_once(replicas: FaultCluster) -> None:
    job_id, sites = federation_with_job(replicas, SITES, min_sites=SITES, rounds=2)
    rng = np.random.default_rng(7)
    chooser = random.Random(7)
    for number in range(2):
        updates = [(rng.uniform(-2, 2, MODEL.num_parameters()), int(rng.integers(5, 900))) for _ in sites]
        bodies = [site.body(w, n) for site, (w, n) in zip(sites, updates, strict=True)]
        # Every site uploads to a random replica; three of them also race the same upload to the other one.
        calls = [(site, chooser.choice(replicas.urls), body) for site, body in zip(sites, bodies, strict=True)]
        calls += [
            (site, url, body) for site, body in list(zip(sites, bodies, strict=True))[:3] for url in replicas.urls
        ]
        chooser.shuffle(calls)
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda call, n=number: call[0].post(call[1], job_id, n, call[2]), calls))
        assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses if r.status_code >= 300]
        assert sum(r.status_code == 201 for r in responses) == SITES
        assert_published_average(sites[0], replicas.urls[1], job_id, number, updates)
    with replicas.admin() as operator:
        assert [r.num_submissions for r in operator.rounds(job_id)] == [SITES, SITES]
        assert operator.job(job_id).status.value == "completed"


def test_events_from_either_replica_reach_a_subscriber_of_the_other(replicas: FaultCluster) -> None:
    job_id, sites = federation_with_job(replicas, 2, min_sites=2, rounds=1)
    seen: list[dict[str, object]] = []
    subscribed = threading.Event()

    def listen() -> None:
        headers = {"Authorization": f"Bearer {replicas.secrets.aggregator_admin_token}"}
        with httpx.stream(
            "GET",
            f"{replicas.urls[1]}/v1/events",
            params={"job_id": job_id},
            headers=headers,
            timeout=30,
            verify=replicas.secrets.tls.ssl_context(),
        ) as response:
            for line in response.iter_lines():
                subscribed.set()
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["kind"] == "job.completed":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)
    rng = np.random.default_rng(3)
    for site in sites:
        body = site.body(rng.uniform(-1, 1, MODEL.num_parameters()), 10)
        assert site.post(replicas.urls[0], job_id, 0, body).status_code == 201
    listener.join(timeout=20)
    kinds = [e["kind"] for e in seen]
    assert kinds == ["update.accepted", "update.accepted", "round.closed", "round.published", "job.completed"]
    assert {e["site_id"] for e in seen if e["kind"] == "update.accepted"} == {s.site.site_id for s in sites}


def test_a_refused_upload_does_not_burn_its_idempotency_key(replicas: FaultCluster) -> None:
    job_id, (site,) = federation_with_job(replicas, 1, min_sites=1, rounds=1)
    url, key = replicas.urls[0], {"Idempotency-Key": "round-0-attempt-1"}
    headers = {"Authorization": f"Bearer {site.site.credential}", **key}
    endpoint = f"{url}/v1/jobs/{job_id}/rounds/0/updates"
    verify = replicas.secrets.tls.ssl_context()
    refused = httpx.post(endpoint, content=b"not an envelope", headers=headers, timeout=30, verify=verify)
    assert refused.status_code == 400
    body = site.body(np.ones(MODEL.num_parameters()), 10)
    accepted = httpx.post(endpoint, content=body, headers=headers, timeout=30, verify=verify)
    assert accepted.status_code == 201, accepted.text
    reused = httpx.post(
        endpoint, content=site.body(np.zeros(MODEL.num_parameters()), 10), headers=headers, timeout=30, verify=verify
    )
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


def test_events_need_the_operator_credential(replicas: FaultCluster, tmp_path: Path) -> None:
    response = httpx.get(f"{replicas.urls[0]}/v1/events", timeout=5, verify=replicas.secrets.tls.ssl_context())
    assert response.status_code == 401


def test_every_key_the_replicas_write_to_redis_is_under_their_prefix(replicas: FaultCluster) -> None:
    keys = [key.decode() for key in redis.Redis.from_url(replicas.redis_url).keys("*")]
    # By now the replicas hold the watcher lease, the event stream, idempotency keys and rate counters.
    assert {key.split(":")[1] for key in keys} >= {"lease", "fence", "events", "idempotency", "aggregator"}
    assert {key.split(":")[0] for key in keys} == {REDIS_KEY_PREFIX}
