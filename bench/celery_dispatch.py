"""The Celery side of ``bench/dispatch.py``: a no-op task that records when the worker picked it up.

The worker runs as ``celery -A bench.celery_dispatch worker --pool=solo ...`` with the broker URL in
``ZIMAGE_BENCH_BROKER``. Pick-up times stay in the worker's memory (no extra Redis round trip per job, so the
task body costs the same as the other systems' consumers); the ``flush`` task hands them to the benchmark in
one RPUSH. Semantics match the queue contract: acks_late (ack after the body ran) and a prefetch of one.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

from zimage_queue import GenerationParams
from zimage_worker.engine import NoopEngine

BROKER_ENV = "ZIMAGE_BENCH_BROKER"
QUEUE = "bench-dispatch"
NODE = "bench-dispatch@localhost"

app = Celery("bench_dispatch", broker=os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_store_errors_even_if_ignored=False,
    result_backend=None,
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    worker_send_task_events=False,
    task_send_sent_event=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_engine = NoopEngine()
_params = GenerationParams(prompt="bench", width=64, height=64, steps=1, seed=0)
_picks: list[tuple[int, float]] = []


def noop_model(engine: NoopEngine, params: GenerationParams) -> None:
    """The work every system's consumer does per job: one step of the no-op engine on a 64x64 image."""
    engine.generate(params, on_step=lambda _s, _t: None, should_stop=lambda: False, load_image=lambda _u: b"")


@app.task(name="bench.pick")
def pick(idx: int) -> None:
    t = time.time()
    _picks.append((idx, t))
    noop_model(_engine, _params)


@app.task(name="bench.flush")
def flush(key: str) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        client.rpush(key, json.dumps(_picks))
    finally:
        client.close()
    _picks.clear()
