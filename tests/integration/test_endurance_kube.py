"""Safe to leave running, with the real operator on the Kubernetes test bed: poison input on both streams,
outcomes that reach the status after the operator missed their events, and a liveness probe that tells."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import (
    BIN,
    REPO,
    Kube,
    Processes,
    healthz,
    operator_stack,
    start_operator,
    start_worker,
    submit_jobs,
    wait_for,
)
from zimage_queue import JobQueue, keys
from zimage_queue.server import RedisServer, free_port

pytestmark = pytest.mark.kube
MODEL = "z-image-turbo"


def jobs(kube: Kube, ns: str) -> dict[str, dict[str, Any]]:
    items = json.loads(kube.kubectl("get", "ij", "-n", ns, "-o", "json").stdout)["items"]
    return {j["metadata"]["name"]: j for j in items}


def phases(kube: Kube, ns: str) -> dict[str, str]:
    return {n: (j.get("status") or {}).get("phase", "") for n, j in jobs(kube, ns).items()}


def apply_model(kube: Kube, ns: str) -> None:
    kube.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))


def test_poison_on_both_streams_stops_nothing(crds: Kube, tmp_path: Path) -> None:
    """Measured on the earlier code: two malformed events stopped every status update for good."""
    ns = f"zimage-poison-{os.getpid()}"
    with operator_stack(crds, tmp_path, ns) as (ps, url):
        q = JobQueue.from_url(url)
        queue = keys.queue_name(ns, MODEL)
        q.ensure_queue(queue)
        q.r.xadd(keys.EVENTS_STREAM, {keys.EVENT_FIELD: "{broken"})
        q.r.xadd(keys.EVENTS_STREAM, {keys.EVENT_FIELD: json.dumps({"type": "started", "uid": 7})})
        q.r.xadd(keys.EVENTS_STREAM, {"something": "else"})
        q.r.xadd(keys.stream(queue, "normal"), {keys.MESSAGE_FIELD: "not a job"})
        q.r.xadd(keys.stream(queue, "high"), {keys.MESSAGE_FIELD: json.dumps({"uid": "x", "params": {}})})
        apply_model(crds, ns)
        start_worker(ps, url, queue, tmp_path / "images")
        names = [f"job-{i}" for i in range(5)]
        submit_jobs(crds, ns, names)
        wait_for(lambda: set(phases(crds, ns).values()) == {"Succeeded"}, 120, what="every job Succeeded")
        # A newer worker's event (an unknown field) is applied like any other.
        later = ["after-poison"]
        submit_jobs(crds, ns, later)
        wait_for(lambda: phases(crds, ns).get("after-poison") == "Succeeded", 60, what="the later job")
        assert len(q.poisoned()) == 5


def test_outcomes_finished_while_the_operator_was_down_reach_the_status(crds: Kube, tmp_path: Path) -> None:
    """Stop the operator, finish 50 jobs while it is down, trim the events stream to zero, start it again."""
    ns = f"zimage-resync-{os.getpid()}"
    count = 50
    with operator_stack(crds, tmp_path, ns, ZIMAGE_RESYNC_FIRST_SECONDS="1") as (ps, url):
        apply_model(crds, ns)
        names = [f"job-{i}" for i in range(count)]
        submit_jobs(crds, ns, names)
        wait_for(lambda: list(phases(crds, ns).values()).count("Queued") == count, 120, what="all Queued")
        operator = ps.procs[0][1]
        operator.send_signal(signal.SIGTERM)
        operator.wait(30)

        q = JobQueue.from_url(url)
        queue = keys.queue_name(ns, MODEL)
        worker = start_worker(ps, url, queue, tmp_path / "images", ZIMAGE_MODEL_SOURCE="noop")
        wait_for(lambda: q.stats(queue) == type(q.stats(queue))(0, 0), 120, what="the worker to drain")
        uids = {n: j["metadata"]["uid"] for n, j in jobs(crds, ns).items()}
        wait_for(lambda: all(q.state(u) == "succeeded" for u in uids.values()), 30, what="results recorded")
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        q.r.xtrim(keys.EVENTS_STREAM, maxlen=0, approximate=False)
        assert q.r.xlen(keys.EVENTS_STREAM) == 0
        assert set(phases(crds, ns).values()) == {"Queued"}  # nobody told the API server

        start_operator(ps, crds, url, ns, ZIMAGE_RESYNC_FIRST_SECONDS="1")
        wait_for(lambda: set(phases(crds, ns).values()) == {"Succeeded"}, 120, what="all 50 Succeeded")
        for name, job in jobs(crds, ns).items():
            results = job["status"]["results"]
            assert len(results) == 1 and results[0]["uri"].startswith("file://"), name
            assert (q.result(uids[name]) or [])[0].sha256 == results[0]["sha256"]


def test_liveness_turns_red_while_redis_is_gone_and_green_when_it_is_back(
    crds: Kube, tmp_path: Path, processes: Processes
) -> None:
    ns = f"zimage-live-{os.getpid()}"
    crds.kubectl("create", "namespace", ns)
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    srv = RedisServer(appendonly=True, data_dir=str(data)).start()
    try:
        env = {**crds.env, "ZIMAGE_REDIS_URL": srv.url, "ZIMAGE_LOOP_MAX_FAILURES": "2"}
        argv = [str(BIN / "zimage-operator"), "--standalone", "-n", ns, "--metrics-port", "0"]
        processes.start("operator", [*argv, f"--liveness=http://127.0.0.1:{port}/healthz"], env)
        wait_for(lambda: healthz(port) == 200, 60, what="live")
        srv.stop()
        wait_for(lambda: healthz(port) == 500, 90, interval=1.0, what="liveness red without Redis")
        srv.start()
        wait_for(lambda: healthz(port) == 200, 90, interval=1.0, what="live again")
        r = redis.Redis.from_url(srv.url)
        assert r.ping()
    finally:
        srv.close()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
