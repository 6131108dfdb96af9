"""Thin kopf handlers for ImageJob: parse, call a pure decision, apply it, record an Event."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import kopf
import redis

from zimage_operator import reconcile
from zimage_operator.housekeeping import Due
from zimage_operator.k8s import StatusConflict
from zimage_operator.lease import LeaseLost
from zimage_operator.metrics import JOBS_ENQUEUED, JOBS_FINISHED
from zimage_operator.runtime import Runtime
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, TERMINAL_PHASES, VERSION
from zimage_queue.keys import queue_name

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, IMAGEJOB_PLURAL)


def _now() -> datetime:
    return datetime.now(UTC)


def _body(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.metadata)}


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
async def admit(
    spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    rt: Runtime = memo.runtime
    st = dict(status)
    model = await asyncio.to_thread(rt.kube.get_model, meta["namespace"], spec.get("model", ""))
    decision = reconcile.admit(spec=dict(spec), status=st, meta=dict(meta), model=model, now=_now())
    if decision.action == "skip":
        return
    changed_phase = decision.patch.get("phase") != st.get("phase")
    if decision.action == "enqueue":
        assert decision.message is not None
        # Status first: a fast worker's "Running" must never be overwritten by a late "Queued". Only onto the
        # version we decided on: the API admits its jobs itself, and its worker may be reporting already.
        if changed_phase:
            try:
                await asyncio.to_thread(
                    rt.kube.patch_job_status,
                    meta["namespace"],
                    meta["name"],
                    decision.patch,
                    meta.get("resourceVersion"),
                )
            except StatusConflict as e:
                raise kopf.TemporaryError(f"{e}; deciding again", delay=0.2) from e
        try:
            result = await asyncio.to_thread(rt.queue.enqueue, decision.message, spec.get("priority", "normal"))
        except redis.RedisError as e:  # not kopf's default 60 s: jobs flow again soon after Redis is back
            raise kopf.TemporaryError(f"Redis unavailable ({e}); enqueueing again", delay=2) from e
        if result.created:
            JOBS_ENQUEUED.labels(model=spec["model"]).inc()
    elif changed_phase or decision.action == "wait":
        await asyncio.to_thread(rt.kube.patch_job_status, meta["namespace"], meta["name"], decision.patch)
    if decision.event and changed_phase:
        key = {"enqueue": "enqueued", "fail": "final"}.get(decision.action)
        await asyncio.to_thread(rt.kube.post_event, _body(body), *decision.event, key)
    if decision.action == "fail":
        JOBS_FINISHED.labels(phase="Failed", reason=decision.event[1] if decision.event else "").inc()
    if decision.action == "wait":
        raise kopf.TemporaryError(decision.patch.get("message", "waiting"), delay=rt.settings.model_recheck_seconds)


@kopf.on.event(*RESOURCE)
async def track(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the deadline book and the unfinished index current; a deleted unfinished job is cancelled.

    A watch handler rather than on.delete or timers: those put a finalizer on every ImageJob, so deletes would
    hang while the operator is down. A delete missed that way costs one wasted run, whose result is dropped.
    """
    rt: Runtime = memo.runtime
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    finished = (body.get("status") or {}).get("phase") in TERMINAL_PHASES
    if event.get("type") == "DELETED":
        rt.deadlines.forget(uid)
        rt.unfinished.pop(uid, None)
        if not finished:
            await asyncio.to_thread(rt.queue.cancel, uid)  # the record then expires after the retention
            JOBS_FINISHED.labels(phase="Cancelled", reason="Deleted").inc()
        return
    if finished:
        rt.unfinished.pop(uid, None)
    else:
        rt.unfinished[uid] = (meta["namespace"], meta["name"])
    rt.deadlines.observe(dict(body))


async def act_on(rt: Runtime, due: Due) -> None:
    """timeoutSeconds -> Failed/Timeout (and the worker is told to stop); ttlSecondsAfterFinished -> delete."""
    obj = await asyncio.to_thread(rt.kube.get_job, due.namespace, due.name)
    if obj is None or obj["metadata"].get("uid") != due.uid:
        return
    now = _now()
    if due.action == "expire":
        remaining = reconcile.seconds_until_expiry(
            obj.get("spec") or {}, obj.get("status") or {}, now, rt.settings.default_ttl_seconds_after_finished
        )
        if remaining is not None and remaining <= 0:
            log.info("deleting %s/%s: ttlSecondsAfterFinished elapsed", due.namespace, due.name)
            rt.lease.check()
            await asyncio.to_thread(rt.kube.delete_job, due.namespace, due.name)
        return
    patch = reconcile.timeout_patch(obj.get("spec") or {}, obj.get("status") or {}, obj["metadata"], now)
    if patch:
        rt.lease.check()
        await asyncio.to_thread(rt.queue.cancel, due.uid)
        try:  # only onto the version we decided on: a worker's Succeeded written meanwhile wins
            await asyncio.to_thread(
                rt.kube.patch_job_status, due.namespace, due.name, patch, obj["metadata"].get("resourceVersion")
            )
        except StatusConflict:
            rt.deadlines.retry_later(due, now, delay=0.0)
            return
        await asyncio.to_thread(rt.kube.post_event, obj, "Warning", "Timeout", patch["message"], "final")
        JOBS_FINISHED.labels(phase="Failed", reason="Timeout").inc()


class Housekeeping:
    """The leader's deadlines (timeouts, TTLs) and the events stream's trim; one pass per tick."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.next_trim = 0.0

    async def once(self) -> None:
        rt = self.rt
        if not await asyncio.to_thread(rt.lease.held):  # the standby replica keeps its book, acts on nothing
            return
        for due in rt.deadlines.due(_now()):
            try:
                await act_on(rt, due)
            except LeaseLost as e:
                log.warning("%s", e)
                rt.deadlines.retry_later(due, _now())
                return
            except Exception:
                log.exception("housekeeping of %s/%s failed; will retry", due.namespace, due.name)
                rt.deadlines.retry_later(due, _now())
        if time.monotonic() >= self.next_trim:
            self.next_trim = time.monotonic() + rt.settings.events_trim_seconds
            trimmed = await asyncio.to_thread(rt.queue.trim_events, rt.settings.events_retention_seconds)
            for pool in list(rt.pools.values()):  # acked entries an older release left in job streams
                meta = pool.body["metadata"]
                trimmed += await asyncio.to_thread(rt.queue.trim_queue, queue_name(meta["namespace"], meta["name"]))
            if trimmed:
                log.debug("trimmed %d acked stream entries past the retention", trimmed)
