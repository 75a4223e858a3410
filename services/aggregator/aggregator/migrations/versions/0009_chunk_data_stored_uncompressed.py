"""chunk data stored out of line without compression (Postgres)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 07:00:00.000000

Ciphertext chunks do not compress: Postgres's default ``EXTENDED`` storage first runs pglz over
each value, and on the packed codec's chunks it scans the whole 61,606 bytes before storing them
uncompressed anyway: about 0.0125 CPU-s per MB inserted, against 0.0027 with ``EXTERNAL``, which
keeps them out of line (TOAST) without the attempt. SQLite has no such setting: nothing to do.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK_TABLES = ("upload_chunks", "aggregate_chunks")


def _set_storage(storage: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in CHUNK_TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN data SET STORAGE {storage}")


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")
