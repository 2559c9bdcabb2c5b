"""Harvests: which reviewed inspections became data, in which harvest, where their files went.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "harvests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("category", sa.String(128), nullable=False, index=True),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("good", sa.Integer, nullable=False),
        sa.Column("defect", sa.Integer, nullable=False),
        sa.Column("missing", sa.Integer, nullable=False),
        sa.Column("first_record_at", sa.DateTime(timezone=True)),
        sa.Column("last_record_at", sa.DateTime(timezone=True)),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "harvested_records",
        sa.Column("inspection_id", sa.String(32), sa.ForeignKey("inspections.id"), primary_key=True),
        sa.Column("harvest_id", sa.String(32), sa.ForeignKey("harvests.id"), nullable=False, index=True),
        sa.Column("verdict_id", sa.Integer, sa.ForeignKey("verdicts.id"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("path", sa.String(1024)),
    )


def downgrade() -> None:
    op.drop_table("harvested_records")
    op.drop_table("harvests")
