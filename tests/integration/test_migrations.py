"""Alembic migrations build exactly the schema the code declares, on real Postgres."""

from __future__ import annotations

from types import ModuleType

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine

from aggregator import migrations as aggregator_migrations
from aggregator.tables import AggregatorBase
from fedhe.migrations import upgrade, version_table
from keyserver import migrations as keyserver_migrations
from keyserver.tables import KeyserverBase
from tests.conftest import PostgresDatabases

SCHEMAS: dict[str, tuple[MetaData, ModuleType]] = {
    "aggregator": (AggregatorBase.metadata, aggregator_migrations),
    "keyserver": (KeyserverBase.metadata, keyserver_migrations),
}


@pytest.mark.parametrize("service", ["aggregator", "keyserver"])
def test_upgrade_matches_the_declared_schema_and_is_idempotent(postgres: PostgresDatabases, service: str) -> None:
    url = postgres.create(f"fedhe_migrate_{service}")
    metadata, scripts = SCHEMAS[service]
    upgrade(url, service, scripts)
    upgrade(url, service, scripts)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": version_table(service), "compare_type": True}
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
