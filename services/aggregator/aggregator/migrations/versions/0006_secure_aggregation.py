"""secure aggregation: advertised keys, rosters, signed upload statements, unmasking answers

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fedhe.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("roster", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("self_mask_seeds", sa.JSON(), nullable=True))
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("statement", sa.JSON(), nullable=True))
    op.create_table(
        "advertisements",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), primary_key=True),
        sa.Column("public_key", sa.String(44), nullable=False),
        sa.Column("signature", sa.String(88), nullable=False),
        sa.Column("at", fedhe.db.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "unmasking_answers",
        sa.Column("round_id", sa.Integer(), sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.id"), primary_key=True),
        sa.Column("shares", sa.JSON(), nullable=False),
        sa.Column("at", fedhe.db.UTCDateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("unmasking_answers")
    op.drop_table("advertisements")
    with op.batch_alter_table("submissions") as batch:
        batch.drop_column("statement")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("self_mask_seeds")
        batch.drop_column("roster")
