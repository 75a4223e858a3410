"""Shared fixtures: real Postgres databases per run, real services on loopback, real HE keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.he import CkksParameters, KeyMaterial, create_key_material
from fedhe_demo.local_cluster import (
    UNLIMITED_RATES,
    ClusterSecrets,
    ManagedProcess,
    ProvisionedSite,
    free_port,
    provision_site,
    start_agent,
    start_aggregator,
    start_keyserver,
    url,
)

POSTGRES_ADMIN_URL = os.environ.get("FEDHE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Each folder's tier, set here once for every test in it (so `-m "not integration"` leaves out every
# real-process test, not only those whose file remembered a pytestmark). `make test-unit` deselects
# all three; `make test-integration` selects the first.
FOLDER_MARKERS = {"integration": "integration", "browser": "browser", "deploy": "deploy"}
TESTS_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its folder's tier before `-m` selects (hence tryfirst)."""
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(TESTS_DIR) and (marker := FOLDER_MARKERS.get(path.relative_to(TESTS_DIR).parts[0])):
            item.add_marker(marker)


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

    def start_agent(
        self,
        site: ProvisionedSite,
        name: str,
        *,
        data_path: Path,
        state_dir: Path,
        job_id: str,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """``site``'s agent following ``job_id`` on this cluster, exiting when the job ends."""
        return start_agent(
            site=site,
            name=name,
            aggregator_url=self.aggregator_url,
            keyserver_url=self.keyserver_url,
            secrets=self.secrets,
            data_path=data_path,
            state_dir=state_dir,
            job_id=job_id,
            log_dir=log_dir,
            extra_env=extra_env,
        )

    def provision_site(self, directory: Path, name: str, federation_id: str | None) -> ProvisionedSite:
        """A site registered and approved here, its files in ``directory``; a member of ``federation_id`` if given."""
        return provision_site(
            aggregator_url=self.aggregator_url,
            keyserver_url=self.keyserver_url,
            secrets=self.secrets,
            directory=directory,
            name=name,
            federation_id=federation_id,
        )


def start_test_keyserver(
    postgres: PostgresDatabases, workdir: Path, database_prefix: str
) -> tuple[ClusterSecrets, ManagedProcess, str]:
    """Fresh secrets in ``workdir`` and a keyserver on them with a new database: secrets, process, URL."""
    secrets = ClusterSecrets.generate(workdir / "secrets")
    port = free_port()
    keyserver = start_keyserver(
        port=port,
        database_url=postgres.create(database_prefix),
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env=UNLIMITED_RATES,
    )
    return secrets, keyserver, url(port)


@contextmanager
def running_cluster(
    postgres: PostgresDatabases,
    workdir: Path,
    *,
    database_prefix: str = "fedhe",
    aggregator_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A keyserver and an aggregator with databases of their own, stopped on leaving."""
    secrets, keyserver, keyserver_url = start_test_keyserver(postgres, workdir, f"{database_prefix}_keyserver")
    try:
        aggregator_db = postgres.create(f"{database_prefix}_aggregator")
        port = free_port()
        aggregator = start_aggregator(
            port=port,
            database_url=aggregator_db,
            keyserver_url=keyserver_url,
            secrets=secrets,
            log_dir=workdir / "logs",
            extra_env={**UNLIMITED_RATES, **(aggregator_env or {})},
        )
        try:
            yield Cluster(keyserver_url, url(port), aggregator_db, secrets, workdir, keyserver, aggregator)
        finally:
            aggregator.stop()
    finally:
        keyserver.stop()


@pytest.fixture(scope="session")
def cluster(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real services, started once per test run."""
    upload_limit = {"FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024)}
    with running_cluster(postgres, tmp_path_factory.mktemp("cluster"), aggregator_env=upload_limit) as started:
        yield started
