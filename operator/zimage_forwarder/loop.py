"""The forwarder's loop: jobs from the queue, calls through the key pool, results back as for GPU jobs.

One asyncio loop serves up to ``concurrency_per_replica`` jobs at once; each waits for a key with room
(:class:`zimage_queue.keypool.KeyPool`, shared by every replica through Redis), calls the provider, and gives the
key back with the call's outcome. A 429 rests that key for the provider's ``Retry-After`` and the job takes
another key at once; a 5xx or a timeout backs off and counts toward the key's circuit breaker; after
``remote_max_attempts`` calls the job fails as ``ProviderUnavailable`` (a fallback deployment's cue). Queue and
store calls are short and run in threads; nothing CPU-heavy runs here (image decoding and encoding of what the
provider returns aside, in a thread).
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zimage_forwarder import metrics
from zimage_forwarder.provider import Provider, Reply, estimate_tokens
from zimage_forwarder.settings import ForwarderSettings
from zimage_queue import JobEvent, JobQueue
from zimage_queue.keypool import Grant, KeyPool
from zimage_queue.keys import queue_name
from zimage_queue.queue import Delivery
from zimage_queue.supervise import backoff_seconds

log = logging.getLogger(__name__)

TAKE_BLOCK_MS = 1000
LAG_PROBE_SECONDS = 0.05


def read_keys(directory: str) -> dict[str, str]:
    """The keys Secret mounted as files: key id (the file's name) -> key. Hidden files (the volume's ..data
    links) are skipped."""
    out: dict[str, str] = {}
    root = Path(directory)
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        value = path.read_text().strip()
        if value:
            out[path.name] = value
    return out


# A provider's last answer -> the job's failure reason and its fallback class.
FAILURES = {
    "unavailable": ("ProviderUnavailable", "unavailable"),
    "rate_limited": ("ProviderRateLimited", "rateLimited"),
    "rejected": ("ProviderFailed", "failed"),
}


def fallback_next(chain: list[str] | None, own: list[str]) -> tuple[str, list[str]] | None:
    """Where a failed job goes: the next name of the chain it carries (the first deployment's list, set when it
    first moved), else the first of this deployment's own list; with what is left of the chain. None: nowhere
    (the chain is used up, or there was none)."""
    names = chain if chain is not None else own
    if not names:
        return None
    return names[0], list(names[1:])


class Forwarder:
    def __init__(
        self,
        cfg: ForwarderSettings,
        queue: JobQueue,
        pool: KeyPool,
        provider: Provider,
        store: Any,
        secrets: Callable[[], dict[str, str]],
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.pool = pool
        self.provider = provider
        self.store = store
        self.secrets = secrets
        self.name = cfg.worker_name
        self.held: dict[str, Delivery] = {}
        self.processed = 0
        self.worst_lag = 0.0
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, max_jobs: int | None = None) -> None:
        """Until stop (then the jobs in hand finish) or ``max_jobs`` done."""
        await asyncio.to_thread(self.queue.ensure_queue, self.cfg.queue)
        slots = asyncio.Semaphore(self.cfg.concurrency_per_replica)
        tasks: set[asyncio.Task[None]] = set()
        helpers = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._lag_probe())]
        started = 0
        try:
            while not self._stop.is_set() and (max_jobs is None or started < max_jobs):
                await slots.acquire()
                free = self.cfg.concurrency_per_replica - len(self.held)  # >= 1: one slot is ours
                want = max(1, min(free, (max_jobs - started) if max_jobs else free, 32))
                try:
                    got = await asyncio.to_thread(
                        self.queue.take, self.cfg.queue, self.name, count=want, block_ms=TAKE_BLOCK_MS
                    )
                except Exception as e:  # Redis away for a moment: look again after a pause
                    slots.release()
                    log.warning("taking jobs failed: %s", e)
                    await asyncio.sleep(1.0)
                    continue
                if not got:
                    slots.release()
                    continue
                for i, d in enumerate(got):
                    if i:  # the first took the slot acquired above
                        await slots.acquire()
                    started += 1
                    self.held[d.entry_id] = d
                    task = asyncio.create_task(self._serve(d, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _serve(self, d: Delivery, slots: asyncio.Semaphore) -> None:
        metrics.IN_FLIGHT.inc()
        try:
            outcome = await self._job(d)
        except Exception as e:  # a bug or Redis gone: the entry stays pending and is redelivered
            log.exception("job %s/%s: %s", d.message.namespace, d.message.name, e)
            outcome = "error"
        finally:
            self.held.pop(d.entry_id, None)
            metrics.IN_FLIGHT.dec()
            slots.release()
        metrics.JOBS.labels(outcome=outcome).inc()
        self.processed += 1

    def _event(self, d: Delivery, type_: str, **kw: Any) -> JobEvent:
        m = d.message
        return JobEvent(
            type=type_,
            uid=m.uid,
            namespace=m.namespace,
            name=m.name,
            worker=self.name,
            attempt=d.attempt,
            bulk=m.bulk,
            **kw,
        )

    async def _job(self, d: Delivery) -> str:
        q = self.queue
        begun = await asyncio.to_thread(q.begin, d, self.name)
        if begun == "done":
            await asyncio.to_thread(q.ack, d)
            return "duplicate"
        if begun == "cancelled":
            ev = self._event(d, "cancelled", reason="Cancelled", message="cancelled before start")
            await asyncio.to_thread(q.cancelled, d, ev)
            return "cancelled"
        if begun == "exhausted":
            ev = self._event(d, "failed", reason="MaxRetriesExceeded", message="gave up (forwarder lost)")
            await asyncio.to_thread(q.fail, d, ev, retry=False)
            return "failed"
        m = d.message
        await asyncio.to_thread(q.publish, self._event(d, "started"), m.queue)
        t0 = time.perf_counter()
        image, mask = await asyncio.to_thread(self._inputs, d)
        reply = await self._call_with_retries(d, image, mask)
        run_seconds = round(time.perf_counter() - t0, 4)
        if reply is None:
            ev = self._event(d, "cancelled", reason="Cancelled", message="cancelled while waiting for the provider")
            await asyncio.to_thread(q.cancelled, d, ev)
            return "cancelled"
        if reply.status != "ok":
            reason, failure = FAILURES[reply.status]
            if await asyncio.to_thread(self._fall_back, d, failure, reason):
                return "moved"
            ev = self._event(d, "failed", reason=reason, message=reply.message[:1000], run_seconds=run_seconds)
            await asyncio.to_thread(q.fail, d, ev, retry=False)
            return "failed"
        if self.provider.api == "chat":
            ev = self._event(d, "succeeded", text=reply.text, results=[], run_seconds=run_seconds)
            first = await asyncio.to_thread(q.complete, d, [], ev)
        else:
            results = await asyncio.to_thread(self._store, d, reply)
            ev = self._event(d, "succeeded", results=results, run_seconds=run_seconds)
            first = await asyncio.to_thread(q.complete, d, results, ev)
        return "succeeded" if first else "duplicate"

    def _fall_back(self, d: Delivery, failure: str, reason: str) -> bool:
        """Move the job to the next fallback for this failure class, if there is one (see fallback_next)."""
        step = fallback_next(d.message.fallback_chain, self.cfg.fallbacks.get(failure, []))  # type: ignore[call-overload]
        if step is None:
            return False
        target, rest = step
        namespace = d.message.namespace
        moved = self.queue.move(d, queue_name(namespace, target), target, reason, update={"fallback_chain": rest})
        log.info("job %s/%s moved to %s (%s)", namespace, d.message.name, target, reason)
        return bool(moved)

    def _inputs(self, d: Delivery) -> tuple[bytes | None, bytes | None]:
        from zimage_worker.storage import read_uri

        p, tenant = d.message.params, d.message.tenant or d.message.namespace
        image = read_uri(p.input_image, self.store, tenant) if p.input_image else None
        mask = read_uri(p.mask_image, self.store, tenant) if p.mask_image else None
        return image, mask

    def _store(self, d: Delivery, reply: Reply) -> list[Any]:
        from PIL import Image

        from zimage_worker.results import store_images

        images: list[Image.Image] = []
        for data in reply.images:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                images.append(img.copy())
        return store_images(self.store, d.message, images)

    async def _call_with_retries(self, d: Delivery, image: bytes | None, mask: bytes | None) -> Reply | None:
        """The provider's answer, or None when the job was cancelled meanwhile."""
        p = d.message.params
        tokens = estimate_tokens(p) if self.provider.api == "chat" else 0
        deadline = time.monotonic() + (d.message.timeout_seconds or 3600)
        reply = Reply("unavailable", "no call made")
        failures = 0
        for _ in range(self.cfg.remote_max_attempts):
            if await asyncio.to_thread(self.queue.is_cancelled, d.message.uid, d.message.queue):
                return None
            got = await self.pool.try_acquire(tokens)
            if not isinstance(got, Grant) and await self._all_failing():
                # Every key is benched after failures: the provider is down for us, whatever the wait says.
                return Reply("unavailable", "every key of the pool is benched after failing calls")
            try:
                grant = (
                    got
                    if isinstance(got, Grant)
                    else await self.pool.acquire(tokens, timeout=max(1.0, deadline - time.monotonic()))
                )
            except TimeoutError:
                return Reply("rate_limited", "no key had room before the job's deadline")
            secret = self.secrets().get(grant.key_id)
            if secret is None:  # the key left the Secret since the pool was built
                await self.pool.release(grant, "failed")
                continue
            t0 = time.perf_counter()
            reply = await self.provider.call(secret, p, image, mask)
            metrics.CALL_SECONDS.observe(time.perf_counter() - t0)
            metrics.CALLS.labels(outcome=reply.status).inc()
            await self._release(grant, reply)
            if reply.status in ("ok", "rejected"):
                return reply
            if reply.status == "unavailable":
                failures += 1
                pause = backoff_seconds(failures, base=0.5, cap=30.0, jitter=random.random())
                await asyncio.sleep(max(pause, reply.retry_after or 0.0))
            # rate_limited: that key rests; the next acquire picks another at once
        return reply

    async def _all_failing(self) -> bool:
        now = time.time()
        status = await self.pool.status()
        return bool(status) and all(k.reason == "failing" and (k.benched_until or 0) > now for k in status)

    async def _release(self, grant: Grant, reply: Reply) -> None:
        if reply.status == "rate_limited":
            await self.pool.release(grant, "rate_limited", retry_after=reply.retry_after or 1.0)
        elif reply.status == "unavailable":
            await self.pool.release(grant, "failed")
        else:
            await self.pool.release(grant, "ok", tokens_used=reply.tokens)

    async def _heartbeats(self) -> None:
        """Keep the entries in hand from being reclaimed while their calls take their time."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_seconds)
            try:
                await asyncio.to_thread(self.queue.worker_heartbeat, self.cfg.queue, self.name, bool(self.held))
                for d in list(self.held.values()):
                    await asyncio.to_thread(self.queue.heartbeat, d, self.name)
            except Exception as e:
                log.warning("heartbeat failed: %s", e)

    async def _lag_probe(self) -> None:
        """How late the loop wakes up: the cost of anything blocking it (it should stay near zero)."""
        loop = asyncio.get_running_loop()
        window_start, worst = loop.time(), 0.0
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_PROBE_SECONDS)
            lag = loop.time() - t0 - LAG_PROBE_SECONDS
            worst = max(worst, lag)
            self.worst_lag = max(self.worst_lag, lag)
            if loop.time() - window_start >= 10:
                metrics.LOOP_LAG.set(worst)
                window_start, worst = loop.time(), 0.0
