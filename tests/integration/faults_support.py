"""Support for fault and replica tests: an own Redis server, clusters on demand, uploading sites."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from numpy.typing import NDArray

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.global_model import decode_global_model, scale_for_upload
from fedhe.he import Envelope, UpdateCodec, encode_envelope
from fedhe.local_cluster import (
    ClusterSecrets,
    ManagedProcess,
    ProvisionedSite,
    free_port,
    provision_site,
    start_aggregator,
    start_keyserver,
)
from fedhe.modelspec import ModelSpec
from fedhe.schemas import FederationCreate, JobCreate
from tests.conftest import PostgresDatabases
from tests.integration.helpers import site_codec

WEIGHT_SCALE = 10_000
MODEL = ModelSpec(input_dim=50, num_classes=2)  # 102 parameters
FEDAVG_TOLERANCE = 1e-6


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

    def add_replica(self, port: int | None = None, name: str | None = None) -> str:
        port = port or free_port()
        process = start_aggregator(
            port=port,
            database_url=self.database_url,
            keyserver_url=self.keyserver_url,
            secrets=self.secrets,
            log_dir=self.workdir / "logs",
            name=name or f"aggregator-{port}",
            extra_env={
                "FEDHE_AGGREGATOR_REDIS_URL": self.redis_url,
                "FEDHE_AGGREGATOR_DEADLINE_CHECK_INTERVAL_S": "0.5",
            },
        )
        self.replicas.append((port, process))
        return f"http://127.0.0.1:{port}"

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port, _ in self.replicas]

    def stop(self) -> None:
        for _, process in self.replicas:
            process.stop()
        self.keyserver.stop()


def start_fault_cluster(postgres: PostgresDatabases, workdir: Path, redis_url: str) -> FaultCluster:
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_fault_ks"),
        aggregator_url=f"http://127.0.0.1:{ag_port}",
        secrets=secrets,
        log_dir=workdir / "logs",
    )
    cluster = FaultCluster(
        workdir, secrets, f"http://127.0.0.1:{ks_port}", postgres.create("fedhe_fault_ag"), redis_url, keyserver
    )
    cluster.add_replica(ag_port, name="aggregator")
    return cluster


@dataclass
class UploadingSite:
    """A provisioned site that uploads chosen plaintext weights, encrypted for real."""

    site: ProvisionedSite
    codec: UpdateCodec
    key_id: str

    def body(self, weights: NDArray[np.float64], num_samples: int) -> bytes:
        chunks = self.codec.encrypt_update(scale_for_upload(weights, num_samples, WEIGHT_SCALE))
        return encode_envelope(
            Envelope(
                format_id=self.codec.format_id,
                key_id=self.key_id,
                num_values=weights.size,
                chunks=chunks,
                meta={"num_samples": num_samples, "metrics": {}},
            )
        )

    def post(self, url: str, job_id: str, number: int, body: bytes) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/jobs/{job_id}/rounds/{number}/updates",
            content=body,
            timeout=60,
            headers={"Authorization": f"Bearer {self.site.credential}"},
        )

    def global_model(self, url: str, job_id: str, number: int) -> NDArray[np.float64]:
        with AggregatorClient(url, self.site.credential) as client:
            return decode_global_model(client.model(job_id, number), lambda env: self.codec)


def federation_with_job(cluster: FaultCluster, num_sites: int, **job: object) -> tuple[str, list[UploadingSite]]:
    """A federation, ``num_sites`` approved sites holding its secret context, and a job on it."""
    operator_token = cluster.secrets.operator_token
    with KeyserverClient(cluster.keyserver_url, operator_token) as keyserver:
        key_id = keyserver.create_federation(FederationCreate(name="faults")).key_id
    spec = JobCreate.model_validate(
        {"name": "faults", "key_id": key_id, "model": MODEL.model_dump(), "max_samples_per_round": WEIGHT_SCALE, **job}
    )
    with AggregatorClient(cluster.urls[0], operator_token) as operator:
        job_id = operator.create_job(spec).id
    sites = []
    for index in range(num_sites):
        site = provision_site(cluster.urls[0], operator_token, cluster.workdir / "sites" / job_id, f"s{index}")
        sites.append(UploadingSite(site, site_codec(cluster.keyserver_url, site, key_id), key_id))
    return job_id, sites


def weighted_average(updates: list[tuple[NDArray[np.float64], int]]) -> NDArray[np.float64]:
    weights = np.stack([w for w, _ in updates])
    return np.average(weights, axis=0, weights=[n for _, n in updates])


def assert_published_average(
    site: UploadingSite, url: str, job_id: str, number: int, updates: list[tuple[NDArray[np.float64], int]]
) -> None:
    """Round ``number``'s published aggregate, decrypted by ``site``, is the weighted average of
    exactly ``updates``, within the stated FedAvg tolerance."""
    published = site.global_model(url, job_id, number + 1)
    assert np.max(np.abs(published - weighted_average(updates))) <= FEDAVG_TOLERANCE
