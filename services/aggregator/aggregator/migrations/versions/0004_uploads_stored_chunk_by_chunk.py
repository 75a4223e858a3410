"""uploads stored chunk by chunk

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 08:48:48.680193
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import fedhe.db
from fedhe.he.envelope import decode_envelope

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "aggregate_chunks",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_aggregate_chunks_round_id_rounds")),
        sa.PrimaryKeyConstraint("round_id", "index", name=op.f("pk_aggregate_chunks")),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("num_chunks", sa.Integer(), nullable=False),
        sa.Column("created_at", fedhe.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_uploads_round_id_rounds")),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_uploads_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_uploads_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_uploads_round_id"), ["round_id"], unique=False)

    op.create_table(
        "upload_chunks",
        sa.Column("upload_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["upload_id"], ["uploads.id"], name=op.f("fk_upload_chunks_upload_id_uploads"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("upload_id", "index", name=op.f("pk_upload_chunks")),
    )
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upload_id", sa.String(length=32), nullable=True))
    _move_envelopes_into_chunks()
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_column("running_sum")

    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.alter_column("upload_id", existing_type=sa.String(length=32), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_submissions_upload_id"), ["upload_id"])
        batch_op.create_foreign_key(batch_op.f("fk_submissions_upload_id_uploads"), "uploads", ["upload_id"], ["id"])
        batch_op.drop_column("envelope")


def _move_envelopes_into_chunks() -> None:
    """Whole stored envelopes and running sums become chunk rows (the layout uploads now stream into)."""
    bind = op.get_bind()
    submissions = bind.execute(sa.text("SELECT id, round_id, site_id, envelope FROM submissions")).all()
    for submission_id, round_id, site_id, envelope in submissions:
        chunks = decode_envelope(bytes(envelope)).chunks
        upload_id = f"migrated-{submission_id}"
        bind.execute(
            sa.text(
                "INSERT INTO uploads (id, round_id, site_id, num_chunks, created_at) "
                "VALUES (:id, :round, :site, :n, CURRENT_TIMESTAMP)"
            ),
            {"id": upload_id, "round": round_id, "site": site_id, "n": len(chunks)},
        )
        for index, data in enumerate(chunks):
            bind.execute(
                sa.text('INSERT INTO upload_chunks (upload_id, "index", data) VALUES (:u, :i, :d)'),
                {"u": upload_id, "i": index, "d": data},
            )
        bind.execute(
            sa.text("UPDATE submissions SET upload_id = :u WHERE id = :s"), {"u": upload_id, "s": submission_id}
        )
    sums = bind.execute(sa.text("SELECT id, running_sum FROM rounds WHERE state = 'published'")).all()
    for round_id, running_sum in sums:
        for index, data in enumerate(decode_envelope(bytes(running_sum)).chunks if running_sum else []):
            bind.execute(
                sa.text('INSERT INTO aggregate_chunks (round_id, "index", data) VALUES (:r, :i, :d)'),
                {"r": round_id, "i": index, "d": data},
            )


def downgrade() -> None:
    # Going back drops the chunked uploads: the earlier schema kept whole envelopes, and this
    # revision does not rebuild them.
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("envelope", sa.LargeBinary(), nullable=False, server_default=sa.text("''")))
        batch_op.drop_constraint(batch_op.f("fk_submissions_upload_id_uploads"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("uq_submissions_upload_id"), type_="unique")
        batch_op.drop_column("upload_id")

    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("running_sum", sa.LargeBinary(), nullable=True))

    op.drop_table("upload_chunks")
    with op.batch_alter_table("uploads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_uploads_round_id"))
        batch_op.drop_index(batch_op.f("ix_uploads_created_at"))

    op.drop_table("uploads")
    op.drop_table("aggregate_chunks")
