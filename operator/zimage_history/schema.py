"""The history tables. Alembic's migrations (``migrations/versions``) must build exactly this: a test compares
them with Alembic's own autogenerate diff.

``job_history``: one row per attempt outcome (``uid``, ``attempt``): a retried attempt, and the final
succeeded, failed or cancelled one (attempt 0: cancelled before it ran). Times are UTC.

``usage_hourly``: the same rows summed per tenant, model and hour, kept up to date in the transaction that
inserts them, so usage over months reads a few thousand rows instead of millions. It keeps no prompt or image,
so erasing a tenant's data (rows and images) leaves the billing totals.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

job_history = Table(
    "job_history",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("uid", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("tenant", Text, nullable=False),
    Column("namespace", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("model", Text, nullable=False),  # the ImageJob's spec.model
    Column("deployment", Text, nullable=False),  # the ModelDeployment that ran the attempt (a fallback's too)
    Column("variant", Text),
    Column("worker", Text),
    Column("task", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("steps", Integer),
    Column("num_images", Integer),  # asked for
    Column("images", Integer, nullable=False, server_default="0"),  # made (results)
    Column("seed", BigInteger),
    Column("prompt", Text),
    Column("queued_at", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("queue_seconds", Float),
    Column("run_seconds", Float),
    Column("gpus", Float, nullable=False, server_default="0"),
    Column("gpu_type", Text),
    Column("gpu_seconds", Float, nullable=False, server_default="0"),
    Column("cost", Float, nullable=False, server_default="0"),
    Column("currency", Text),
    Column("outcome", Text, nullable=False),  # succeeded | failed | cancelled | retrying
    Column("reason", Text),
    Column("results", JSONB),  # [{uri, width, height, seed, sha256, bytes}]
    Column("text", Text),  # a text step's answer
    Column("bulk", Boolean, nullable=False, server_default="false"),
    UniqueConstraint("uid", "attempt", name="uq_job_history_attempt"),
    Index("ix_job_history_tenant_finished", "tenant", "finished_at"),
    Index("ix_job_history_finished", "finished_at"),
    Index("ix_job_history_ns_name", "namespace", "name"),
)
# Text search in prompts (``queries.list_jobs(text=...)``): the simple configuration, no stemming or stop words.
PROMPT_SEARCH = func.to_tsvector(literal_column("'simple'"), func.coalesce(job_history.c.prompt, ""))
Index("ix_job_history_prompt", PROMPT_SEARCH, postgresql_using="gin", _table=job_history)

usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("model", Text, nullable=False),  # the deployment that ran the attempts
    Column("hour", DateTime(timezone=True), nullable=False),
    Column("attempts", BigInteger, nullable=False, server_default="0"),
    Column("jobs", BigInteger, nullable=False, server_default="0"),  # final outcomes
    Column("succeeded", BigInteger, nullable=False, server_default="0"),
    Column("images", BigInteger, nullable=False, server_default="0"),
    Column("gpu_seconds", Float, nullable=False, server_default="0"),
    Column("cost", Float, nullable=False, server_default="0"),
    PrimaryKeyConstraint("tenant", "model", "hour", name="pk_usage_hourly"),
    Index("ix_usage_hourly_hour", "hour"),
)
