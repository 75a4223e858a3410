"""Support for fault and replica tests: an own Redis server, clusters on demand, uploading sites."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from numpy.typing import NDArray

from fedhe.api_client import AggregatorClient
from fedhe.environment import current as current_environment
from fedhe.global_model import Decryption, decode_aggregate, weighted_update
from fedhe.he import Envelope, PackingSettings, UpdateCodec, encode_envelope
from fedhe.modelspec import ModelSpec
from fedhe.schemas import FederationCreate, JobCreate
from fedhe.tls import ClientTLS
from fedhe_demo.local_cluster import (
    UNLIMITED_RATES,
    ClusterSecrets,
    ManagedProcess,
    ProvisionedSite,
    free_port,
    provision_site,
    start_aggregator,
    url,
)
from tests.conftest import PostgresDatabases, start_test_keyserver
from tests.integration.helpers import DEFAULT_PACKING, site_codec

WEIGHT_SCALE = 10_000
MODEL = ModelSpec(input_dim=50, num_classes=2)  # 102 parameters


REDIS_KEY_PREFIX = "fault-test"
"""Every key the replicas write to Redis starts with this (``FEDHE_AGGREGATOR_REDIS_KEY_PREFIX``)."""


@dataclass
class FaultCluster:
    """Keyserver plus one or more aggregator replicas sharing Postgres and Redis."""

    workdir: Path
    secrets: ClusterSecrets
    keyserver_url: str
    database_url: str
    redis_url: str
    keyserver: ManagedProcess
    replicas: list[tuple[int, ManagedProcess]] = field(default_factory=list)

    def add_replica(self, port: int | None = None, name: str | None = None, env: dict[str, str] | None = None) -> str:
        port = port or free_port()
        process = start_aggregator(
            port=port,
            database_url=self.database_url,
            keyserver_url=self.keyserver_url,
            secrets=self.secrets,
            log_dir=self.workdir / "logs",
            name=name or f"aggregator-{port}",
            extra_env={
                **UNLIMITED_RATES,
                "FEDHE_AGGREGATOR_REDIS_URL": self.redis_url,
                "FEDHE_AGGREGATOR_REDIS_KEY_PREFIX": REDIS_KEY_PREFIX,
                "FEDHE_AGGREGATOR_DEADLINE_CHECK_INTERVAL_S": "0.5",
                **(env or {}),
            },
        )
        self.replicas.append((port, process))
        return url(port)

    @property
    def urls(self) -> list[str]:
        return [url(port) for port, _ in self.replicas]

    def admin(self, replica_url: str | None = None) -> AggregatorClient:
        """An aggregator client holding the admin's token (first replica unless told otherwise)."""
        return self.secrets.aggregator_admin(replica_url or self.urls[0])

    def stop(self) -> None:
        for _, process in self.replicas:
            process.stop()
        self.keyserver.stop()


def start_fault_cluster(postgres: PostgresDatabases, workdir: Path, redis_url: str) -> FaultCluster:
    secrets, keyserver, keyserver_url = start_test_keyserver(postgres, workdir, "fedhe_fault_keyserver")
    cluster = FaultCluster(
        workdir, secrets, keyserver_url, postgres.create("fedhe_fault_aggregator"), redis_url, keyserver
    )
    cluster.add_replica(name="aggregator")
    return cluster


@dataclass
class UploadingSite:
    """A provisioned site that uploads chosen plaintext changes to the global model, encrypted for real."""

    site: ProvisionedSite
    codec: UpdateCodec
    key_id: str
    tls: ClientTLS

    def body(self, change: NDArray[np.float64], num_samples: int) -> bytes:
        chunks = self.codec.encrypt_update(weighted_update(change, np.zeros_like(change), num_samples, WEIGHT_SCALE))
        return encode_envelope(
            Envelope(
                format_id=self.codec.format_id,
                key_id=self.key_id,
                num_values=change.size,
                chunks=chunks,
                meta={"num_samples": num_samples, "metrics": {}, "environment": current_environment().model_dump()},
            )
        )

    def post(self, base_url: str, job_id: str, number: int, body: bytes) -> httpx.Response:
        return httpx.post(
            f"{base_url}/v1/jobs/{job_id}/rounds/{number}/updates",
            content=body,
            timeout=60,
            headers={"Authorization": f"Bearer {self.site.credential}"},
            verify=self.tls.ssl_context(),
        )

    def mean_update(self, base_url: str, job_id: str, number: int) -> NDArray[np.float64]:
        """Round ``number``'s published sum, decrypted: the sample-weighted mean change."""
        with AggregatorClient(base_url, self.site.credential, tls=self.tls) as client:
            return decode_aggregate(
                client.aggregate(job_id, number), lambda _, facts: Decryption(self.codec, None, facts.num_inputs)
            ).values


def uploading_federation(
    secrets: ClusterSecrets, keyserver_url: str, aggregator_url: str, directory: Path, num_sites: int, **job: object
) -> tuple[str, list[UploadingSite]]:
    """A federation, ``num_sites`` approved sites holding its secret context (their files in
    ``directory``/job id), and a job on it.

    The sites upload plain encrypted updates, so the job runs without secure aggregation unless
    ``job`` says otherwise: these tests exercise the intake, the sum and the round's rules, which
    secure rounds share; their masks and phases are tested in ``test_secure_aggregation``.
    """
    with secrets.keyserver_admin(keyserver_url) as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="uploading"))
    spec = JobCreate.model_validate(
        {
            "name": "uploading",
            "key_id": federation.key_id,
            "model": MODEL.model_dump(),
            "max_samples_per_round": WEIGHT_SCALE,
            "secure_aggregation": None,
            **job,
        }
    )
    with secrets.aggregator_admin(aggregator_url) as operator:
        job_id = operator.create_job(spec).id
    sites = []
    for index in range(num_sites):
        site = provision_site(
            aggregator_url=aggregator_url,
            keyserver_url=keyserver_url,
            secrets=secrets,
            directory=directory / job_id,
            name=f"s{index}",
            federation_id=federation.id,
        )
        codec = site_codec(keyserver_url, secrets, site, federation.key_id)
        sites.append(UploadingSite(site, codec, federation.key_id, secrets.tls))
    return job_id, sites


def federation_with_job(cluster: FaultCluster, num_sites: int, **job: object) -> tuple[str, list[UploadingSite]]:
    """``uploading_federation`` on the first replica."""
    return uploading_federation(
        cluster.secrets, cluster.keyserver_url, cluster.urls[0], cluster.workdir / "sites", num_sites, **job
    )


def weighted_average(updates: list[tuple[NDArray[np.float64], int]]) -> NDArray[np.float64]:
    weights = np.stack([w for w, _ in updates])
    return np.average(weights, axis=0, weights=[n for _, n in updates])


def fedavg_tolerance(
    updates: list[tuple[NDArray[np.float64], int]], packing: PackingSettings = DEFAULT_PACKING
) -> float:
    """How far the decrypted mean may be from the exact one: the packed sum's error bound (k·Δ)
    scaled back by S / Σ n_k, plus float64 rounding."""
    return packing.sum_error_bound(len(updates)) * WEIGHT_SCALE / sum(n for _, n in updates) + 1e-9


def assert_published_average(
    site: UploadingSite, base_url: str, job_id: str, number: int, updates: list[tuple[NDArray[np.float64], int]]
) -> None:
    """Round ``number``'s published aggregate, decrypted by ``site``, is the weighted average of
    exactly ``updates``, within the codec's error bound (a missing or doubled update is far outside it)."""
    published = site.mean_update(base_url, job_id, number)
    assert np.max(np.abs(published - weighted_average(updates))) <= fedavg_tolerance(updates)
