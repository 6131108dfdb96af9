"""Thin kopf handlers for ImageJob: parse, call a pure decision, apply it, record an Event."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from zimage_operator import reconcile
from zimage_operator.housekeeping import Due
from zimage_operator.k8s import StatusConflict
from zimage_operator.metrics import JOBS_ENQUEUED, JOBS_FINISHED
from zimage_operator.runtime import Runtime
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, TERMINAL_PHASES, VERSION

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
        result = await asyncio.to_thread(rt.queue.enqueue, decision.message, spec.get("priority", "normal"))
        if result.created:
            JOBS_ENQUEUED.labels(model=spec["model"]).inc()
    elif changed_phase or decision.action == "wait":
        await asyncio.to_thread(rt.kube.patch_job_status, meta["namespace"], meta["name"], decision.patch)
    if decision.event and changed_phase:
        await asyncio.to_thread(rt.kube.post_event, _body(body), *decision.event)
    if decision.action == "fail":
        JOBS_FINISHED.labels(phase="Failed", reason=decision.event[1] if decision.event else "").inc()
    if decision.action == "wait":
        raise kopf.TemporaryError(decision.patch.get("message", "waiting"), delay=rt.settings.model_recheck_seconds)


@kopf.on.event(*RESOURCE)
async def track(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the deadline book current; a deleted job that has not finished is cancelled in the queue.

    A watch handler rather than on.delete or timers: those put a finalizer on every ImageJob, so deletes would
    hang while the operator is down. A delete missed that way costs one wasted run, whose result is dropped.
    """
    rt: Runtime = memo.runtime
    meta = body.get("metadata") or {}
    if event.get("type") == "DELETED":
        rt.deadlines.forget(meta.get("uid", ""))
        if (body.get("status") or {}).get("phase") not in TERMINAL_PHASES:
            await asyncio.to_thread(rt.queue.cancel, meta["uid"])
            JOBS_FINISHED.labels(phase="Cancelled", reason="Deleted").inc()
        return
    rt.deadlines.observe(dict(body))


async def act_on(rt: Runtime, due: Due) -> None:
    """timeoutSeconds -> Failed/Timeout (and the worker is told to stop); ttlSecondsAfterFinished -> delete."""
    obj = await asyncio.to_thread(rt.kube.get_job, due.namespace, due.name)
    if obj is None or obj["metadata"].get("uid") != due.uid:
        return
    now = _now()
    if due.action == "expire":
        remaining = reconcile.seconds_until_expiry(obj.get("spec") or {}, obj.get("status") or {}, now)
        if remaining is not None and remaining <= 0:
            log.info("deleting %s/%s: ttlSecondsAfterFinished elapsed", due.namespace, due.name)
            await asyncio.to_thread(rt.kube.delete_job, due.namespace, due.name)
        return
    patch = reconcile.timeout_patch(obj.get("spec") or {}, obj.get("status") or {}, obj["metadata"], now)
    if patch:
        await asyncio.to_thread(rt.queue.cancel, due.uid)
        await asyncio.to_thread(rt.kube.patch_job_status, due.namespace, due.name, patch)
        await asyncio.to_thread(rt.kube.post_event, obj, "Warning", "Timeout", patch["message"])
        JOBS_FINISHED.labels(phase="Failed", reason="Timeout").inc()


async def housekeeping(rt: Runtime) -> None:
    while True:
        if not await asyncio.to_thread(rt.lease.held):  # the standby replica keeps its book, acts on nothing
            await asyncio.sleep(rt.settings.housekeeping_seconds)
            continue
        for due in rt.deadlines.due(_now()):
            try:
                await act_on(rt, due)
            except Exception:
                log.exception("housekeeping of %s/%s failed; will retry", due.namespace, due.name)
                rt.deadlines.retry_later(due, _now())
        await asyncio.sleep(rt.settings.housekeeping_seconds)
