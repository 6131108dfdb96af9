"""The zimage-worker process: probes, metrics, and draining on SIGTERM (finish the job in hand, exit 0)."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from conftest import Processes, start_worker, wait_for
from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.server import RedisServer, free_port

Q = "ns/m"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def job(steps: int) -> JobMessage:
    params = GenerationParams(prompt="a red fox", width=64, height=64, steps=steps, seed=1)
    return JobMessage(uid=str(uuid.uuid4()), namespace="ns", name="fox", queue=Q, params=params)


def test_worker_probes_metrics_and_drain_on_sigterm(redis_url: str, tmp_path: Path, processes: Processes) -> None:
    port = free_port()
    q = JobQueue.from_url(redis_url)
    proc = start_worker(processes, redis_url, Q, tmp_path / "images", ZIMAGE_HTTP_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(f"{base}/readyz")[0] == 200, timeout=120, what="/readyz")
    assert get(f"{base}/healthz")[0] == 200

    first = job(steps=2)
    q.enqueue(first)
    wait_for(lambda: q.result(first.uid), timeout=60, what="first job")
    status, text = get(f"{base}/metrics")
    assert status == 200 and 'zimage_worker_jobs_total{outcome="succeeded"} 1.0' in text
    assert "zimage_worker_inference_seconds_count 1.0" in text and "zimage_worker_model_load_seconds" in text
    # Ready only after the warm-up generation: its time is on record by then.
    [warmup] = [line for line in text.splitlines() if line.startswith("zimage_worker_warmup_seconds ")]
    assert float(warmup.split()[1]) > 0

    # SIGTERM mid-job: the job in hand is finished and acked, nothing new is taken, exit code 0.
    long, after = job(steps=60), job(steps=2)
    q.enqueue(long)
    wait_for(lambda: q.r.hget(f"zimage:job:{long.uid}", "state") == b"running", what="long job to start")
    proc.send_signal(signal.SIGTERM)
    q.enqueue(after)
    assert proc.wait(timeout=120) == 0
    assert q.result(long.uid) is not None
    assert q.result(after.uid) is None and q.stats(Q).queued == 1 and q.stats(Q).in_flight == 0


def test_worker_process_batches_as_configured(redis_url: str, tmp_path: Path, processes: Processes) -> None:
    """ZIMAGE_MAX_BATCH_SIZE (what the operator sets from spec.batching) reaches the loop: 8 queued jobs run
    as two pipeline calls of 4."""
    port = free_port()
    q = JobQueue.from_url(redis_url)
    jobs = [job(steps=2) for _ in range(8)]
    for m in jobs:
        q.enqueue(m)
    start_worker(processes, redis_url, Q, tmp_path / "images", ZIMAGE_HTTP_PORT=str(port), ZIMAGE_MAX_BATCH_SIZE="4")
    wait_for(lambda: all(q.result(m.uid) for m in jobs), timeout=120, what="8 jobs")
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    count = [line for line in text.splitlines() if line.startswith("zimage_worker_batch_size_count ")]
    total = [line for line in text.splitlines() if line.startswith("zimage_worker_batch_size_sum ")]
    assert count == ["zimage_worker_batch_size_count 2.0"] and total == ["zimage_worker_batch_size_sum 8.0"], text


def test_a_worker_started_before_redis_waits_for_it(tmp_path: Path, processes: Processes) -> None:
    """Found by the redis-down fault row: a worker whose model finished loading while Redis was down exited."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    worker = start_worker(processes, url, Q, tmp_path / "images", ZIMAGE_MODEL_SOURCE="noop")
    log = processes.procs[-1][2]
    wait_for(lambda: "Redis unavailable" in log.read_text(), 60, what="the worker to back off")
    assert worker.poll() is None
    with RedisServer(port=port) as srv:
        q = JobQueue.from_url(srv.url)
        m = job(steps=1)
        q.enqueue(m)
        wait_for(lambda: q.result(m.uid), 60, what="the job, once Redis is there")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
