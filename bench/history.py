"""Job history in PostgreSQL: the writer at 1,000 finished jobs/s, and usage queries over 10 million rows.

    .venv/bin/python -m bench.history                             # 30 s at 1,000 rows/s, then 10,000,000 rows
    .venv/bin/python -m bench.history --seconds 5 --rows 200000   # a short run (under a minute)

A private ``redis-server`` (``zimage_queue.server.RedisServer``) and PostgreSQL (``zimage_history.server``,
``track_commit_timestamp`` on), the schema by ``db.migrate``.

Writer. The producer does what the operator does when a worker reports a job done (``zimage_operator.history
.record``): the attempt's usage facts kept by its worker (``JobQueue.usage``, one round trip), ``rows_for`` on
the ImageJob as written (8 tenants, 4 models, 1-4 images, ModelDeployments with
``spec.cost`` ``{perGpuHour: 2.5, perImage: 0.001}`` and one GPU) and a ``succeeded`` JobEvent stamped with the
time it is made, then ``Outbox.put`` of the job's rows (one pipelined round trip, with the tenant's daily usage
counters), one job after another at a steady ``--rate`` for ``--seconds``. The writer runs in a process of its own,
as the operator's ``HistoryLoop`` runs it: ``HistoryWriter.write_some`` back to back while it gets full batches,
else ``purge`` (hourly retention) and a ``--flush`` s pause. At the end: rows produced against rows in
``job_history``, the outbox left, and ``usage_hourly``'s attempts (each row counted once in the hourly sums).

* lag: per row, its transaction's commit time (``pg_xact_commit_timestamp(xmin)``, PostgreSQL's own record of
  when the transaction that inserted the row committed) less its ``finished_at`` (when the producer made the
  event, a moment before the row went into the outbox). Same host, same clock; it covers the wait in the outbox
  (up to a ``--flush`` pause), reading, parsing, the insert and the commit, for every row, not a sample.
* operator CPU: the producing thread's CPU time (``time.thread_time``) inside ``JobQueue.usage`` and
  ``rows_for``, and inside ``Outbox.put``, over the producing wall time: what history adds to the operator at this
  rate, as a share of one core (making the synthetic jobs and events is not counted: the operator has them anyway).
* writer CPU: the writer process's CPU time (``time.process_time``) over its wall time, from its first pass to
  its last (the outbox drained), after imports, connection and migration. Redis's (``INFO cpu``) and
  PostgreSQL's (the postmaster and its backends, ``psutil``) CPU over the producing window are printed beside it.
* writer rows/s while writing: the rows of the passes that found some over the time those passes took, i.e.
  what the writer sustains back to back; under ``--rate`` it falls behind and the lag grows with the run.

Usage query. ``--rows`` rows made in PostgreSQL by ``INSERT ... SELECT FROM generate_series`` (chunks of 1M on
``--load-workers`` connections): 365 days up to the current hour, 50 tenants (skewed: tenant k's share falls with
k, tenant-00 has about 14 %), 8 models (a tenant runs its own model 80 % of the time, any of the 8 otherwise),
96 % succeeded, 1-4 images, a GPU-second share and cost priced as above, prompts, times, worker, results. The
job_history indexes and constraints (as ``migrate`` made them: ``pg_get_indexdef``/``pg_get_constraintdef``) are
dropped for the load and made again after it, then checked to be identical; ``usage_hourly`` is filled with one
``INSERT ... SELECT ... GROUP BY`` (the sums ``db.insert_rows`` keeps); then ``VACUUM ANALYZE``. The load time
covers all of it. Timed (median of ``--runs`` after one warm-up, the Python call included):
``queries.usage`` by tenant over 30 days (all tenants), by day for the busiest tenant over 90 days, by model over
365 days, and the first computed from ``job_history`` itself (no rollup; its result must equal the rollup's).
The plan's scans are printed under each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import redis
from sqlalchemy import Connection, Engine, event, text

from bench import PROMPTS
from zimage_history import db, queries
from zimage_history.outbox import Outbox
from zimage_history.rows import rows_for
from zimage_history.server import PostgresServer
from zimage_history.writer import HistoryWriter
from zimage_operator.types import TENANT_LABEL
from zimage_queue import JobEvent, JobQueue, keys
from zimage_queue.message import ResultImage
from zimage_queue.server import RedisServer

TENANTS = [f"tenant-{i}" for i in range(8)]
MODELS = ["z-image-turbo", "z-image-base", "flux-schnell", "sdxl"]
PRICE = {"perGpuHour": 2.5, "perImage": 0.001}
BATCH_IMAGES = 4  # the worker's batch: a job's GPU-seconds are its share of it
LOAD_CHUNK = 1_000_000
LAG_GOAL_S = 2.0
QUERY_GOAL_MS = 200.0


def pools() -> dict[str, dict[str, Any]]:
    return {
        m: {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": m, "namespace": "default"},
            "spec": {
                "model": {"variant": "turbo" if "turbo" in m else "base"},
                "resources": {"limits": {"nvidia.com/gpu": 1}},
                "cost": PRICE,
            },
        }
        for m in MODELS
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def finished_job(run: str, i: int) -> tuple[dict[str, Any], JobEvent]:
    """The ImageJob as the operator has written it after the worker's ``succeeded`` event, and the event."""
    now = time.time()
    tenant, model = TENANTS[i % len(TENANTS)], MODELS[(i // len(TENANTS)) % len(MODELS)]
    n = (1, 1, 2, 4)[i % 4]
    run_s, queue_s = 2.0 + (i % 7) * 0.3, 0.5 + (i % 5) * 0.2
    uid, name, ns = f"{run}-{i:08d}", f"job-{i}", f"ns-{tenant}"
    job = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {TENANT_LABEL: tenant}},
        "spec": {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "width": 1024, "height": 1024,
                 "steps": 8, "numImages": n, "seed": i},
        "status": {"phase": "Succeeded", "queuedAt": _iso(now - run_s - queue_s), "startedAt": _iso(now - run_s),
                   "queueSeconds": queue_s, "steps": 8, "seed": i},
    }  # fmt: skip
    results = [
        ResultImage(uri=f"s3://zimage/{ns}/{uid}/{k}.png", width=1024, height=1024, seed=i + k, sha256="0" * 64,
                    bytes=1_400_000)
        for k in range(n)
    ]  # fmt: skip
    ev = JobEvent(
        type="succeeded", uid=uid, namespace=ns, name=name, worker=f"{model}-worker-{i % 3}", attempt=1,
        results=results, run_seconds=run_s, ts=time.time(),
    )  # fmt: skip
    return job, ev


def writer_process(redis_url: str, pg_url: str, batch: int, flush: float, ready: Any, stop: Any, out: Any) -> None:
    """The operator's HistoryLoop, in a process of its own; its figures go to ``out`` when the outbox is drained
    after ``stop``."""
    engine = db.connect(pg_url)
    writer = HistoryWriter(Outbox(redis.Redis.from_url(redis_url)), engine, batch=batch)
    db.migrate(engine)
    writer.migrated = True
    passes: list[tuple[int, float]] = []
    ready.set()
    t0, c0 = time.monotonic(), time.process_time()
    while True:
        p0 = time.monotonic()
        n = writer.write_some()
        passes.append((n, time.monotonic() - p0))
        if n >= batch:
            continue
        if n == 0 and stop.is_set():
            break
        writer.purge()
        time.sleep(flush)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    busy = [(n, s) for n, s in passes if n]
    out.put({
        "wall": wall, "cpu": cpu, "batches": len(busy),
        "rows_per_batch": statistics.fmean(n for n, _ in busy) if busy else 0.0,
        "pass_p99": percentile([s for _, s in busy], 0.99) if busy else 0.0,
        "capacity": sum(n for n, _ in busy) / sum(s for _, s in busy) if busy else 0.0,
    })  # fmt: skip
    engine.dispose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def postgres_cpu(pg: PostgresServer) -> float:
    """CPU seconds of the postmaster and its backends so far (those already gone included)."""
    main = psutil.Process(int((pg.data / "postmaster.pid").read_text().split()[0]))
    t = main.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in main.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_writer(args: argparse.Namespace, rds: RedisServer, pg: PostgresServer, engine: Engine) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(
        target=writer_process, args=(rds.url, pg.url, args.batch, args.flush, ready, stop, out), daemon=True
    )
    proc.start()
    if not ready.wait(60):
        raise TimeoutError("the writer process did not start in 60 s")
    r = redis.Redis.from_url(rds.url)
    outbox, models, queue = Outbox(r), pools(), JobQueue.from_url(rds.url)
    facts = json.dumps({"batchImages": BATCH_IMAGES, "device": "NVIDIA H100 80GB HBM3"})

    def pool(_ns: str, name: str) -> dict[str, Any] | None:
        return models.get(name)

    total, run = int(args.rate * args.seconds), f"bench{int(time.time())}"
    build = put = 0.0
    r0, p0 = redis_cpu(r), postgres_cpu(pg)
    t0 = time.monotonic()
    i = 0
    while i < total:
        due = min(total, int((time.monotonic() - t0) * args.rate) + 1)
        while i < due:
            job, ev = finished_job(run, i)
            r.hset(keys.job(ev.uid), f"{keys.F_USAGE_PREFIX}{ev.attempt}", facts)  # as its worker does
            c0 = time.thread_time()
            usage = queue.usage([(ev.uid, ev.attempt)])
            rows = rows_for(job, [ev], pool, (job.get("status") or {}).get("routedTo"), usage)
            c1 = time.thread_time()
            outbox.put(rows)
            c2 = time.thread_time()
            build, put = build + c1 - c0, put + c2 - c1
            i += 1
        pause = t0 + i / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    producing = time.monotonic() - t0
    r1, p1 = redis_cpu(r), postgres_cpu(pg)
    stop.set()
    figures = out.get(timeout=max(120.0, args.seconds))
    proc.join(30)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*), count(DISTINCT (uid, attempt)) FROM job_history")).one()
        summed = conn.execute(text("SELECT coalesce(sum(attempts), 0) FROM usage_hourly")).scalar_one()
        lag = conn.execute(
            text(
                "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag), max(lag) FROM ("
                " SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - finished_at)::float8 AS lag"
                " FROM job_history) s"
            )
        ).one()
    left = outbox.length()
    r.close()
    return {
        "produced": total,
        "rate": total / producing,
        "stored": int(stored[0]),
        "distinct": int(stored[1]),
        "usage_attempts": int(summed),
        "outbox_left": left,
        "lag_p50": lag[0][0] if lag[0] else None,
        "lag_p99": lag[0][1] if lag[0] else None,
        "lag_max": lag[1],
        "build_cpu": build / producing,
        "put_cpu": put / producing,
        "redis_cpu": (r1 - r0) / producing,
        "postgres_cpu": (p1 - p0) / producing,
        "writer_cpu": figures["cpu"] / figures["wall"],
        **{k: figures[k] for k in ("batches", "rows_per_batch", "pass_p99", "capacity")},
    }


# One chunk of synthetic rows, ids [lo, hi]; :end is the current hour. Inner selects draw the random figures.
GENERATE = """
INSERT INTO job_history (uid, attempt, tenant, namespace, name, model, deployment, variant, worker, task, width,
    height, steps, num_images, images, seed, prompt, queued_at, started_at, finished_at, queue_seconds,
    run_seconds, gpus, gpu_type, gpu_seconds, cost, currency, outcome, reason, results, bulk)
SELECT 'job-' || i, 1, 'tenant-' || lpad(t::text, 2, '0'), 'ns-' || lpad(t::text, 2, '0'), 'job-' || i,
    'model-' || m, 'model-' || m, 'turbo', 'model-' || m || '-worker-' || (i % 6), 'text-to-image', 1024, 1024, 8,
    n, imgs, i, (CAST(:prompts AS text[]))[1 + i % 8], fin - make_interval(secs => q + r),
    fin - make_interval(secs => r), fin, q, r, 1, 'NVIDIA H100 80GB HBM3', gs,
    gs / 3600.0 * :per_gpu_hour + imgs * :per_image, 'USD', o,
    CASE o WHEN 'succeeded' THEN 'Completed' WHEN 'failed' THEN 'WorkerError' WHEN 'cancelled' THEN 'Cancelled'
        ELSE 'Retrying' END,
    CASE WHEN imgs > 0 THEN jsonb_build_array(jsonb_build_object('uri', 's3://zimage/job-' || i || '/0.png',
        'width', 1024, 'height', 1024, 'seed', i, 'bytes', 1400000)) END,
    false
FROM (
    SELECT *, CASE WHEN o = 'succeeded' THEN n ELSE 0 END AS imgs, r * least(1.0, n / :batch) AS gs
    FROM (
        SELECT i, t, CASE WHEN random() < 0.8 THEN t % 8 ELSE floor(random() * 8)::int END AS m,
            (ARRAY[1, 1, 2, 4])[1 + floor(random() * 4)::int] AS n, 1.5 + 3 * random() AS r, 10 * random() AS q,
            CASE WHEN o < 0.96 THEN 'succeeded' WHEN o < 0.99 THEN 'failed' WHEN o < 0.995 THEN 'cancelled'
                ELSE 'retrying' END AS o,
            :end - make_interval(secs => random() * 365 * 86400) AS fin
        FROM (SELECT i, floor(50 * random() ^ 2)::int AS t, random() AS o FROM generate_series(:lo, :hi) i) a
    ) b
) c
"""

ROLLUP = """
INSERT INTO usage_hourly (tenant, model, hour, attempts, jobs, succeeded, images, gpu_seconds, cost)
SELECT tenant, deployment, date_trunc('hour', finished_at), count(*), count(*) FILTER (WHERE outcome <> 'retrying'),
    count(*) FILTER (WHERE outcome = 'succeeded'), sum(images), sum(gpu_seconds), sum(cost)
FROM job_history GROUP BY 1, 2, 3
"""

# queries.usage(group_by="tenant") computed from the rows themselves (the same hour bounds).
DIRECT_BY_TENANT = """
SELECT tenant AS key, count(*) AS attempts, count(*) FILTER (WHERE outcome <> 'retrying') AS jobs,
    count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded, sum(images) AS images,
    sum(gpu_seconds) AS gpu_seconds, sum(cost) AS cost
FROM job_history WHERE finished_at >= date_trunc('hour', CAST(:start AS timestamptz)) AND finished_at < :end
GROUP BY tenant ORDER BY tenant
"""


def utc(conn: Connection) -> Connection:
    conn.execute(text("SET TimeZone = 'UTC'"))
    return conn


def index_definitions(conn: Connection) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """job_history's constraints and the other indexes, as PostgreSQL has them (name, definition)."""
    constraints = conn.execute(
        text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'job_history'::regclass AND contype IN ('p', 'u') ORDER BY conname"
        )
    ).all()
    indexes = conn.execute(
        text(
            "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE x.indrelid = 'job_history'::regclass"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid) ORDER BY i.relname"
        )
    ).all()
    return [(str(a), str(b)) for a, b in constraints], [(str(a), str(b)) for a, b in indexes]


def all_index_definitions(conn: Connection) -> list[str]:
    return [
        str(d)
        for (d,) in conn.execute(
            text("SELECT indexdef FROM pg_indexes WHERE tablename IN ('job_history', 'usage_hourly') ORDER BY 1")
        )
    ]


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as c:
        conn = utc(c.execution_options(isolation_level="AUTOCOMMIT"))
        conn.execute(text("SET maintenance_work_mem = '1GB'"))
        yield conn


def load(engine: Engine, rows: int, workers: int, end: datetime) -> dict[str, float]:
    """The synthetic rows, job_history's indexes rebuilt after them, the hourly sums, statistics: phase -> s."""
    took: dict[str, float] = {}
    with autocommit(engine) as conn:
        conn.execute(text("TRUNCATE job_history, usage_hourly RESTART IDENTITY"))
        before = all_index_definitions(conn)
        constraints, indexes = index_definitions(conn)
        for name, _ in indexes:
            conn.execute(text(f'DROP INDEX "{name}"'))
        for name, _ in constraints:
            conn.execute(text(f'ALTER TABLE job_history DROP CONSTRAINT "{name}"'))

    def chunk(lo: int) -> None:
        with autocommit(engine) as conn:
            conn.execute(text("SELECT setseed(:s)"), {"s": (lo % 9973) / 9973})
            conn.execute(
                text(GENERATE),
                {"lo": lo, "hi": min(rows, lo + LOAD_CHUNK - 1), "end": end, "prompts": PROMPTS,
                 "per_gpu_hour": PRICE["perGpuHour"], "per_image": PRICE["perImage"], "batch": float(BATCH_IMAGES)},
            )  # fmt: skip

    @contextmanager
    def timed(phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        took[phase] = time.monotonic() - t0
        print(f"  {phase}: {took[phase]:.1f}s", flush=True)

    def ddl(statement: str) -> None:
        with autocommit(engine) as conn:
            conn.execute(text(statement))

    with ThreadPoolExecutor(workers) as pool:
        with timed("insert"):
            list(pool.map(chunk, range(1, rows + 1, LOAD_CHUNK)))
        with timed("indexes"):  # constraints one by one (each locks the table), then the indexes side by side
            for name, definition in constraints:
                ddl(f'ALTER TABLE job_history ADD CONSTRAINT "{name}" {definition}')
            list(pool.map(ddl, [definition for _, definition in indexes]))
    with autocommit(engine) as conn:
        with timed("usage_hourly"):
            conn.execute(text(ROLLUP))
        with timed("vacuum analyze"):
            conn.execute(text("VACUUM ANALYZE job_history"))
            conn.execute(text("VACUUM ANALYZE usage_hourly"))
        if all_index_definitions(conn) != before:
            raise RuntimeError("the indexes made after the load differ from the migration's")
    took["total"] = sum(took.values())
    return took


def scans(plan: Any) -> list[str]:
    found: list[str] = []
    if isinstance(plan, dict):
        if "Scan" in str(plan.get("Node Type", "")):
            found.append(f"{plan['Node Type']} {plan.get('Index Name') or plan.get('Relation Name')}")
        for child in plan.get("Plans", []):
            found += scans(child)
    return found


def timed_query(conn: Connection, runs: int, fn: Callable[[], list[dict[str, Any]]]) -> tuple[float, list[Any], str]:
    """Median milliseconds of ``runs`` calls after one warm-up, the result, and the plan's scans."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    try:
        result = fn()
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    statement, parameters = seen[-1]
    [(plan,)] = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).all()
    return statistics.median(times), result, ", ".join(dict.fromkeys(scans(plan[0]["Plan"])))


def same_usage(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    if [r["key"] for r in a] != [r["key"] for r in b]:
        return False
    for x, y in zip(a, b, strict=True):
        for f in queries.USAGE_FIELDS:
            if abs(float(x[f]) - float(y[f])) > 1e-6 * max(1.0, abs(float(x[f]))):
                return False
    return True


def run_usage(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    print(f"loading {args.rows:,} rows ({args.load_workers} connections):", flush=True)
    took = load(engine, args.rows, args.load_workers, end)
    with engine.connect() as c:
        conn = utc(c)
        counts = conn.execute(
            text("SELECT (SELECT count(*) FROM job_history), (SELECT count(*) FROM usage_hourly)")
        ).one()
        busiest = conn.execute(
            text("SELECT tenant FROM usage_hourly GROUP BY tenant ORDER BY sum(attempts) DESC LIMIT 1")
        ).scalar_one()
        month, quarter, year = (end - timedelta(days=d) for d in (30, 90, 365))
        q1 = timed_query(conn, args.runs, lambda: queries.usage(conn, month, end, "tenant"))
        q2 = timed_query(conn, args.runs, lambda: queries.usage(conn, quarter, end, "day", tenant=busiest))
        q3 = timed_query(conn, args.runs, lambda: queries.usage(conn, year, end, "model"))

        def direct() -> list[dict[str, Any]]:
            found = conn.execute(text(DIRECT_BY_TENANT), {"start": month, "end": end})
            return [{"key": r.key, **{f: getattr(r, f) for f in queries.USAGE_FIELDS}} for r in found]

        d1 = timed_query(conn, args.runs, direct)
    return {
        "load": took,
        "rows": int(counts[0]),
        "hourly_rows": int(counts[1]),
        "busiest": busiest,
        "by_tenant_30d": q1[0],
        "by_day_90d": q2[0],
        "by_model_365d": q3[0],
        "direct_by_tenant_30d": d1[0],
        "plans": {"by_tenant_30d": q1[2], "by_day_90d": q2[2], "by_model_365d": q3[2], "direct": d1[2]},
        "groups": {"by_tenant_30d": len(q1[1]), "by_day_90d": len(q2[1]), "by_model_365d": len(q3[1])},
        "rollup_matches": same_usage(q1[1], d1[1]),
    }


def track_commit_timestamps(pg: PostgresServer) -> Engine:
    """Turn ``track_commit_timestamp`` on (a restart), migrate: the engine."""
    engine = db.connect(pg.url)
    with engine.connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT").execute(text("ALTER SYSTEM SET track_commit_timestamp = on"))
    engine.dispose()
    pg.stop()
    pg.start()
    engine = db.connect(pg.url, statement_timeout_ms=3_600_000)
    with engine.connect() as conn:
        if conn.execute(text("SHOW track_commit_timestamp")).scalar_one() != "on":
            raise RuntimeError("track_commit_timestamp is off")
    db.migrate(engine)
    return engine


def table(w: dict[str, Any] | None, u: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, bool]:
    lines: list[tuple[str, str, str]] = []
    goals: dict[str, bool] = {}
    if w is not None:
        lag = "-"
        if w["lag_p50"] is not None:
            lag = " / ".join(f"{w[k] * 1000:.0f}" for k in ("lag_p50", "lag_p99", "lag_max"))
        lines += [
            (f"writer: {args.rate:,.0f} rows/s for {args.seconds:g} s", "measured", "goal"),
            ("  rows produced (rate /s)", f"{w['produced']:,} ({w['rate']:.0f})", f"{args.rate:,.0f}/s"),
            ("  rows in job_history (distinct)", f"{w['stored']:,} ({w['distinct']:,})", f"{w['produced']:,}"),
            ("  attempts in usage_hourly", f"{w['usage_attempts']:,}", f"{w['produced']:,}"),
            ("  left in the outbox", str(w["outbox_left"]), "0"),
            ("  lag p50 / p99 / max (ms)", lag, f"p99 < {LAG_GOAL_S * 1000:.0f}"),
            ("  operator CPU: usage+rows_for + put (% core)",
             f"{(w['build_cpu'] + w['put_cpu']) * 100:.1f} ({w['build_cpu'] * 100:.1f} + {w['put_cpu'] * 100:.1f})",
             "stated"),
            ("  writer process CPU (% core)", f"{w['writer_cpu'] * 100:.1f}", "-"),
            ("  redis / postgres CPU (% core)", f"{w['redis_cpu'] * 100:.1f} / {w['postgres_cpu'] * 100:.1f}", "-"),
            ("  writer batches (mean rows, p99 ms)",
             f"{w['batches']} ({w['rows_per_batch']:.0f}, {w['pass_p99'] * 1000:.0f})", "-"),
            ("  writer rows/s while writing", f"{w['capacity']:,.0f}", f"> {args.rate:,.0f}"),
        ]  # fmt: skip
        goals["every row written exactly once"] = (
            w["stored"] == w["distinct"] == w["produced"] == w["usage_attempts"] and w["outbox_left"] == 0
        )
        goals[f"producer kept {args.rate:,.0f} rows/s (within 1 %)"] = w["rate"] >= 0.99 * args.rate
        goals[f"writer lag p99 under {LAG_GOAL_S:g} s"] = w["lag_p99"] is not None and w["lag_p99"] < LAG_GOAL_S
        goals[f"operator CPU stated: {(w['build_cpu'] + w['put_cpu']) * 100:.1f} % of a core"] = True
    if u is not None:
        lines += [
            (f"usage: {u['rows']:,} rows, loaded in {u['load']['total']:.0f} s", "usage_hourly", "job_history"),
            ("  rows", f"{u['hourly_rows']:,}", f"{u['rows']:,}"),
            ("  load: insert / indexes (s)", "-", f"{u['load']['insert']:.1f} / {u['load']['indexes']:.1f}"),
            ("  load: rollup / vacuum analyze (s)", f"{u['load']['usage_hourly']:.1f}",
             f"{u['load']['vacuum analyze']:.1f}"),
            (f"  by tenant, 30 days ({u['groups']['by_tenant_30d']}) ms", f"{u['by_tenant_30d']:.1f}",
             f"{u['direct_by_tenant_30d']:.1f}"),
            (f"  by day, {u['busiest']}, 90 days ({u['groups']['by_day_90d']}) ms", f"{u['by_day_90d']:.1f}", "-"),
            (f"  by model, 365 days ({u['groups']['by_model_365d']}) ms", f"{u['by_model_365d']:.1f}", "-"),
        ]  # fmt: skip
        for name, label in (("by_tenant_30d", "by tenant, 30 days"), ("by_day_90d", "by day, one tenant, 90 days"),
                            ("by_model_365d", "by model, 365 days")):  # fmt: skip
            goals[f"usage {label} under {QUERY_GOAL_MS:.0f} ms"] = u[name] < QUERY_GOAL_MS
        goals["the rollup's by-tenant sums equal job_history's"] = u["rollup_matches"]
    width = max(len(label) for label, _, _ in lines) + 2
    print()
    for label, a, b in lines:
        print(f"{label:{width}}{a:>26}{b:>20}")
    if u is not None:
        print("\nplans:")
        for name, plan in u["plans"].items():
            print(f"  {name:16}{plan}")
    print("\n" + "\n".join(f"  [{'x' if ok else ' '}] {goal}" for goal, ok in goals.items()))
    return goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rate", type=float, default=1000.0, help="finished jobs (rows) per second into the outbox")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the producer runs")
    p.add_argument("--batch", type=int, default=1000, help="the writer's batch (the operator's history_batch)")
    p.add_argument("--flush", type=float, default=0.5, help="the writer's pause (history_flush_seconds)")
    p.add_argument("--rows", type=int, default=10_000_000, help="job_history rows for the usage queries")
    p.add_argument("--load-workers", type=int, default=os.cpu_count() or 2, help="connections loading the rows")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each query (the median is printed)")
    p.add_argument("--only", choices=("writer", "usage"), help="run one part")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} CPUs", flush=True)
    w = u = None
    with PostgresServer() as pg:
        engine = track_commit_timestamps(pg)
        if args.only != "usage":
            rds = RedisServer().start()
            try:
                print(f"writer: {args.rate:,.0f} rows/s for {args.seconds:g} s", flush=True)
                w = run_writer(args, rds, pg, engine)
            finally:
                rds.close()
        if args.only != "writer":
            u = run_usage(args, engine)
        engine.dispose()
    goals = table(w, u, args)
    if args.json:
        print(json.dumps({"writer": w, "usage": u, "goals": goals}, default=str))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
