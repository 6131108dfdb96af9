"""What the API, the CLI and the operator ask of the history store."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, and_, delete, func, literal_column, select

from zimage_history.schema import PROMPT_SEARCH, job_history, usage_hourly

GroupBy = Literal["tenant", "model", "day"]
USAGE_FIELDS = ("attempts", "jobs", "succeeded", "images", "gpu_seconds", "cost")
ERASE_BATCH = 5000


def usage(
    conn: Connection, start: datetime, end: datetime, group_by: GroupBy, tenant: str | None = None
) -> list[dict[str, Any]]:
    """Usage between ``start`` and ``end`` (whole hours: the hour ``start`` falls in is counted), per tenant,
    model (the deployment that ran the attempts) or UTC day, from the hourly sums; ``tenant``: one tenant only."""
    key = {
        "tenant": usage_hourly.c.tenant,
        "model": usage_hourly.c.model,
        "day": func.to_char(func.date_trunc("day", func.timezone("UTC", usage_hourly.c.hour)), "YYYY-MM-DD"),
    }[group_by].label("key")
    where = [usage_hourly.c.hour >= func.date_trunc("hour", start), usage_hourly.c.hour < end]
    if tenant is not None:
        where.append(usage_hourly.c.tenant == tenant)
    stmt = (
        select(key, *(func.sum(getattr(usage_hourly.c, f)).label(f) for f in USAGE_FIELDS))
        .where(and_(*where))
        .group_by(literal_column("key"))
        .order_by(literal_column("key"))
    )
    return [
        {
            "key": row.key,
            **{
                f: (float(getattr(row, f)) if f in ("gpu_seconds", "cost") else int(getattr(row, f)))
                for f in USAGE_FIELDS
            },
        }
        for row in conn.execute(stmt)
    ]


def list_jobs(
    conn: Connection,
    *,
    tenant: str | None = None,
    namespace: str | None = None,
    model: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    text: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
) -> list[dict[str, Any]]:
    """Jobs' final outcomes, newest first (``before_id``: the next page after the last id seen)."""
    h = job_history.c
    where = [h.outcome != "retrying"]
    for column, value in ((h.tenant, tenant), (h.namespace, namespace), (h.model, model), (h.outcome, outcome)):
        if value is not None:
            where.append(column == value)
    if since is not None:
        where.append(h.finished_at >= since)
    if until is not None:
        where.append(h.finished_at < until)
    if text:
        where.append(PROMPT_SEARCH.op("@@")(func.plainto_tsquery(literal_column("'simple'"), text)))
    if before_id is not None:
        where.append(h.id < before_id)
    stmt = select(job_history).where(and_(*where)).order_by(h.id.desc()).limit(limit)
    return [dict(row._mapping) for row in conn.execute(stmt)]


def get_job(conn: Connection, namespace: str, name: str, tenant: str | None = None) -> dict[str, Any] | None:
    """The last final outcome of the job named so (a name is reused only after the job is gone)."""
    h = job_history.c
    where = [h.namespace == namespace, h.name == name, h.outcome != "retrying"]
    if tenant is not None:
        where.append(h.tenant == tenant)
    row = conn.execute(select(job_history).where(and_(*where)).order_by(h.id.desc()).limit(1)).first()
    return dict(row._mapping) if row is not None else None


def attempts(conn: Connection, uid: str) -> list[dict[str, Any]]:
    stmt = select(job_history).where(job_history.c.uid == uid).order_by(job_history.c.attempt)
    return [dict(row._mapping) for row in conn.execute(stmt)]


def erase_some(conn: Connection, tenant: str, limit: int = ERASE_BATCH) -> tuple[int, list[str]]:
    """Delete up to ``limit`` of a tenant's rows: how many, and the image URIs they named (for the caller to
    delete from the store). The hourly usage sums stay (no prompt or image in them)."""
    ids = select(job_history.c.id).where(job_history.c.tenant == tenant).limit(limit).scalar_subquery()
    gone = conn.execute(delete(job_history).where(job_history.c.id.in_(ids)).returning(job_history.c.results)).all()
    uris = [r["uri"] for (results,) in gone for r in results or [] if isinstance(r, dict) and r.get("uri")]
    return len(gone), uris


def purge_some(conn: Connection, before: datetime, limit: int = ERASE_BATCH) -> int:
    """Delete up to ``limit`` rows finished before ``before`` (retention)."""
    ids = select(job_history.c.id).where(job_history.c.finished_at < before).limit(limit).scalar_subquery()
    return len(conn.execute(delete(job_history).where(job_history.c.id.in_(ids)).returning(job_history.c.id)).all())


def purge_usage(conn: Connection, before: datetime) -> int:
    result = conn.execute(delete(usage_hourly).where(usage_hourly.c.hour < before))
    return int(result.rowcount or 0)
