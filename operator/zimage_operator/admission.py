"""Admission of new ImageJobs, many at a time, off the watch.

The ImageJob watch handler only notes what it saw; this loop admits (validate, decide the seed and defaults,
write ``Queued``, enqueue) up to ``admission_concurrency`` jobs at once. It replaces kopf's creation handlers,
which wrote a bookkeeping patch on every job and ran one job per worker task. A job is admitted on the version
the watch showed (a write onto a changed object is refused and decided again on a fresh read), and a job whose
admission failed for now (the API server or Redis down, its model not there yet) is tried again after a delay.

On a restart every job the list shows ``Queued`` is enqueued again: the handler that wrote ``Queued`` may have
died before its XADD, and the queue drops the duplicate by uid.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from typing import Any

import redis

from zimage_history import quotas
from zimage_operator import reconcile
from zimage_operator.k8s import StatusConflict
from zimage_operator.metrics import ADMISSION_BACKLOG, ADMISSIONS, JOBS_ENQUEUED, JOBS_FINISHED
from zimage_operator.runtime import Runtime
from zimage_operator.types import tenant_of
from zimage_queue.supervise import backoff_seconds, take_batch

log = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 1.0
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0
REDIS_RETRY_SECONDS = 2.0
CONFLICT_RETRIES = 5


def needs_admission(body: dict[str, Any], first_sight: bool) -> bool:
    """A job not admitted yet, or (first seen by this process) one marked Queued that may not be enqueued."""
    phase = (body.get("status") or {}).get("phase")
    return phase in (None, "", "Pending") or (first_sight and phase == "Queued")


class Admitter:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.bodies: dict[str, dict[str, Any]] = {}  # uid -> the latest body seen, while it awaits admission
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        self.waiting: set[str] = set()  # in `ready`, being admitted, or due again later
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.failures: dict[str, int] = {}  # uid -> admissions failed in a row (backoff)

    def __len__(self) -> int:
        return len(self.bodies)

    def observe(self, body: dict[str, Any], first_sight: bool) -> None:
        """From the watch: remember the latest body of a job that needs admission, and queue it once."""
        uid = (body.get("metadata") or {}).get("uid", "")
        if not needs_admission(body, first_sight):
            return  # admitted (by this loop, or the API); a retry due decides on a fresh read if it changed
        self.bodies[uid] = body
        if uid not in self.waiting:
            self.waiting.add(uid)
            self.ready.put_nowait(uid)
        ADMISSION_BACKLOG.set(len(self.bodies))

    def forget(self, uid: str) -> None:
        self.bodies.pop(uid, None)
        self.failures.pop(uid, None)
        timer = self.timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
            self.waiting.discard(uid)

    def _again(self, uid: str, delay: float) -> None:
        def due() -> None:
            self.timers.pop(uid, None)
            if uid in self.bodies:
                self.ready.put_nowait(uid)
            else:
                self.waiting.discard(uid)

        self.timers[uid] = asyncio.get_running_loop().call_later(delay, due)

    async def once(self) -> None:
        """Admit what is ready, up to ``admission_concurrency`` at a time; wait a little for the first one."""
        batch = await take_batch(self.ready, self.rt.settings.admission_concurrency, IDLE_WAIT_SECONDS)
        if not batch:
            return
        await asyncio.gather(*(self._admit(uid) for uid in batch))
        ADMISSION_BACKLOG.set(len(self.bodies))

    async def _admit(self, uid: str) -> None:
        body = self.bodies.get(uid)
        if body is None:
            self.waiting.discard(uid)
            return
        try:
            delay = await self._decide(body)
        except Exception as e:  # one job's trouble never stops the others'
            failures = self.failures[uid] = self.failures.get(uid, 0) + 1
            delay = backoff_seconds(failures, base=RETRY_SECONDS, cap=MAX_RETRY_SECONDS, jitter=random.random())
            log.warning(
                "admission of %s failed (%s: %s); trying again in %.1fs", _name(body), type(e).__name__, e, delay
            )
        else:
            self.failures.pop(uid, None)
        if delay is None:
            self.bodies.pop(uid, None)
            self.waiting.discard(uid)
        else:
            self._again(uid, delay)

    async def _decide(self, body: dict[str, Any]) -> float | None:
        """Admit one job; None when done, else the seconds until it is tried again."""
        rt = self.rt
        for _ in range(CONFLICT_RETRIES):
            meta, spec = body["metadata"], body.get("spec") or {}
            status = body.get("status") or {}
            model = rt.model(meta["namespace"], spec.get("model", ""))
            if model is None:  # not in the watch's book (yet): ask, before telling the user it is missing
                model = await asyncio.to_thread(rt.kube.get_model, meta["namespace"], spec.get("model", ""))
            now = datetime.now(UTC)
            over = await self._over_quota(meta, status, now)
            decision = reconcile.admit(spec=spec, status=status, meta=meta, model=model, now=now, over_quota=over)
            ADMISSIONS.labels(action=decision.action).inc()
            if decision.action == "skip":
                return None
            changed_phase = decision.patch.get("phase") != status.get("phase")
            try:
                if changed_phase or decision.action == "wait":
                    # Status first, on the version decided on: a fast worker's Running must never be overwritten
                    # by a late Queued (the API admits its jobs itself, and its worker may be reporting already).
                    written = await rt.akube.patch_job_status(
                        meta["namespace"], meta["name"], decision.patch, meta.get("resourceVersion")
                    )
                    if written is None:
                        return None  # deleted
                    rt.observe_job(written)
                    body = self.bodies[meta["uid"]] = written  # a retry writes on this version
            except StatusConflict:
                fresh = await rt.akube.get_job(meta["namespace"], meta["name"])
                if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                    return None
                body = fresh
                continue
            if decision.action == "enqueue":
                assert decision.message is not None
                try:
                    result = await asyncio.to_thread(rt.queue.enqueue, decision.message, spec.get("priority", "normal"))
                except redis.RedisError as e:
                    log.warning("Redis unavailable (%s); enqueueing %s again soon", e, _name(body))
                    self.bodies[meta["uid"]] = {**body, "status": {**status, **decision.patch}}  # enqueue only
                    return REDIS_RETRY_SECONDS
                if result.created:
                    JOBS_ENQUEUED.labels(model=spec["model"]).inc()
            if decision.event and changed_phase:
                key = {"enqueue": "enqueued", "fail": "final"}.get(decision.action)
                rt.recorder.record(body, *decision.event, key)
            if decision.action == "fail":
                JOBS_FINISHED.labels(phase="Failed", reason=decision.event[1] if decision.event else "").inc()
            if decision.action == "wait":
                return rt.settings.model_recheck_seconds
            return None
        raise StatusConflict(f"ImageJob {_name(body)} kept changing under {CONFLICT_RETRIES} admissions")

    async def _over_quota(self, meta: dict[str, Any], status: dict[str, Any], now: datetime) -> str | None:
        """Why a job not admitted yet may not run (its tenant's GPU-second budget is spent), or None."""
        if status.get("phase") not in (None, "Pending"):
            return None
        tenant = tenant_of(meta)
        quota = quotas.quota_for(self.rt.settings.tenant_quotas, tenant)
        if quota is None:
            return None
        over = await asyncio.to_thread(quotas.over_budget, self.rt.queue.r, tenant, quota, now)
        return over[0] if over else None

    def wake(self, namespace: str) -> None:
        """A ModelDeployment appeared or changed: jobs of its namespace waiting for a model are tried now."""
        for uid, timer in list(self.timers.items()):
            body = self.bodies.get(uid)
            if body is not None and body["metadata"].get("namespace") == namespace:
                timer.cancel()
                del self.timers[uid]
                self.ready.put_nowait(uid)


def _name(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


__all__ = ["Admitter", "needs_admission"]
