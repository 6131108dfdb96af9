"""Thin kopf handlers for ImageJob: parse, call a pure decision, apply it, record an Event."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from zimage_operator import reconcile
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
async def admit(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, body: kopf.Body, memo: kopf.Memo,
                **_: Any) -> None:
    rt: Runtime = memo.runtime
    st = dict(status)
    model = await asyncio.to_thread(rt.kube.get_model, meta["namespace"], spec.get("model", ""))
    decision = reconcile.admit(spec=dict(spec), status=st, meta=dict(meta), model=model, now=_now())
    if decision.action == "skip":
        return
    changed_phase = decision.patch.get("phase") != st.get("phase")
    if decision.action == "enqueue":
        assert decision.message is not None
        # Status first: a fast worker's "Running" must never be overwritten by a late "Queued".
        if changed_phase:
            await asyncio.to_thread(rt.kube.patch_job_status, meta["namespace"], meta["name"], decision.patch)
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


def _needs_housekeeping(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    if status.get("phase") in TERMINAL_PHASES:
        return spec.get("ttlSecondsAfterFinished") is not None
    return spec.get("timeoutSeconds") is not None


@kopf.timer(*RESOURCE, interval=2.0, when=_needs_housekeeping)
async def housekeeping(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, body: kopf.Body,
                       memo: kopf.Memo, **_: Any) -> None:
    """timeoutSeconds -> Failed/Timeout (and tell the worker to stop); ttlSecondsAfterFinished -> delete."""
    rt: Runtime = memo.runtime
    now = _now()
    patch = reconcile.timeout_patch(dict(spec), dict(status), dict(meta), now)
    if patch:
        await asyncio.to_thread(rt.queue.cancel, meta["uid"])
        await asyncio.to_thread(rt.kube.patch_job_status, meta["namespace"], meta["name"], patch)
        await asyncio.to_thread(rt.kube.post_event, _body(body), "Warning", "Timeout", patch["message"])
        JOBS_FINISHED.labels(phase="Failed", reason="Timeout").inc()
        return
    remaining = reconcile.seconds_until_expiry(dict(spec), dict(status), now)
    if remaining is not None and remaining <= 0:
        log.info("deleting %s/%s: ttlSecondsAfterFinished elapsed", meta["namespace"], meta["name"])
        await asyncio.to_thread(rt.kube.delete_job, meta["namespace"], meta["name"])


@kopf.on.delete(*RESOURCE)
async def cancel_on_delete(status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """A deleted job that is still queued or running is cancelled; the worker drops it between steps."""
    rt: Runtime = memo.runtime
    if status.get("phase") not in TERMINAL_PHASES:
        await asyncio.to_thread(rt.queue.cancel, meta["uid"])
        JOBS_FINISHED.labels(phase="Cancelled", reason="Deleted").inc()
