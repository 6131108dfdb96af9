"""The history store on a real PostgreSQL (and a real Redis for the outbox): migrations match the tables, rows
are written once per uid and attempt with their hourly sums, the writer survives an outage without losing a
row, and the queries (usage, listing, text search, erasure, retention) answer from it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from zimage_history import db, queries
from zimage_history.outbox import Outbox, throughput, usage_since
from zimage_history.rows import HistoryRow
from zimage_history.schema import job_history, metadata
from zimage_history.writer import HistoryWriter
from zimage_queue import keys

NOW = time.time()


def row(uid: str, attempt: int = 1, outcome: str = "succeeded", **kw: Any) -> HistoryRow:
    data: dict[str, Any] = {
        "uid": uid, "attempt": attempt, "tenant": "acme", "namespace": "team-a", "name": uid, "model": "turbo",
        "deployment": "turbo", "finished_at": NOW, "outcome": outcome, "gpu_seconds": 2.0, "cost": 0.5,
        "images": 1 if outcome == "succeeded" else 0, "prompt": f"a photo of {uid}",
        "results": [{"uri": f"file:///img/{uid}.png"}] if outcome == "succeeded" else None,
    }  # fmt: skip
    return HistoryRow(**{**data, **kw})


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def indexes(engine: Any) -> dict[str, str]:
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
        )
        return {name: definition for name, definition in found}


def test_the_migrations_build_exactly_the_tables(history_url: str, postgres_server: Any) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = db.connect(history_url)
    db.migrate(engine)
    db.migrate(engine)  # again: nothing to do
    assert db.current_revision(engine) == "0001"
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []
    # Alembic leaves expression indexes (the prompt search) out of its diff: every index, compared as the server
    # spells it, against the tables made straight from the schema.
    with psycopg.connect(postgres_server.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("CREATE DATABASE from_schema")
    direct = db.connect(postgres_server.url.rsplit("/", 1)[0] + "/from_schema")
    try:
        metadata.create_all(direct)
        assert indexes(engine) == indexes(direct)
        assert "ix_job_history_prompt" in indexes(direct)
    finally:
        direct.dispose()
        with psycopg.connect(postgres_server.url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("DROP DATABASE from_schema")


def test_rows_are_written_once_per_attempt_and_summed_per_hour(history_url: str) -> None:
    engine = db.connect(history_url)
    db.migrate(engine)
    batch = [row("a", 1, "retrying"), row("a", 2), row("b"), row("c", 1, "failed", tenant="other")]
    with engine.begin() as conn:
        assert len(db.insert_rows(conn, [*batch, row("b")])) == 4  # a repeat in the same batch counts once
    with engine.begin() as conn:
        assert db.insert_rows(conn, [row("a", 2), row("b"), row("d")]) == [row("d")]  # only the new one
    start, end = datetime.fromtimestamp(NOW - 7200, UTC), datetime.fromtimestamp(NOW + 3600, UTC)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(job_history)).scalar() == 5
        by_tenant = {u["key"]: u for u in queries.usage(conn, start, end, "tenant")}
        mine = queries.usage(conn, start, end, "day", tenant="acme")
    assert by_tenant["acme"] == {
        "key": "acme", "attempts": 4, "jobs": 3, "succeeded": 3, "images": 3, "gpu_seconds": 8.0, "cost": 2.0,
    }  # fmt: skip
    assert (by_tenant["other"]["jobs"], by_tenant["other"]["succeeded"]) == (1, 0)
    assert [u["key"] for u in mine] == [datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%d")]


def test_the_writer_keeps_rows_in_redis_while_postgres_is_down(
    redis_url: str, postgres_server: Any, history_url: str
) -> None:
    r = redis.Redis.from_url(redis_url)
    outbox = Outbox(r)
    writer = HistoryWriter(outbox, db.connect(history_url, connect_timeout=2), batch=3)
    before = counter("zimage_gpu_seconds_total", tenant="acme", model="turbo")
    outbox.put([row(f"j{i}") for i in range(5)])
    assert writer.write_some() == 3 and outbox.length() == 2
    postgres_server.stop()
    try:
        outbox.put([row(f"k{i}") for i in range(4)])  # jobs go on finishing while the store is away
        with pytest.raises(OperationalError):
            writer.write_some()
        assert outbox.length() == 6  # nothing lost, nothing deleted
    finally:
        postgres_server.start()
    while writer.write_some():
        pass
    assert outbox.length() == 0
    with writer.engine.connect() as conn:
        names = sorted(r["name"] for r in queries.list_jobs(conn, limit=100))
    assert names == sorted([f"j{i}" for i in range(5)] + [f"k{i}" for i in range(4)])
    # counted once each, by the writer, as inserted
    assert counter("zimage_gpu_seconds_total", tenant="acme", model="turbo") - before == pytest.approx(18.0)
    # and the daily counters the quotas read
    day = datetime.fromtimestamp(NOW, UTC).strftime("%Y%m%d")
    assert usage_since(r, "acme", [day])[keys.USAGE_GPU_SECONDS] == pytest.approx(18.0)


def test_an_entry_that_does_not_parse_is_dropped_not_retried_forever(redis_url: str, history_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    outbox = Outbox(r)
    r.xadd(keys.HISTORY_OUTBOX, {keys.HISTORY_FIELD: b'{"uid": "x"}'})
    outbox.put([row("good")])
    writer = HistoryWriter(outbox, db.connect(history_url))
    assert writer.write_some() == 2 and outbox.length() == 0
    with writer.engine.connect() as conn:
        assert [j["name"] for j in queries.list_jobs(conn)] == ["good"]


def test_listing_search_erasure_and_retention(history_url: str) -> None:
    engine = db.connect(history_url)
    db.migrate(engine)
    old = NOW - 100 * 86400
    with engine.begin() as conn:
        db.insert_rows(
            conn,
            [
                row("fox", 1, "retrying"), row("fox", 2, prompt="a red fox in the snow"),
                row("cat", model="base", prompt="a black cat"), row("old", finished_at=old),
                row("theirs", tenant="other", prompt="a red fox too"),
            ],
        )  # fmt: skip
    with engine.connect() as conn:
        assert [j["name"] for j in queries.list_jobs(conn, tenant="acme")] == ["old", "cat", "fox"]
        assert [j["name"] for j in queries.list_jobs(conn, tenant="acme", text="fox")] == ["fox"]
        assert [j["name"] for j in queries.list_jobs(conn, text="red fox")] == ["theirs", "fox"]
        assert [j["name"] for j in queries.list_jobs(conn, model="base")] == ["cat"]
        since = datetime.fromtimestamp(NOW - 86400, UTC)
        assert "old" not in [j["name"] for j in queries.list_jobs(conn, since=since)]
        page = queries.list_jobs(conn, tenant="acme", limit=2)
        assert [j["name"] for j in queries.list_jobs(conn, tenant="acme", before_id=page[-1]["id"])] == ["fox"]
        found = queries.get_job(conn, "team-a", "fox", tenant="acme")
        assert found is not None and found["attempt"] == 2
        assert queries.get_job(conn, "team-a", "fox", tenant="other") is None
        assert len(queries.attempts(conn, found["uid"])) == 2
    writer = HistoryWriter(Outbox(None), engine, retention_days=90)
    writer.migrated = True
    assert writer.purge() == 1 and writer.purge() == 0  # once an hour
    with engine.begin() as conn:
        n, uris = queries.erase_some(conn, "acme")
    assert n == 3 and sorted(uris) == ["file:///img/cat.png", "file:///img/fox.png"]
    with engine.connect() as conn:
        assert [j["tenant"] for j in queries.list_jobs(conn)] == ["other"]
        # the hourly sums stay: billing survives an erasure
        start = datetime.fromtimestamp(NOW, UTC) - timedelta(days=200)
        assert {u["key"] for u in queries.usage(conn, start, datetime.now(UTC) + timedelta(hours=1), "tenant")} == {
            "acme", "other"
        }  # fmt: skip


def test_bulk_jobs_are_recorded_from_the_object_the_api_keeps(redis_url: str) -> None:
    """Bulk jobs have no ImageJob: the operator builds their rows from the object the API keeps in Redis, for the
    events of its shard only, and skips jobs whose object is gone."""
    import asyncio
    import json
    from types import SimpleNamespace

    from zimage_operator.history import record_bulk
    from zimage_queue import JobEvent

    r = redis.Redis.from_url(redis_url)
    obj = {
        "metadata": {"name": "b1", "namespace": "team-a", "uid": "u-b1", "labels": {"zimage.dev/tenant": "acme"}},
        "spec": {"model": "turbo", "prompt": "a bulk fox", "width": 64, "height": 64, "seed": 3},
    }
    r.hset(keys.bulk_job("team-a", "b1"), keys.F_BULK_OBJECT, json.dumps(obj))
    outbox = Outbox(r)
    owns = SimpleNamespace(decided=lambda ev: ev.namespace == "team-a")
    kept = {("u-b1", 1): {"batchImages": 2}}  # what the worker kept of the attempt (JobQueue.usage)
    queue = SimpleNamespace(r=r, usage=lambda attempts: {a: kept[a] for a in attempts if a in kept})
    rt = SimpleNamespace(history=outbox, owns=owns, queue=queue, model=lambda ns, name: None)

    def ev(name: str, uid: str, namespace: str = "team-a") -> JobEvent:
        return JobEvent(type="succeeded", uid=uid, namespace=namespace, name=name, attempt=1, bulk=True,
                        run_seconds=2.0)  # fmt: skip

    progress = JobEvent(type="progress", uid="u-b1", namespace="team-a", name="b1", attempt=1, bulk=True)
    evs = [progress, ev("b1", "u-b1"), ev("gone", "u-gone"), ev("b9", "u-b9", namespace="elsewhere")]
    asyncio.run(record_bulk(rt, evs))  # type: ignore[arg-type]
    _, rows = outbox.oldest(10)
    assert [(x.name, x.tenant, x.prompt, x.seed, x.gpu_seconds, x.bulk) for x in rows] == [
        ("b1", "acme", "a bulk fox", 3, 1.0, True)
    ]


def test_jobs_that_ended_are_counted_per_deployment_and_minute(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    minute = datetime(2025, 3, 1, 12, 30, tzinfo=UTC).timestamp()
    Outbox(r, store=False).put(
        [
            row("a", finished_at=minute + 5, images=2),
            row("b", finished_at=minute + 59, outcome="failed"),
            row("c", finished_at=minute + 10, outcome="retrying"),  # not a job that ended: not counted
            row("d", finished_at=minute - 120, images=1),
            row("e", finished_at=minute + 1, deployment="base", images=4),
            row("f", finished_at=minute + 1, namespace="team-b", images=8),
        ]
    )
    seen = throughput(r, "team-a", "turbo", minute + 30, minutes=4)
    assert [(m.start.strftime("%H:%M"), m.jobs, m.images) for m in seen] == [
        ("12:27", 0, 0),
        ("12:28", 1, 1),
        ("12:29", 0, 0),
        ("12:30", 2, 2),
    ]
    assert [(m.jobs, m.images) for m in throughput(r, "team-a", "base", minute, minutes=1)] == [(1, 4)]
    assert [(m.jobs, m.images) for m in throughput(r, "team-b", "turbo", minute, minutes=1)] == [(1, 8)]
    key = keys.throughput("team-a", "turbo")
    assert 0 < r.ttl(key) <= keys.THROUGHPUT_TTL_SECONDS
    # a ring: a minute 16 later takes 12:30's slot over, and a row for 12:30 arriving after it is dropped
    outbox = Outbox(r, store=False)
    later = minute + 60 * keys.THROUGHPUT_SLOTS
    outbox.put([row("g", finished_at=later + 3, images=5), row("h", finished_at=minute + 7, images=9)])
    assert [(m.jobs, m.images) for m in throughput(r, "team-a", "turbo", later, minutes=1)] == [(1, 5)]
    assert [(m.jobs, m.images) for m in throughput(r, "team-a", "turbo", minute, minutes=1)] == [(0, 0)]
    assert r.hlen(key) <= 3 * keys.THROUGHPUT_SLOTS  # bounded, however many minutes go by
