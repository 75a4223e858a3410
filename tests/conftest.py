"""Shared fixtures: real Postgres databases per run, real services on loopback, real HE keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.he import CkksParameters, KeyMaterial, create_key_material
from fedhe.local_cluster import ClusterSecrets, ManagedProcess, free_port, start_aggregator, start_keyserver, url

# The suite registers and polls far more than one site would from one address; the rate limits
# themselves are tested on services of their own (tests/integration/test_limits.py).
GENEROUS_LIMITS = {
    f"FEDHE_{service}_{name}": "1000000"
    for service in ("KEYSERVER", "AGGREGATOR")
    for name in ("RATE_LIMIT_PER_ADDRESS", "RATE_LIMIT_PER_CREDENTIAL", "AUTH_FAILURES_PER_ADDRESS")
} | {"FEDHE_AGGREGATOR_REGISTRATIONS_PER_ADDRESS": "1000000", "FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE": "1000000"}

POSTGRES_ADMIN_URL = os.environ.get("FEDHE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def key_material() -> KeyMaterial:
    """One CKKS context with the default parameters (key generation is the slow part)."""
    return create_key_material(CkksParameters())


@dataclass
class PostgresDatabases:
    """Creates databases for this test run and drops them at the end."""

    created: list[str]

    def create(self, prefix: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    """Access to the real Postgres server (the test run fails if it is not up)."""
    databases = PostgresDatabases(created=[])
    yield databases
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        for name in databases.created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Cluster:
    """A keyserver and an aggregator running as processes on loopback against Postgres."""

    keyserver_url: str
    aggregator_url: str
    aggregator_database_url: str
    secrets: ClusterSecrets
    workdir: Path
    keyserver: ManagedProcess
    aggregator: ManagedProcess

    def aggregator_admin(self) -> AggregatorClient:
        """An aggregator client holding the aggregator admin's token."""
        return self.secrets.aggregator_admin(self.aggregator_url)

    def keyserver_admin(self) -> KeyserverClient:
        """A keyserver client holding the keyserver admin's token."""
        return self.secrets.keyserver_admin(self.keyserver_url)


@pytest.fixture(scope="session")
def cluster(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real services, started once per test run."""
    workdir = tmp_path_factory.mktemp("cluster")
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    ks_url, ag_url = url(ks_port), url(ag_port)
    aggregator_db = postgres.create("fedhe_aggregator")
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_keyserver"),
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env=GENEROUS_LIMITS,
    )
    aggregator = start_aggregator(
        port=ag_port,
        database_url=aggregator_db,
        keyserver_url=ks_url,
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env={**GENEROUS_LIMITS, "FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024)},
    )
    try:
        yield Cluster(ks_url, ag_url, aggregator_db, secrets, workdir, keyserver, aggregator)
    finally:
        aggregator.stop()
        keyserver.stop()
