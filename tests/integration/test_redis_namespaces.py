"""Two deployments sharing one real Redis under different key prefixes do not see each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.coordination import RedisCoordination
from fedhe.ratelimit import counters_for
from fedhe_demo.local_cluster import RedisServer
from keyserver.nonces import RedisNonces


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server.url
    server.kill()


def test_aggregators_under_different_prefixes_share_no_lease_event_or_idempotency_key(redis_url: str) -> None:
    prod, trial = RedisCoordination(redis_url, "prod"), RedisCoordination(redis_url, "trial")
    assert prod.hold_lease("rounds", "prod-replica", ttl_s=60) == 1
    assert trial.hold_lease("rounds", "trial-replica", ttl_s=60) == 1  # its own lease and fence
    assert prod.hold_lease("rounds", "another-prod-replica", ttl_s=60) is None  # within one prefix: exclusive

    prod_cursor, trial_cursor = prod.latest_event_id(), trial.latest_event_id()
    prod.publish({"kind": "round.opened"})
    assert [event["kind"] for _, event in prod.read_events(prod_cursor, timeout_s=0)] == ["round.opened"]
    assert trial.read_events(trial_cursor, timeout_s=0.1) == []

    prod.remember_idempotency_key("upload-1", "sha-prod", ttl_s=60)
    assert (prod.idempotency_fingerprint("upload-1"), trial.idempotency_fingerprint("upload-1")) == ("sha-prod", None)


def test_keyservers_under_different_prefixes_share_no_nonce_or_rate_counter(redis_url: str) -> None:
    prod, trial = RedisNonces(redis_url, "prod"), RedisNonces(redis_url, "trial")
    assert prod.claim("nonce-1", ttl_s=60)
    assert not prod.claim("nonce-1", ttl_s=60)  # a replay within one deployment
    assert trial.claim("nonce-1", ttl_s=60)

    prod_rate, trial_rate = (
        counters_for(redis_url, "prod:keyserver:rate"),
        counters_for(redis_url, "trial:keyserver:rate"),
    )
    assert [prod_rate.add("site-1", 60)[0] for _ in range(3)] == [1, 2, 3]
    assert trial_rate.add("site-1", 60)[0] == 1
