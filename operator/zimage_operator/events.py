"""Consume worker events from Redis and write them into ImageJob status.

One loop per operator process. Events of all jobs share one stream read through the ``operator`` consumer
group, so a second operator replica splits the work instead of doubling it, and events read by an operator
that crashed before acking them are read again on restart. Entries that do not parse never get here (the queue
dead-letters them); an event the API server refuses for good (a 4xx other than a conflict) is dead-lettered
too, so nothing stalls the stream. Every status write is made on the version it was computed from and is
recomputed on a conflict, so a stale write never replaces newer conditions.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException

from zimage_operator.k8s import StatusConflict
from zimage_operator.metrics import EVENTS_DEAD_LETTERED, JOBS_FINISHED, STATUS_CONFLICTS, STATUS_PATCHES
from zimage_operator.reconcile import event_key, event_patch, progress_throttled, replayed_event
from zimage_operator.runtime import Runtime
from zimage_operator.types import TERMINAL_PHASES
from zimage_queue import JobEvent

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 5
# Progress timestamps of jobs whose final event never came (deleted mid-run): the oldest go first.
MAX_TRACKED_JOBS = 50_000


def permanent(e: Exception) -> bool:
    """An API error no retry can fix: the write itself is refused (not a conflict, a throttle or an outage)."""
    return isinstance(e, ApiException) and e.status in (400, 403, 404, 413, 422)


class EventApplier:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.last_progress: OrderedDict[str, float] = OrderedDict()

    def _remember_progress(self, uid: str, ts: float) -> None:
        self.last_progress[uid] = ts
        self.last_progress.move_to_end(uid)
        while len(self.last_progress) > MAX_TRACKED_JOBS:
            self.last_progress.popitem(last=False)

    async def apply(self, ev: JobEvent) -> None:
        interval = self.rt.settings.progress_min_interval_seconds
        last = self.last_progress.get(ev.uid)
        if progress_throttled(ev, last, interval):
            return  # before any API call
        if ev.type in ("succeeded", "failed", "cancelled"):
            self.last_progress.pop(ev.uid, None)
        for _ in range(MAX_CONFLICT_RETRIES):
            obj = await asyncio.to_thread(self.rt.kube.get_job, ev.namespace, ev.name)
            if obj is None or obj["metadata"].get("uid") != ev.uid:
                self.last_progress.pop(ev.uid, None)
                return
            try:
                await self._apply_to(obj, ev, last, interval)
                return
            except StatusConflict:
                STATUS_CONFLICTS.inc()  # another writer got there first: decide again on what it wrote
        raise StatusConflict(f"ImageJob {ev.namespace}/{ev.name} kept changing under {MAX_CONFLICT_RETRIES} writes")

    async def _apply_to(self, obj: dict[str, Any], ev: JobEvent, last: float | None, interval: float) -> None:
        meta = obj["metadata"]
        status, now = obj.get("status") or {}, datetime.now(UTC)
        patch, k8s_event = event_patch(
            status, ev, now, last_progress_at=last, min_interval=interval, generation=meta.get("generation")
        )
        if patch:
            await asyncio.to_thread(
                self.rt.kube.patch_job_status, ev.namespace, ev.name, patch, meta.get("resourceVersion")
            )
            STATUS_PATCHES.labels(kind=ev.type).inc()
            if patch.get("phase") in TERMINAL_PHASES:
                JOBS_FINISHED.labels(phase=patch["phase"], reason=k8s_event[1] if k8s_event else "").inc()
            if ev.type == "progress":
                self._remember_progress(ev.uid, ev.ts)
        elif k8s_event is None:  # already final: its writer may have died before recording the Event
            k8s_event = replayed_event(status, ev, now)
        if k8s_event:  # named by job and transition: a second recording is refused, one Event per transition
            await asyncio.to_thread(self.rt.kube.post_event, obj, *k8s_event, event_key(ev))


def collapse(batch: list[tuple[str, JobEvent]]) -> list[JobEvent]:
    """Drop progress events superseded by a later event of the same job in the same batch."""
    return [ev for _, ev in _collapse_indexed(batch)]


def _collapse_indexed(batch: list[tuple[str, JobEvent]]) -> list[tuple[int, JobEvent]]:
    later: set[str] = set()
    keep: list[tuple[int, JobEvent]] = []
    for i in range(len(batch) - 1, -1, -1):
        ev = batch[i][1]
        if ev.type == "progress" and ev.uid in later:
            continue
        later.add(ev.uid)
        keep.append((i, ev))
    keep.reverse()
    return keep


async def consume_once(rt: Runtime, applier: EventApplier) -> None:
    """Read a batch, apply it in order, ack what was applied.

    When an event cannot be applied for now (the API server is down), the events before it are acked and it
    comes back first on the next pass; progress events dropped by ``collapse`` before it are covered by a later
    event of their job, which is still pending."""
    group = rt.events_group  # one per shard (keys.operator_group); every shard reads every event
    batch = await asyncio.to_thread(rt.queue.read_events, rt.consumer, 500, rt.settings.events_block_ms, group)
    settled = 0
    try:
        for i, ev in _collapse_indexed(batch):
            try:
                if await rt.owns(ev):  # another shard's job: acked here, applied by that shard through its group
                    await applier.apply(ev)
            except Exception as e:
                if not permanent(e):
                    raise
                EVENTS_DEAD_LETTERED.inc()
                await asyncio.to_thread(rt.queue.dead_letter_event, batch[i][0], ev, f"{type(e).__name__}: {e}", group)
            settled = i + 1
        settled = len(batch)
    finally:
        await asyncio.to_thread(rt.queue.ack_events, [entry_id for entry_id, _ in batch[:settled]], group)
