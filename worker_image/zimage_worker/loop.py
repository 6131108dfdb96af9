"""The worker loop: take jobs, run them (compatible ones batched), store the images, then ack (never before).

Shutdown follows arq/rq: the first SIGTERM stops taking jobs and lets the current one finish; a second one
hands the current job back to the queue between two steps. Either way the process exits 0.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, cast

import redis

from zimage_queue import Delivery, JobEvent, JobMessage, JobQueue
from zimage_queue.supervise import Health, backoff_seconds, run_thread
from zimage_worker import affinity, metrics
from zimage_worker.engine import (
    AdapterSet,
    BatchEngine,
    Cancelled,
    Engine,
    Request,
    UnknownAdapter,
    adapter_engine,
    adapter_set,
    batch_key,
    engine_scales,
)
from zimage_worker.results import store_images
from zimage_worker.storage import ImageStore, read_uri
from zimage_worker.watchdog import Watchdog

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


class InputError(Exception):
    """The job's own input is bad (unreadable image...): retrying cannot help."""


class HandedBack(Exception):
    """Raised between steps when the worker must give the job back (second SIGTERM)."""


CANCEL_POLL_SECONDS = 0.2
PROGRESS_INTERVAL_SECONDS = 0.1


def _resolved(outcome: str) -> Future[str]:
    f: Future[str] = Future()
    f.set_result(outcome)
    return f


def _total_steps(m: JobMessage) -> int:
    """Progress counts steps over all images of the job (the operator resolved the steps)."""
    return (m.params.steps or 0) * m.params.num_images


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


class Worker:
    """Takes up to ``max_batch_size`` jobs at once (waiting up to ``max_wait_ms`` to fill a batch), runs the
    compatible ones as one pipeline call, and hands encoding, upload and the result record to a finisher
    thread, so the next batch starts while the last one's images are still being written.

    With an engine that serves LoRA adapters (``AdapterEngine``) and ``adapter_affinity_max_wait_ms`` above 0,
    it holds up to twice ``max_batch_size`` jobs and runs one call per pass, choosing by adapter affinity
    (``zimage_worker.affinity``): the active adapter set first, no job deferred past the wait or the passes."""

    def __init__(
        self,
        queue: JobQueue,
        engine: Engine,
        store: ImageStore,
        queue_name: str,
        name: str,
        heartbeat_seconds: float = 5.0,
        max_batch_size: int = 1,
        max_wait_ms: int = 0,
        finisher_threads: int = 2,
        cancel_poll_seconds: float = CANCEL_POLL_SECONDS,
        progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
        stuck_base_seconds: float = 300.0,
        stuck_step_seconds: float = 30.0,
        fetch_allowed_hosts: Collection[str] = (),
        loop_max_failures: int = 10,
        adapter_affinity_max_wait_ms: int = 2000,
        adapter_affinity_max_passes: int = 4,
    ) -> None:
        self.queue = queue
        self.engine = engine
        self.device = device_name(engine)
        self.store = store
        self.queue_name = queue_name
        self.name = name
        self.heartbeat_seconds = heartbeat_seconds
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_ms = max(0, max_wait_ms)
        self.finisher_threads = finisher_threads
        self.cancel_poll_seconds = cancel_poll_seconds
        self.progress_interval_seconds = progress_interval_seconds
        self.fetch_allowed_hosts = tuple(fetch_allowed_hosts)  # http(s) inputs only from these (default: none)
        self.affinity_wait_s = max(0, adapter_affinity_max_wait_ms) / 1000
        self.affinity_passes = max(1, adapter_affinity_max_passes)
        # Holding (an adapter engine): jobs taken and begun, waiting for their turn by affinity.
        self.holding = self.affinity_wait_s > 0 and bool(engine_scales(engine))
        self.pending: list[affinity.Group[Delivery]] = []
        self.stopping = threading.Event()  # take no new job
        self.hand_back = threading.Event()  # give the current job back now
        self._finished = threading.Event()
        self.held: list[Delivery] = []  # taken and not yet acked, released or failed: heartbeated
        self._lock = threading.Lock()
        self.processed = 0
        self.taken = 0
        self._finisher: ThreadPoolExecutor | None = None
        self._busy_reported = False
        self._adapters_reported = False
        # Backpressure: the GPU loop waits when this many finished jobs are still being encoded and stored.
        self._finishing = threading.Semaphore(self.max_batch_size * 2)
        # Liveness: the supervised loops (jobs, heartbeat, finisher) and the pipeline call's time budget.
        self.health = Health(max_failures=loop_max_failures)
        self.watchdog = Watchdog(self.health, stuck_base_seconds, stuck_step_seconds)
        now = time.monotonic()
        for loop in ("jobs", "finisher"):  # no pass for hours is fine for both: an idle worker waits
            self.health.register(loop, now, stall_seconds=float("inf"))

    # -- lifecycle ----------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        if self.stopping.is_set():
            self.hand_back.set()
        self.stopping.set()

    def run(self, max_jobs: int | None = None, block_ms: int = 1000) -> None:
        if not self._connect():
            return
        run_thread(
            self.health,
            "heartbeat",
            self._beat,
            self.heartbeat_seconds,
            self._finished,
            stall_seconds=max(60.0, self.heartbeat_seconds * 10),
        )
        self._busy_reported = False
        self._finisher = ThreadPoolExecutor(self.finisher_threads, thread_name_prefix="finisher")
        try:
            self._loop(max_jobs, block_ms)
        finally:
            self._finisher.shutdown(wait=True)  # every job taken is recorded (or handed back) before we go
            self._finisher = None
            self._finished.set()
            try:
                self.queue.worker_gone(self.queue_name, self.name)
            except redis.RedisError as e:  # its heartbeat entry ages out for the scaler
                log.warning("could not say goodbye: %s", e)

    def _wait_for_redis(self, e: Exception) -> None:
        """Redis restarting or unreachable (past the client's own retries): keep the process and its loaded
        model, back off; liveness turns red if it never comes back."""
        failures = self.health.failed("jobs", time.monotonic(), f"{type(e).__name__}: {e}")
        delay = backoff_seconds(failures, base=0.2, cap=10.0, jitter=random.random())
        log.warning("Redis unavailable (%s); retrying in %.1fs", e, delay)
        self.stopping.wait(delay)

    def _connect(self) -> bool:
        """The queue's groups and the first heartbeat, however long Redis takes to come (False: stopped first)."""
        while not self.stopping.is_set():
            try:
                self.queue.ensure_queue(self.queue_name)
                self.queue.worker_heartbeat(self.queue_name, self.name, busy=False)
                return True
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._wait_for_redis(e)
        return False

    def _loop(self, max_jobs: int | None, block_ms: int) -> None:
        log.info(
            "worker %s serving queue %s with engine %s (batches of up to %d)",
            self.name,
            self.queue_name,
            self.engine.name,
            self.max_batch_size,
        )
        while not self.stopping.is_set():
            if max_jobs is not None and self.taken >= max_jobs and not self.pending:
                break
            try:
                self._once(block_ms, None if max_jobs is None else max_jobs - self.taken)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # A job whose result could not be recorded is still pending: it comes back after the
                # visibility timeout (so do the held ones).
                with self._lock:
                    self.held = []
                self.pending = []
                self._wait_for_redis(e)
                continue
            self.health.ok("jobs", time.monotonic())
        self._release_pending()
        log.info("worker %s stopped after %d job(s)", self.name, self.processed)

    def _once(self, block_ms: int, left: int | None) -> None:
        """One pass: take jobs (up to ``left`` more, when counted), then run them all, or, when holding, the
        one group that affinity picks, keeping the rest for the next pass."""
        held = sum(len(g.jobs) for g in self.pending)
        want = (2 if self.holding else 1) * self.max_batch_size - held
        if left is not None:
            want = min(want, left)
        deliveries = self._take(0 if self.pending else block_ms, want) if want > 0 else []
        if not deliveries and not self.pending:
            return
        if deliveries:
            self.taken += len(deliveries)
            with self._lock:
                self.held.extend(deliveries)
            self._report_busy(True)  # tell the scaler at once, not at the next beat
        if not self.holding:
            self.process_batch(deliveries)
        else:
            runnable = self._begin_all(deliveries, [])
            self.pending = affinity.add(self.pending, self._placed(runnable), time.monotonic(), self.max_batch_size)
            if self.pending:
                group, self.pending = self._next(self.pending)
                self._run_group(group.jobs)
        with self._lock:
            busy = bool(self.held)
        self._report_busy(busy)

    def _placed(self, deliveries: list[Delivery]) -> list[tuple[object, AdapterSet, Delivery]]:
        """Each job with its batch key (None: it runs alone) and its resolved adapter set."""
        scales = engine_scales(self.engine)
        batching = hasattr(self.engine, "generate_batch")
        return [
            (
                batch_key(d.message.params, self.engine.variant, scales) if batching else None,
                adapter_set(d.message.params, scales),
                d,
            )
            for d in deliveries
        ]

    def _next(
        self, groups: list[affinity.Group[Delivery]]
    ) -> tuple[affinity.Group[Delivery], list[affinity.Group[Delivery]]]:
        active: AdapterSet | None = None  # an engine without adapters: arrival order
        resident: list[str] = []
        if (engine := adapter_engine(self.engine)) is not None:
            active, resident = engine.active_adapters(), engine.resident_adapters()
        return affinity.take_next(
            groups, active, resident, time.monotonic(), self.affinity_wait_s, self.affinity_passes
        )

    def _release_pending(self) -> None:
        """Stopping: the jobs held for a later call go back to the queue (they have not started)."""
        for group in self.pending:
            for d in group.jobs:
                try:
                    self.queue.release(d)
                except redis.RedisError as e:  # still pending: redelivered after the visibility timeout
                    log.warning("could not hand back %s: %s", d.entry_id, e)
                self._let_go(d)
                self._count("handed_back")
        self.pending = []

    def _report_busy(self, busy: bool) -> None:
        # Only changes: between two jobs of a busy worker the periodic beat is enough.
        if busy != self._busy_reported:
            self.queue.worker_heartbeat(self.queue_name, self.name, busy=busy)
            self._busy_reported = busy

    def _take(self, block_ms: int, want: int) -> list[Delivery]:
        got = self.queue.take(self.queue_name, self.name, count=want, block_ms=block_ms)
        if not got or self.max_wait_ms == 0:
            return got
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while len(got) < want and not self.stopping.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            got += self.queue.take(self.queue_name, self.name, count=want - len(got), block_ms=left_ms)
        return got

    def _beat(self) -> None:
        """One heartbeat: the worker's own (for the scaler; raises, so the loop counts it) and each held job's."""
        with self._lock:
            held = list(self.held)
        self.queue.worker_heartbeat(self.queue_name, self.name, busy=bool(held))
        engine = adapter_engine(self.engine)
        loaded = engine.resident_adapters() if engine is not None else []
        if loaded or self._adapters_reported:  # for the ModelDeployment's status.adapters
            self.queue.report_adapters(self.queue_name, self.name, loaded)
            self._adapters_reported = bool(loaded)
        for d in held:
            try:
                self.queue.heartbeat(d, self.name)
            except Exception as e:  # a missed beat only risks a redelivery, which results tolerate
                log.warning("heartbeat failed for %s: %s", d.entry_id, e)

    def _let_go(self, d: Delivery) -> None:
        with self._lock:
            if d in self.held:
                self.held.remove(d)

    # -- jobs ---------------------------------------------------------------------------------------------
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
                "bulk": m.bulk,
                **kw,
            }
        )

    def process(self, d: Delivery) -> str:
        """One job, start to finish: its outcome (``succeeded``, ``cancelled``, ``duplicate``...)."""
        [outcome] = self.process_batch([d])
        return outcome.result()

    def process_batch(self, deliveries: list[Delivery]) -> list[Future[str]]:
        """Start every job, run the compatible ones together (groups in affinity order), and return each job's
        outcome (a future: the images of a job that ran are stored by the finisher)."""
        outcomes: list[Future[str]] = []
        runnable = self._begin_all(deliveries, outcomes)
        groups = affinity.add([], self._placed(runnable), time.monotonic(), max(1, len(runnable)))
        while groups:
            group, groups = self._next(groups)
            outcomes += self._run_group(group.jobs)
        return outcomes

    def _begin_all(self, deliveries: list[Delivery], outcomes: list[Future[str]]) -> list[Delivery]:
        """Count each attempt; the jobs to run (the others' outcomes go to ``outcomes``)."""
        runnable = []
        for d in deliveries:
            early = self._begin(d)
            if early is None:
                runnable.append(d)
            else:
                self._let_go(d)
                outcomes.append(_resolved(early))
        return runnable

    def _run_group(self, group: list[Delivery]) -> list[Future[str]]:
        for d in group:
            self._start(d)
        return self._run(group)

    def _begin(self, d: Delivery) -> str | None:
        """Count the attempt; the outcome of a job that must not run, or None when it runs."""
        outcome = self.queue.begin(d, self.name)
        if outcome == "done":  # a redelivery of a job whose results are already recorded
            self.queue.ack(d)
            return self._count("duplicate")
        if outcome == "cancelled":
            self.queue.cancelled(d, self._event(d, "cancelled", reason="Cancelled", message="cancelled before start"))
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
        return None

    def _start(self, d: Delivery) -> None:
        """``started``, right before the job's pipeline call."""
        m = d.message
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - m.enqueued_at))
        self.queue.publish(self._event(d, "started", total_steps=_total_steps(m)), queue=m.queue)

    def _request(self, d: Delivery) -> Request:
        return Request(d.message.params, self._progress(d), self._should_stop(d), self._loader(d.message))

    def _run(self, group: list[Delivery]) -> list[Future[str]]:
        t0 = time.perf_counter()
        usage = {"batchImages": sum(d.message.params.num_images for d in group), "device": self.device}
        metrics.BUSY.set(1)
        self.watchdog.call_started(sum(_total_steps(d.message) for d in group))
        try:
            if len(group) == 1:
                r = self._request(group[0])
                batch: list[list[Image.Image] | None] = [
                    self.engine.generate(
                        r.params, on_step=r.on_step, should_stop=r.should_stop, load_image=r.load_image
                    )
                ]
            else:
                batch = cast("BatchEngine", self.engine).generate_batch([self._request(d) for d in group])
        except HandedBack:
            for d in group:
                self.queue.release(d)
                self._let_go(d)
            return [_resolved(self._count("handed_back")) for _ in group]
        except Cancelled:
            batch = [None] * len(group)
        except (InputError, UnknownAdapter) as e:  # a bad input (a job alone) or adapter (the whole group's)
            for d in group:
                log.warning("job %s/%s failed on its input: %s", d.message.namespace, d.message.name, e)
                ev = self._event(d, "failed", reason="InvalidInput", message=str(e)[:1000])
                self.queue.fail(d, ev, retry=False)
                self._let_go(d)
            return [_resolved(self._count("failed")) for _ in group]
        except Exception as e:
            if _is_oom(e):
                self._free_memory()
            if len(group) > 1:
                # One bad job (or a batch too big for memory) must not fail the others: run each alone.
                log.warning("batch of %d failed (%s: %s); running its jobs one by one", len(group), type(e).__name__, e)
                return [f for d in group for f in self._run([d])]
            [d] = group
            log.exception("job %s/%s attempt %d failed", d.message.namespace, d.message.name, d.attempt)
            self.queue.record_usage([d], usage)
            state = self.queue.fail(
                d,
                self._event(
                    d,
                    "failed",
                    reason="OutOfMemory" if _is_oom(e) else "WorkerError",
                    message=f"{type(e).__name__}: {e}"[:1000],
                    run_seconds=time.perf_counter() - t0,
                ),
                retry=True,
            )
            self._let_go(d)
            return [_resolved(self._count("retried" if state == "retrying" else "failed"))]
        finally:
            self.watchdog.call_ended()
            metrics.BUSY.set(0)
        run_seconds = time.perf_counter() - t0
        self.queue.record_usage(group, usage)
        metrics.INFERENCE_SECONDS.observe(run_seconds)
        metrics.BATCH_SIZE.observe(len(group))
        outcomes = []
        for d, images in zip(group, batch, strict=True):
            if images is None:
                self.queue.cancelled(
                    d,
                    self._event(
                        d,
                        "cancelled",
                        reason="Cancelled",
                        message="cancelled while running",
                        run_seconds=run_seconds,
                    ),
                )
                self._let_go(d)
                outcomes.append(_resolved(self._count("cancelled")))
            else:
                outcomes.append(self._finish_later(d, images, run_seconds))
        return outcomes

    def _finish_later(self, d: Delivery, images: list[Image.Image], run_seconds: float) -> Future[str]:
        if self._finisher is None:  # called outside run(): finish inline
            return _resolved(self._finish(d, images, run_seconds, hold=False))
        self._finishing.acquire()
        return self._finisher.submit(self._finish, d, images, run_seconds, hold=True)

    def _finish(self, d: Delivery, images: list[Image.Image], run_seconds: float, hold: bool) -> str:
        """Encode and store the images, then record the result and ack (never before)."""
        try:
            results = store_images(self.store, d.message, images)
            first = self.queue.complete(
                d,
                results,
                self._event(
                    d,
                    "succeeded",
                    results=results,
                    run_seconds=round(run_seconds, 4),
                    total_steps=_total_steps(d.message),
                ),
            )
            self.health.ok("finisher", time.monotonic())
            return self._count("succeeded" if first else "duplicate")
        except Exception as e:
            log.exception("storing the results of %s/%s failed", d.message.namespace, d.message.name)
            self.health.failed("finisher", time.monotonic(), f"{type(e).__name__}: {e}")
            try:
                ev = self._event(d, "failed", reason="WorkerError", message=f"{type(e).__name__}: {e}"[:1000])
                state = self.queue.fail(d, ev, retry=True)
            except redis.RedisError:  # still pending: redelivered after the visibility timeout
                return self._count("failed")
            return self._count("retried" if state == "retrying" else "failed")
        finally:
            self._let_go(d)
            if hold:
                self._finishing.release()

    def _count(self, outcome: str) -> str:
        metrics.JOBS.labels(outcome=outcome).inc()
        with self._lock:
            self.processed += 1
        return outcome

    def _progress(self, d: Delivery) -> Callable[[int, int], None]:
        published_at = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal published_at
            # At most one event per progress_interval_seconds per job (and always the last step): a round
            # trip per step per job of a batch would sit between two GPU steps for nothing anyone can see.
            now = time.monotonic()
            if step < total and now - published_at < self.progress_interval_seconds:
                return
            published_at = now
            try:
                self.queue.publish(self._event(d, "progress", step=step, total_steps=total), queue=d.message.queue)
            except redis.RedisError as e:  # progress is advisory: never fail an image for it
                log.warning("progress of %s not published: %s", d.message.uid, e)

        return on_step

    def _should_stop(self, d: Delivery) -> Callable[[], bool]:
        checked_at = 0.0

        def should_stop() -> bool:
            nonlocal checked_at
            if self.hand_back.is_set():
                raise HandedBack()
            # Asked between every two steps; Redis is asked at most every cancel_poll_seconds, so fast steps
            # do not spend their time on round trips (a cancel still lands within that time).
            now = time.monotonic()
            if now - checked_at < self.cancel_poll_seconds:
                return False
            checked_at = now
            return self.queue.is_cancelled(d.message.uid, queue=d.message.queue)

        return should_stop

    def _loader(self, m: JobMessage) -> Callable[[str], bytes]:
        def load(uri: str) -> bytes:
            try:
                return read_uri(uri, self.store, m.tenant or m.namespace, self.fetch_allowed_hosts)
            except Exception as e:
                raise InputError(f"cannot read {uri}: {e}") from e

        return load

    @staticmethod
    def _free_memory() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def device_name(engine: object) -> str:
    """What the engine runs on, for usage records: the GPU's name, or "cpu"."""
    device = getattr(engine, "device", None)
    if getattr(device, "type", None) != "cuda":
        return "cpu"
    try:
        import torch

        return str(torch.cuda.get_device_name(device))
    except Exception:  # a name is nice to have, never worth failing a job
        return "cuda"
