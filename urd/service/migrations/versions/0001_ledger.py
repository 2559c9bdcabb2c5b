"""The ledger: inspections, verdicts, threshold versions, model events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "threshold_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("category", sa.String(128), nullable=False, index=True),
        sa.Column("bundle_digest", sa.String(64), nullable=False),
        sa.Column("review_threshold", sa.Float, nullable=False),
        sa.Column("image_threshold", sa.Float, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("category", sa.String(128), nullable=False, index=True),
        sa.Column("line", sa.String(128)),
        sa.Column("camera", sa.String(128)),
        sa.Column("part_id", sa.String(256)),
        sa.Column("client_key", sa.String(256)),
        sa.Column("image_sha256", sa.String(64), nullable=False, index=True),
        sa.Column("image_width", sa.Integer, nullable=False),
        sa.Column("image_height", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("model_alias", sa.String(64)),
        sa.Column("bundle_digest", sa.String(64), nullable=False),
        sa.Column("threshold_version", sa.Integer, sa.ForeignKey("threshold_versions.id"), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("normalized_score", sa.Float, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False, index=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.UniqueConstraint("category", "client_key", name="uq_inspections_client_key"),
    )
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.String(32), sa.ForeignKey("inspections.id"), nullable=False, index=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("category", sa.String(128), nullable=False, index=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("bundle_digest", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in ("model_events", "verdicts", "inspections", "threshold_versions"):
        op.drop_table(table)
