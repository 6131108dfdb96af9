"""Engines and migrations. Every connection has a connect timeout and a statement timeout, so a PostgreSQL that
hangs fails a pass (which the supervised loop retries with backoff) instead of blocking it."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url

from zimage_history.rows import HistoryRow
from zimage_history.schema import job_history, usage_hourly

MIGRATIONS = Path(__file__).parent / "migrations"
# Held while migrating: replicas (and `zimage-operator migrate`) starting together take turns.
MIGRATION_LOCK = 0x7A696D616765  # "zimage"


def database_url(url: str, password: str | None = None) -> Any:
    """The URL with the psycopg 3 driver and the password (from its own Secret key, never logged) set."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if password:
        u = u.set(password=password)
    return u


def connect(
    url: str,
    password: str | None = None,
    *,
    connect_timeout: int = 5,
    statement_timeout_ms: int = 30_000,
    pool_size: int = 4,
) -> Engine:
    return create_engine(
        database_url(url, password),
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=connect_timeout,
        connect_args={
            "connect_timeout": connect_timeout,
            "options": f"-c statement_timeout={statement_timeout_ms}",
            "application_name": "zimage",
        },
    )


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (idempotent; concurrent callers wait for each other)."""
    from alembic import command

    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev: str | None = MigrationContext.configure(conn).get_current_revision()
        return rev


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def row_values(row: HistoryRow) -> dict[str, Any]:
    data = row.model_dump()
    for name in ("queued_at", "started_at", "finished_at"):
        data[name] = _ts(data[name])
    return data


def hour_of(ts: float) -> datetime:
    return datetime.fromtimestamp(ts - ts % 3600, UTC)


def _typed(sums: dict[str, float]) -> dict[str, float | int]:
    return {k: (v if k in ("gpu_seconds", "cost") else int(v)) for k, v in sums.items()}


def insert_rows(conn: Connection, rows: list[HistoryRow]) -> list[HistoryRow]:
    """Insert the rows not there yet (by uid and attempt) and add them to the hourly usage, in the caller's
    transaction; the rows inserted."""
    unique = {(r.uid, r.attempt): r for r in rows}
    if not unique:
        return []
    # Rows as parameters of one cached statement (executemany: psycopg pipelines it, SQLAlchemy batches the
    # RETURNING), not one statement with every value in it, which is compiled afresh each time.
    stmt = (
        pg_insert(job_history)
        .on_conflict_do_nothing(constraint="uq_job_history_attempt")
        .returning(job_history.c.uid, job_history.c.attempt)
    )
    inserted = {(uid, attempt) for uid, attempt in conn.execute(stmt, [row_values(r) for r in unique.values()])}
    new = [r for key, r in unique.items() if key in inserted]
    sums: dict[tuple[str, str, datetime], dict[str, float]] = defaultdict(
        lambda: dict.fromkeys(("attempts", "jobs", "succeeded", "images", "gpu_seconds", "cost"), 0.0)
    )
    for r in new:
        s = sums[(r.tenant, r.deployment, hour_of(r.finished_at))]
        s["attempts"] += 1
        s["jobs"] += r.final
        s["succeeded"] += r.outcome == "succeeded"
        s["images"] += r.images
        s["gpu_seconds"] += r.gpu_seconds
        s["cost"] += r.cost
    if sums:
        up = pg_insert(usage_hourly)
        conn.execute(
            up.on_conflict_do_update(
                constraint="pk_usage_hourly",
                set_={c: getattr(usage_hourly.c, c) + getattr(up.excluded, c) for c in next(iter(sums.values()))},
            ),
            [{"tenant": t, "model": m, "hour": h, **_typed(s)} for (t, m, h), s in sums.items()],
        )
    return new
