"""Thin kopf handlers for ImageJob: parse, call a pure decision, apply it, record an Event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import kopf

from zimage_operator import reconcile
from zimage_operator.admission import Admitter
from zimage_operator.edits import spec_edit_event
from zimage_operator.housekeeping import Due
from zimage_operator.k8s import StatusConflict
from zimage_operator.lease import LeaseLost
from zimage_operator.metrics import JOBS_FINISHED
from zimage_operator.runtime import Runtime
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, TERMINAL_PHASES, VERSION
from zimage_operator.workflow_types import WORKFLOW_LABEL
from zimage_queue.keys import queue_name

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, IMAGEJOB_PLURAL)


def _now() -> datetime:
    return datetime.now(UTC)


MAX_EDITS_REMEMBERED = 10_000


@kopf.on.event(*RESOURCE)
async def track(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every ImageJob watch event: admission, the view of unfinished jobs, the deadline book, spec edits, and the
    cancel of a deleted unfinished job. Nothing here waits on the API server: admission runs in its own loop.

    A watch handler rather than kopf's creation/deletion handlers or timers: those write a bookkeeping patch on
    every job and put a finalizer on it, so deletes would hang while the operator is down. A delete missed that
    way costs one wasted run, whose result is dropped.
    """
    rt: Runtime = memo.runtime
    admitter: Admitter = memo.admitter
    raw = dict(body)
    meta = raw.get("metadata") or {}
    if WORKFLOW_LABEL in (meta.get("labels") or {}):  # a workflow's step job: its workflow looks again
        memo.workflows.observe_job(raw, deleted=event.get("type") == "DELETED")
    uid = meta.get("uid", "")
    status = raw.get("status") or {}
    finished = status.get("phase") in TERMINAL_PHASES
    if event.get("type") == "DELETED":
        rt.deadlines.forget(uid)
        rt.unfinished.pop(uid, None)
        admitter.forget(uid)
        if not finished:
            await asyncio.to_thread(rt.queue.cancel, uid)  # the record then expires after the retention
            JOBS_FINISHED.labels(phase="Cancelled", reason="Deleted").inc()
        return
    first_sight = uid not in rt.unfinished
    rt.observe_job(raw)
    if finished:
        admitter.forget(uid)
    else:
        admitter.observe(raw, first_sight)
    rt.deadlines.observe(raw)
    if (meta.get("generation") or 1) > 1 and status.get("specDigest"):
        report_edit(rt, memo.edits_reported, raw)


def report_edit(rt: Runtime, reported: OrderedDict[str, int], raw: dict[str, Any]) -> None:
    """A Warning Event for a spec edit the API server let through (no CEL), once per generation; nothing else
    changes (the job keeps the spec it was admitted with)."""
    meta = raw["metadata"]
    uid, generation = meta["uid"], meta["generation"]
    if reported.get(uid) == generation:
        return
    reported[uid] = generation
    reported.move_to_end(uid)
    while len(reported) > MAX_EDITS_REMEMBERED:
        reported.popitem(last=False)
    status = raw.get("status") or {}
    found = spec_edit_event(status.get("specDigest"), raw.get("spec"), status)
    if found is not None:
        rt.recorder.record(raw, "Warning", *found, f"specchanged-{generation}")


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
        rt.recorder.record(obj, "Warning", "Timeout", patch["message"], "final")
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
