"""Ciphertext chunks: stored without Postgres's futile compression attempt (migration 0009), and
read back exactly, in binary format on Postgres."""

from __future__ import annotations

import random
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, inspect, text

from aggregator import migrations
from aggregator.repository import AggregatorRepository
from fedhe.db import SessionFactory
from fedhe.errors import NotFound
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


def _chunk_store(url: str) -> SessionFactory:
    """The aggregator's schema at ``url`` with the chunk tables' foreign keys dropped (on SQLite
    they are not enforced without fedhe.db's pragma), so chunks can be stored without a job."""
    upgrade(url, "aggregator", migrations)
    engine = create_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE upload_chunks DROP CONSTRAINT fk_upload_chunks_upload_id_uploads"))
            conn.execute(text("ALTER TABLE aggregate_chunks DROP CONSTRAINT fk_aggregate_chunks_round_id_rounds"))
    return SessionFactory(engine)


def _chunks_read_back(sessions: SessionFactory) -> None:
    rng = random.Random(7)
    uploads = {f"upl-{i}": [rng.randbytes(rng.choice([0, 1, 61_606])) for _ in range(3)] for i in range(4)}
    with sessions.transaction() as session:
        repo = AggregatorRepository(session)
        for upload_id, chunks in uploads.items():
            repo.add_upload_chunks(upload_id, list(enumerate(chunks)))
        repo.put_aggregate_chunk(1, 0, b"\x00sum\xff" * 1000)
    order = ["upl-2", "upl-0", "upl-3"]
    with sessions.transaction() as session:
        repo = AggregatorRepository(session)
        for index in range(3):
            column = repo.upload_chunk_column(order, index)
            assert column == [uploads[upload_id][index] for upload_id in order]
            assert all(type(data) is bytes for data in column)
        with pytest.raises(NotFound):  # an upload swept by the retention period while a sum is redone
            repo.upload_chunk_column(["upl-0", "upl-swept"], 0)
        assert repo.aggregate_chunks(1, 0, 1) == [b"\x00sum\xff" * 1000]
        repo.put_aggregate_chunk(1, 1, b"unflushed")  # read in the same session, before any flush
        assert repo.aggregate_chunks(1, 0, 2) == [b"\x00sum\xff" * 1000, b"unflushed"]
        assert all(type(data) is bytes for data in repo.aggregate_chunks(1, 0, 2))
        with pytest.raises(NotFound):
            repo.aggregate_chunks(1, 1, 3)
    sessions.engine.dispose()


def test_chunks_read_back_exactly_on_postgres(postgres: PostgresDatabases) -> None:
    """On Postgres chunks are fetched in binary format (not hex text); the bytes are the same."""
    _chunks_read_back(_chunk_store(postgres.create("fedhe_chunk_read")))


def test_chunks_read_back_exactly_on_sqlite(tmp_path: Path) -> None:
    _chunks_read_back(_chunk_store(f"sqlite:///{tmp_path / 'aggregator.db'}"))
