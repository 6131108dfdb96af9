"""job_history and usage_hourly

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_history",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("uid", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("deployment", sa.Text(), nullable=False),
        sa.Column("variant", sa.Text()),
        sa.Column("worker", sa.Text()),
        sa.Column("task", sa.Text()),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("steps", sa.Integer()),
        sa.Column("num_images", sa.Integer()),
        sa.Column("images", sa.Integer(), server_default="0", nullable=False),
        sa.Column("seed", sa.BigInteger()),
        sa.Column("prompt", sa.Text()),
        sa.Column("queued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queue_seconds", sa.Float()),
        sa.Column("run_seconds", sa.Float()),
        sa.Column("gpus", sa.Float(), server_default="0", nullable=False),
        sa.Column("gpu_type", sa.Text()),
        sa.Column("gpu_seconds", sa.Float(), server_default="0", nullable=False),
        sa.Column("cost", sa.Float(), server_default="0", nullable=False),
        sa.Column("currency", sa.Text()),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("results", postgresql.JSONB(astext_type=sa.Text())),
        sa.Column("text", sa.Text()),
        sa.Column("bulk", sa.Boolean(), server_default="false", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("uid", "attempt", name="uq_job_history_attempt"),
    )
    op.create_index("ix_job_history_tenant_finished", "job_history", ["tenant", "finished_at"])
    op.create_index("ix_job_history_finished", "job_history", ["finished_at"])
    op.create_index("ix_job_history_ns_name", "job_history", ["namespace", "name"])
    op.create_index(
        "ix_job_history_prompt",
        "job_history",
        [sa.text("to_tsvector('simple', coalesce(prompt, ''))")],
        postgresql_using="gin",
    )
    op.create_table(
        "usage_hourly",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("jobs", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("succeeded", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("images", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("gpu_seconds", sa.Float(), server_default="0", nullable=False),
        sa.Column("cost", sa.Float(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("tenant", "model", "hour", name="pk_usage_hourly"),
    )
    op.create_index("ix_usage_hourly_hour", "usage_hourly", ["hour"])


def downgrade() -> None:
    op.drop_table("usage_hourly")
    op.drop_table("job_history")
