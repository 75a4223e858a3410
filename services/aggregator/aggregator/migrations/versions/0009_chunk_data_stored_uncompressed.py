"""chunk data stored out of line without compression (Postgres)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 07:00:00.000000

Ciphertext chunks are uniformly random bytes: Postgres's default ``EXTENDED`` storage first tries
to compress each value (pglz), which never succeeds on them and only costs CPU. ``EXTERNAL``
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
