"""The worker loop: take a job, run it, store the images, then ack (never before).

Shutdown follows arq/rq: the first SIGTERM stops taking jobs and lets the current one finish; a second one
hands the current job back to the queue between two steps. Either way the process exits 0.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from zimage_queue import Delivery, JobEvent, JobMessage, JobQueue, ResultImage
from zimage_worker import metrics
from zimage_worker.engine import Cancelled, Engine
from zimage_worker.storage import ImageStore, output_key, read_uri

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class InputError(Exception):
    """The job's own input is bad (unreadable image...): retrying cannot help."""


class HandedBack(Exception):
    """Raised between steps when the worker must give the job back (second SIGTERM)."""


REDIS_RETRY_SECONDS = 1.0


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(
        buf, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"), **({"quality": 95} if fmt != "png" else {})
    )
    return buf.getvalue()


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        engine: Engine,
        store: ImageStore,
        queue_name: str,
        name: str,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.queue = queue
        self.engine = engine
        self.store = store
        self.queue_name = queue_name
        self.name = name
        self.heartbeat_seconds = heartbeat_seconds
        self.stopping = threading.Event()  # take no new job
        self.hand_back = threading.Event()  # give the current job back now
        self._finished = threading.Event()
        self.held: list[Delivery] = []
        self._lock = threading.Lock()
        self.processed = 0

    # -- lifecycle ----------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        if self.stopping.is_set():
            self.hand_back.set()
        self.stopping.set()

    def run(self, max_jobs: int | None = None, block_ms: int = 1000) -> None:
        self.queue.ensure_queue(self.queue_name)
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        self.queue.worker_heartbeat(self.queue_name, self.name, busy=False)
        try:
            self._loop(max_jobs, block_ms)
        finally:
            self._finished.set()
            self.queue.worker_gone(self.queue_name, self.name)

    def _loop(self, max_jobs: int | None, block_ms: int) -> None:
        log.info("worker %s serving queue %s with engine %s", self.name, self.queue_name, self.engine.name)
        while not self.stopping.is_set():
            if max_jobs is not None and self.processed >= max_jobs:
                break
            try:
                self._once(block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Redis restarting or unreachable: keep the process (and its loaded model); a job whose result
                # could not be recorded is still pending and comes back after the visibility timeout.
                log.warning("Redis unavailable (%s); retrying in %.0fs", e, REDIS_RETRY_SECONDS)
                with self._lock:
                    self.held = []
                self.stopping.wait(REDIS_RETRY_SECONDS)
        log.info("worker %s stopped after %d job(s)", self.name, self.processed)

    def _once(self, block_ms: int) -> None:
        deliveries = self.queue.take(self.queue_name, self.name, count=1, block_ms=block_ms)
        with self._lock:
            self.held = list(deliveries)
        if deliveries:  # tell the scaler at once, not at the next beat, that this worker must not go
            self.queue.worker_heartbeat(self.queue_name, self.name, busy=True)
        for d in deliveries:
            self.process(d)
            with self._lock:
                self.held.remove(d)
        if deliveries:
            self.queue.worker_heartbeat(self.queue_name, self.name, busy=False)

    def _heartbeat(self) -> None:
        while not self._finished.wait(self.heartbeat_seconds):
            with self._lock:
                held = list(self.held)
            try:
                self.queue.worker_heartbeat(self.queue_name, self.name, busy=bool(held))
            except Exception as e:
                log.warning("worker heartbeat failed: %s", e)
            for d in held:
                try:
                    self.queue.heartbeat(d, self.name)
                except Exception as e:  # a missed beat only risks a redelivery, which results tolerate
                    log.warning("heartbeat failed for %s: %s", d.entry_id, e)

    # -- one job ------------------------------------------------------------------------------------------
    def _event(self, d: Delivery, type_: str, **kw: object) -> JobEvent:
        m = d.message
        return JobEvent.model_validate(
            {
                "type": type_,
                "uid": m.uid,
                "namespace": m.namespace,
                "name": m.name,
                "worker": self.name,
                "attempt": d.attempt,
                **kw,
            }
        )

    def process(self, d: Delivery) -> str:
        m = d.message
        outcome = self.queue.begin(d, self.name)
        if outcome == "done":  # a redelivery of a job whose results are already recorded
            self.queue.ack(d)
            return self._count("duplicate")
        if outcome == "cancelled":
            self.queue.ack(d)
            self.queue.publish(self._event(d, "cancelled", reason="Cancelled", message="cancelled before start"))
            return self._count("cancelled")
        if outcome == "exhausted":
            ev = self._event(
                d,
                "failed",
                reason="MaxRetriesExceeded",
                message=f"gave up after {d.attempt - 1} attempt(s) (worker lost or crashed)",
            )
            self.queue.fail(d, ev, retry=False)
            return self._count("dead_lettered")

        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - m.enqueued_at))
        p = m.params
        total = (p.steps or 0) * p.num_images  # progress counts steps over all images of the job
        self.queue.publish(self._event(d, "started", total_steps=total))
        t0 = time.perf_counter()
        metrics.BUSY.set(1)
        try:
            images = self.engine.generate(
                p, on_step=self._progress(d), should_stop=self._should_stop(d), load_image=self._loader(m)
            )
            run_seconds = time.perf_counter() - t0
            metrics.INFERENCE_SECONDS.observe(run_seconds)
            results = self._store(d, images)
        except HandedBack:
            self.queue.release(d)
            return self._count("handed_back")
        except Cancelled:
            self.queue.ack(d)
            self.queue.publish(
                self._event(
                    d,
                    "cancelled",
                    reason="Cancelled",
                    message="cancelled while running",
                    run_seconds=time.perf_counter() - t0,
                )
            )
            return self._count("cancelled")
        except InputError as e:
            log.warning("job %s/%s failed on its input: %s", m.namespace, m.name, e)
            self.queue.fail(d, self._event(d, "failed", reason="InvalidInput", message=str(e)[:1000]), retry=False)
            return self._count("failed")
        except Exception as e:
            reason = "OutOfMemory" if _is_oom(e) else "WorkerError"
            if reason == "OutOfMemory":
                self._free_memory()
            log.exception("job %s/%s attempt %d failed", m.namespace, m.name, d.attempt)
            state = self.queue.fail(
                d,
                self._event(
                    d,
                    "failed",
                    reason=reason,
                    message=f"{type(e).__name__}: {e}"[:1000],
                    run_seconds=time.perf_counter() - t0,
                ),
                retry=True,
            )
            return self._count("retried" if state == "retrying" else "failed")
        finally:
            metrics.BUSY.set(0)
        first = self.queue.complete(
            d,
            results,
            self._event(d, "succeeded", results=results, run_seconds=round(run_seconds, 4), total_steps=total),
        )
        return self._count("succeeded" if first else "duplicate")

    def _count(self, outcome: str) -> str:
        metrics.JOBS.labels(outcome=outcome).inc()
        self.processed += 1
        return outcome

    def _progress(self, d: Delivery) -> Callable[[int, int], None]:
        def on_step(step: int, total: int) -> None:
            try:
                self.queue.publish(self._event(d, "progress", step=step, total_steps=total))
            except redis.RedisError as e:  # progress is advisory: never fail an image for it
                log.warning("progress of %s not published: %s", d.message.uid, e)

        return on_step

    def _should_stop(self, d: Delivery) -> Callable[[], bool]:
        def should_stop() -> bool:
            if self.hand_back.is_set():
                raise HandedBack()
            return self.queue.is_cancelled(d.message.uid)

        return should_stop

    def _loader(self, m: JobMessage) -> Callable[[str], bytes]:
        def load(uri: str) -> bytes:
            try:
                return read_uri(uri, self.store, m.tenant or m.namespace)
            except Exception as e:
                raise InputError(f"cannot read {uri}: {e}") from e

        return load

    def _store(self, d: Delivery, images: list[Image.Image]) -> list[ResultImage]:
        m, p = d.message, d.message.params
        t0 = time.perf_counter()
        results = []
        for i, img in enumerate(images):
            data = encode(img, p.output_format)
            uri = self.store.put(output_key(m, i, p.output_format), data, _CONTENT_TYPES[p.output_format])
            results.append(
                ResultImage(
                    uri=uri,
                    width=img.width,
                    height=img.height,
                    seed=(p.seed or 0) + i,
                    sha256=hashlib.sha256(data).hexdigest(),
                    bytes=len(data),
                )
            )
        metrics.STORE_SECONDS.observe(time.perf_counter() - t0)
        return results

    @staticmethod
    def _free_memory() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
