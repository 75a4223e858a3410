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
from fedhe.local_cluster import ClusterSecrets, ManagedProcess, free_port, start_aggregator, start_keyserver

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

    def operator_aggregator(self) -> AggregatorClient:
        """An aggregator client holding the operator credential."""
        return AggregatorClient(self.aggregator_url, self.secrets.operator_token)

    def operator_keyserver(self) -> KeyserverClient:
        """A keyserver client holding the operator credential."""
        return KeyserverClient(self.keyserver_url, self.secrets.operator_token)


@pytest.fixture(scope="session")
def cluster(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real services, started once per test run."""
    workdir = tmp_path_factory.mktemp("cluster")
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    ks_url, ag_url = f"http://127.0.0.1:{ks_port}", f"http://127.0.0.1:{ag_port}"
    aggregator_db = postgres.create("fedhe_aggregator")
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_keyserver"),
        aggregator_url=ag_url,
        secrets=secrets,
        log_dir=workdir / "logs",
    )
    aggregator = start_aggregator(
        port=ag_port,
        database_url=aggregator_db,
        keyserver_url=ks_url,
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env={"FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024)},
    )
    try:
        yield Cluster(ks_url, ag_url, aggregator_db, secrets, workdir, keyserver, aggregator)
    finally:
        aggregator.stop()
        keyserver.stop()
