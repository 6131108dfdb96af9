"""Job history through the operator on the test bed: ImageJobs run by a tiny-model worker (batching) land in
PostgreSQL once per attempt outcome with their GPU-seconds and cost; the operator's Prometheus counters and the
usage query agree; a job deleted by its TTL keeps its row and image; and PostgreSQL taken away while jobs run
blocks none of them and loses no row."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from conftest import Kube, imagejobs, operator_stack, start_worker, wait_for
from zimage_history import db, queries
from zimage_history.server import PostgresServer
from zimage_queue import keys
from zimage_queue.server import free_port

pytestmark = pytest.mark.kube
NS = f"zimage-hist-{os.getpid()}"
PRICE = {"perGpuHour": 3.6, "perImage": 0.01}
LONG = os.environ.get("ZIMAGE_LONG_TESTS") == "1"


@pytest.fixture(scope="module")
def stack(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("history")
    port = free_port()
    with (
        PostgresServer() as pg,
        operator_stack(
            crds, tmp, NS, metrics_port=port, ZIMAGE_HISTORY_URL=pg.url, ZIMAGE_HISTORY_FLUSH_SECONDS="0.2"
        ) as (ps, url),
    ):
        crds.apply(NS, {
            "apiVersion": "zimage.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "z-image-turbo"},
            "spec": {"model": {"variant": "turbo"}, "cost": PRICE, "batching": {"maxBatchSize": 4}},
        })  # fmt: skip
        start_worker(
            ps, url, keys.queue_name(NS, "z-image-turbo"), tmp / "images",
            ZIMAGE_MAX_BATCH_SIZE="4", ZIMAGE_MAX_WAIT_MILLISECONDS="300",
        )  # fmt: skip
        engine = db.connect(pg.url, connect_timeout=2)
        wait_for(lambda: db.current_revision(engine) == "0001", timeout=60, what="the operator migrated the store")
        yield {"kube": crds, "redis": url, "pg": pg, "engine": engine, "port": port}


def phases(kube: Kube, names: list[str]) -> dict[str, str]:
    out = json.loads(kube.kubectl("get", "ij", "-n", NS, "-o", "json").stdout)
    return {
        o["metadata"]["name"]: (o.get("status") or {}).get("phase", "")
        for o in out["items"]
        if o["metadata"]["name"] in names
    }


def rows(engine: Any, prefix: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT * FROM job_history WHERE name LIKE :p ORDER BY name"), {"p": f"{prefix}%"})
        return [dict(r._mapping) for r in found]


def scrape(port: int) -> dict[tuple[str, str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    return {
        (s.name, s.labels.get("tenant", ""), s.labels.get("model", "")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name in ("zimage_gpu_seconds_total", "zimage_cost_total")
    }


def test_jobs_are_recorded_once_with_gpu_seconds_and_cost(stack: dict[str, Any]) -> None:
    kube, engine = stack["kube"], stack["engine"]
    names = [f"rec-{i}" for i in range(10)]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(imagejobs(names[:6], width=64, height=64)))
    kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(imagejobs(names[6:], width=64, height=64, numImages=2)))
    ttl = imagejobs(["rec-ttl"], width=64, height=64, ttlSecondsAfterFinished=1)
    kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(ttl))
    wait_for(lambda: set(phases(kube, names).values()) == {"Succeeded"}, timeout=180, what="all succeeded")
    got = wait_for(lambda: len(r := rows(engine, "rec-")) == 11 and r, timeout=60, what="11 rows")
    assert len({(r["uid"], r["attempt"]) for r in got}) == 11  # once per attempt outcome
    for r in got:
        assert (r["outcome"], r["attempt"], r["tenant"], r["deployment"]) == ("succeeded", 1, NS, "z-image-turbo")
        assert r["images"] == r["num_images"] == len(r["results"]) and r["gpus"] == 1.0 and r["gpu_type"] == "cpu"
        assert 0 < r["gpu_seconds"] <= r["run_seconds"]  # its share of its batch
        assert r["cost"] == pytest.approx(r["gpu_seconds"] / 3600 * 3.6 + r["images"] * 0.01)
        assert r["prompt"] == r["name"] and r["queued_at"] <= r["finished_at"] and r["seed"] is not None
    assert any(r["gpu_seconds"] < r["run_seconds"] * 0.99 for r in got), "no batch was shared"

    # The job deleted by its TTL: gone from the cluster, its row and image kept.
    wait_for(lambda: "rec-ttl" not in phases(kube, ["rec-ttl"]), timeout=60, what="rec-ttl deleted")
    with engine.connect() as conn:
        kept = queries.get_job(conn, NS, "rec-ttl", tenant=NS)
    assert kept is not None and Path(kept["results"][0]["uri"].removeprefix("file://")).is_file()

    # The operator's counters and the usage query say the same.
    with engine.connect() as conn:
        now = datetime.now(UTC)
        [usage] = queries.usage(conn, now - timedelta(days=1), now + timedelta(hours=1), "tenant", tenant=NS)
    total_gpu, total_cost = sum(r["gpu_seconds"] for r in got), sum(r["cost"] for r in got)
    assert (usage["jobs"], usage["succeeded"], usage["images"]) == (11, 11, 15)
    assert usage["gpu_seconds"] == pytest.approx(total_gpu) and usage["cost"] == pytest.approx(total_cost)
    metrics = scrape(stack["port"])
    assert metrics[("zimage_gpu_seconds_total", NS, "z-image-turbo")] == pytest.approx(total_gpu)
    assert metrics[("zimage_cost_total", NS, "z-image-turbo")] == pytest.approx(total_cost)


@pytest.mark.parametrize(
    "jobs,outage",
    [
        (40, 10.0),
        pytest.param(200, 60.0, marks=[pytest.mark.slow, pytest.mark.skipif(not LONG, reason="ZIMAGE_LONG_TESTS=1")]),
    ],
)
def test_postgres_away_blocks_no_job_and_loses_no_row(stack: dict[str, Any], jobs: int, outage: float) -> None:
    kube, engine, pg = stack["kube"], stack["engine"], stack["pg"]
    r = redis.Redis.from_url(stack["redis"])
    names = [f"out{jobs}-{i}" for i in range(jobs)]
    pg.stop()
    stopped = time.monotonic()
    try:
        kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(imagejobs(names, width=64, height=64)))
        wait_for(lambda: set(phases(kube, names).values()) == {"Succeeded"}, timeout=300, what="all succeeded")
        assert r.xlen(keys.HISTORY_OUTBOX) >= jobs  # every row waits in Redis
        time.sleep(max(0.0, outage - (time.monotonic() - stopped)))  # the outage lasts what the scenario says
    finally:
        pg.start()
    got = wait_for(lambda: len(found := rows(engine, f"out{jobs}-")) == jobs and found, timeout=120, what="rows")
    assert sorted(row["name"] for row in got) == sorted(names)
    wait_for(lambda: r.xlen(keys.HISTORY_OUTBOX) == 0, timeout=30, what="outbox drained")
