"""site sampling per round, the job's privacy plan and warnings, sites' data sizes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 09:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("privacy_plan", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("selected_sites", sa.JSON(), nullable=True))
    with op.batch_alter_table("site_status") as batch:
        batch.add_column(sa.Column("data_size", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("site_status") as batch:
        batch.drop_column("data_size")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("selected_sites")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("warnings")
        batch.drop_column("privacy_plan")
