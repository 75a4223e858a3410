"""Alembic migrations build exactly the schema the code declares, on real Postgres."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine

from aggregator.tables import AggregatorBase
from fedhe.migrations import Service, upgrade, version_table
from keyserver.tables import KeyserverBase
from tests.conftest import PostgresDatabases

METADATA: dict[Service, MetaData] = {"aggregator": AggregatorBase.metadata, "keyserver": KeyserverBase.metadata}


@pytest.mark.parametrize("service", ["aggregator", "keyserver"])
def test_upgrade_matches_the_declared_schema_and_is_idempotent(postgres: PostgresDatabases, service: Service) -> None:
    url = postgres.create(f"fedhe_migrate_{service}")
    upgrade(url, service)
    upgrade(url, service)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": version_table(service), "compare_type": True}
            )
            assert compare_metadata(context, METADATA[service]) == []
    finally:
        engine.dispose()
