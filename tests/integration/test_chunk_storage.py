"""Ciphertext chunk columns skip Postgres's futile compression attempt (migration 0009)."""

from __future__ import annotations

from pathlib import Path

import psycopg
from sqlalchemy import create_engine, inspect

from aggregator import migrations
from fedhe.migrations import upgrade
from tests.conftest import PostgresDatabases

CHUNK_COLUMNS = ("upload_chunks", "aggregate_chunks")


def test_chunk_data_is_stored_external_on_postgres(postgres: PostgresDatabases) -> None:
    url = postgres.create("fedhe_chunk_storage")
    upgrade(url, "aggregator", migrations)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        storage = dict(
            conn.execute(
                "SELECT c.relname, a.attstorage FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE a.attname = 'data' AND c.relname = ANY(%s)",
                (list(CHUNK_COLUMNS),),
            ).fetchall()
        )
    assert storage == dict.fromkeys(CHUNK_COLUMNS, "e")  # EXTERNAL: out of line, never compressed


def test_the_storage_migration_is_a_no_op_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'aggregator.db'}"
    upgrade(url, "aggregator", migrations)
    engine = create_engine(url)
    try:
        assert set(CHUNK_COLUMNS) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
