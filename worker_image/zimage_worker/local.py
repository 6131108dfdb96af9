"""The embedded local stack: a private Redis, the real worker loop and a local image folder, no cluster.

The same queue contract and worker code as in a cluster; only the operator's part (turning an ImageJob
into a queue message and worker events into status) is done here in-process.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, ResultImage
from zimage_queue.message import AdapterSpec
from zimage_queue.server import RedisServer
from zimage_worker.engine import Engine, load_engine
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore

LOCAL_NAMESPACE = "local"


@dataclass
class LocalStack:
    queue: JobQueue
    queue_name: str
    store: LocalStore
    worker: Worker

    def submit(self, params: GenerationParams, name: str | None = None) -> JobMessage:
        uid = str(uuid.uuid4())
        msg = JobMessage(
            uid=uid, namespace=LOCAL_NAMESPACE, name=name or f"job-{uid[:8]}", queue=self.queue_name, params=params
        )
        self.queue.enqueue(msg)
        return msg

    def wait(self, uid: str, on_event: Callable[[JobEvent], None] | None = None, timeout: float = 600.0) -> JobEvent:
        """Follow the worker's events for one job until it finishes; returns the final event."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.queue.read_events("local", block_ms=500, group="local-cli")
            self.queue.ack_events([i for i, _ in batch], group="local-cli")
            for _, ev in batch:
                if ev.uid != uid:
                    continue
                if on_event:
                    on_event(ev)
                if ev.type in ("succeeded", "failed", "cancelled"):
                    return ev
        raise TimeoutError(f"job {uid} did not finish within {timeout:.0f}s")


@contextmanager
def local_stack(
    model: str = "tiny-random",
    *,
    images_dir: str | Path,
    engine: Engine | None = None,
    models_dir: str | None = None,
    variant: str = "turbo",
    adapters: Sequence[AdapterSpec] | None = None,
) -> Iterator[LocalStack]:
    with RedisServer() as srv:
        queue = JobQueue.from_url(srv.url, visibility_ms=60_000)
        queue_name = f"{LOCAL_NAMESPACE}/{Path(model).name or 'model'}"
        engine = engine or load_engine(model, variant=variant, models_dir=models_dir, adapters=adapters)
        store = LocalStore(images_dir)
        worker = Worker(queue, engine, store, queue_name, "local-worker", progress_interval_seconds=0)
        thread = threading.Thread(target=worker.run, kwargs={"block_ms": 200}, name="worker", daemon=True)
        thread.start()
        try:
            yield LocalStack(queue, queue_name, store, worker)
        finally:
            worker.request_stop()
            thread.join(timeout=30)


def output_paths(output: Path, count: int) -> list[Path]:
    """``fox.png``; ``fox-0.png``, ``fox-1.png``... when there are several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def copy_results(results: list[ResultImage], output: Path) -> list[Path]:
    """Copy stored images to ``output`` (see ``output_paths``)."""
    out = output_paths(output, len(results))
    for r, target in zip(results, out, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(r.uri.removeprefix("file://")), target)
    return out
