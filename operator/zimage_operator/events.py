"""Consume worker events from Redis and write them into ImageJob status.

One loop per operator process. Events of all jobs share one stream read through the ``operator`` consumer
group, so a second operator replica splits the work instead of doubling it, and events read by an operator
that crashed before acking them are read again on restart.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from zimage_operator.metrics import JOBS_FINISHED, STATUS_PATCHES
from zimage_operator.reconcile import event_patch, progress_throttled
from zimage_operator.runtime import Runtime
from zimage_operator.types import TERMINAL_PHASES
from zimage_queue import JobEvent

log = logging.getLogger(__name__)


class EventApplier:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.last_progress: dict[str, float] = {}

    async def apply(self, ev: JobEvent) -> None:
        interval = self.rt.settings.progress_min_interval_seconds
        last = self.last_progress.get(ev.uid)
        if progress_throttled(ev, last, interval):
            return  # before any API call
        obj = await asyncio.to_thread(self.rt.kube.get_job, ev.namespace, ev.name)
        if obj is None or obj["metadata"].get("uid") != ev.uid:
            self.last_progress.pop(ev.uid, None)
            return
        patch, k8s_event = event_patch(
            obj.get("status") or {},
            ev,
            datetime.now(UTC),
            last_progress_at=last,
            min_interval=interval,
            generation=obj["metadata"].get("generation"),
        )
        if patch:
            await asyncio.to_thread(self.rt.kube.patch_job_status, ev.namespace, ev.name, patch)
            STATUS_PATCHES.labels(kind=ev.type).inc()
            if patch.get("phase") in TERMINAL_PHASES:
                JOBS_FINISHED.labels(phase=patch["phase"], reason=k8s_event[1] if k8s_event else "").inc()
        if ev.type == "progress" and patch:
            self.last_progress[ev.uid] = ev.ts
        if ev.type in ("succeeded", "failed", "cancelled"):
            self.last_progress.pop(ev.uid, None)
        if k8s_event:
            await asyncio.to_thread(self.rt.kube.post_event, obj, *k8s_event)


def collapse(batch: list[tuple[str, JobEvent]]) -> list[JobEvent]:
    """Drop progress events superseded by a later event of the same job in the same batch."""
    later: set[str] = set()
    keep: list[JobEvent] = []
    for _, ev in reversed(batch):
        if ev.type == "progress" and ev.uid in later:
            continue
        later.add(ev.uid)
        keep.append(ev)
    keep.reverse()
    return keep


async def consume(rt: Runtime) -> None:
    applier = EventApplier(rt)
    while True:
        try:
            batch = await asyncio.to_thread(rt.queue.read_events, rt.consumer, 500, rt.settings.events_block_ms)
            for ev in collapse(batch):
                await applier.apply(ev)
            await asyncio.to_thread(rt.queue.ack_events, [entry_id for entry_id, _ in batch])
        except asyncio.CancelledError:
            raise
        except Exception:
            # Unacked events are read again on the next pass; back off so an outage is not a busy loop.
            log.exception("event loop error; retrying")
            await asyncio.sleep(1.0)
