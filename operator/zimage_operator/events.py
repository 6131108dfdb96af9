"""Consume worker events from Redis and write them into ImageJob status.

One loop per operator process. Events of all jobs share one stream read through the ``operator`` consumer
group, so a second operator replica splits the work instead of doubling it, and events read by an operator
that crashed before acking them are read again on restart. Entries that do not parse never get here (the queue
dead-letters them); an event the API server refuses for good (a 4xx other than a conflict) is dead-lettered
too, so nothing stalls the stream. Every status write is made on the version it was computed from and is
recomputed on a conflict, so a stale write never replaces newer conditions.

A batch is applied as one write per job, many jobs at once (``events_concurrency``): a job's events are folded
in order into one status patch (``reconcile.fold_events``), computed on the view of the job the watch and our
own writes keep (``Runtime.unfinished``), so the usual cost of a worker event is one PATCH and no GET; the job
is read only when that view is missing or stale (a conflict). Kubernetes Events go to the ``Recorder``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from datetime import UTC, datetime

from kubernetes.client.rest import ApiException

from zimage_operator import history
from zimage_operator.k8s import KubeError, StatusConflict
from zimage_operator.metrics import EVENTS_DEAD_LETTERED, JOBS_FINISHED, STATUS_CONFLICTS, STATUS_PATCHES
from zimage_operator.reconcile import fold_events
from zimage_operator.runtime import Runtime
from zimage_operator.types import TERMINAL_PHASES
from zimage_queue import JobEvent

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 5
# Progress timestamps of jobs whose final event never came (deleted mid-run): the oldest go first.
MAX_TRACKED_JOBS = 50_000
FINAL = ("succeeded", "failed", "cancelled")


def permanent(e: Exception) -> bool:
    """An API error no retry can fix: the write itself is refused (not a conflict, a throttle or an outage)."""
    return isinstance(e, ApiException | KubeError) and e.status in (400, 403, 404, 413, 422)


class EventApplier:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.last_progress: OrderedDict[str, float] = OrderedDict()
        # Wall time when a read last found no new event: everything published before it has been applied.
        self.caught_up_at = 0.0

    def _remember_progress(self, uid: str, ts: float) -> None:
        self.last_progress[uid] = ts
        self.last_progress.move_to_end(uid)
        while len(self.last_progress) > MAX_TRACKED_JOBS:
            self.last_progress.popitem(last=False)

    async def apply(self, ev: JobEvent) -> None:
        await self.apply_job([ev])

    async def apply_job(self, evs: list[JobEvent]) -> None:
        """Apply one job's events (in order) with one status write."""
        rt, first = self.rt, evs[0]
        interval = rt.settings.progress_min_interval_seconds
        last = self.last_progress.get(first.uid)
        if any(ev.type in FINAL for ev in evs):
            self.last_progress.pop(first.uid, None)
        view = rt.unfinished.get(first.uid)
        obj = view.body(first.uid) if view is not None else None
        for _ in range(MAX_CONFLICT_RETRIES):
            if obj is None:
                obj = await rt.akube.get_job(first.namespace, first.name)
                if obj is None or obj["metadata"].get("uid") != first.uid:
                    self.last_progress.pop(first.uid, None)
                    return
            meta = obj["metadata"]
            routed_to = (obj.get("status") or {}).get("routedTo")
            folded = fold_events(
                obj.get("status") or {},
                evs,
                datetime.now(UTC),
                last_progress_at=last,
                min_interval=interval,
                generation=meta.get("generation"),
            )
            if folded.patch:
                try:
                    written = await rt.akube.patch_job_status(
                        first.namespace, first.name, folded.patch, meta.get("resourceVersion")
                    )
                except StatusConflict:
                    STATUS_CONFLICTS.inc()  # another writer got there first: decide again on what it wrote
                    obj = None
                    continue
                if written is None:
                    rt.unfinished.pop(first.uid, None)
                    return
                rt.observe_job(written)
                obj = written
                STATUS_PATCHES.labels(kind=evs[-1].type).inc()
                phase = folded.patch.get("phase")
                if phase in TERMINAL_PHASES:
                    reason = next((e[1] for e, key in folded.events if key == "final"), "")
                    JOBS_FINISHED.labels(phase=phase, reason=reason).inc()
                if phase not in TERMINAL_PHASES and folded.progress_at not in (None, last):
                    self._remember_progress(first.uid, folded.progress_at)  # a finished job's is forgotten
            await history.record(rt, obj, evs, routed_to)
            # Named by job and transition: recorded once per transition. Posted before the caller acks the worker
            # events, so a replica that dies here leaves them pending and the next one replays the Events.
            await asyncio.gather(*(rt.recorder.record_now(obj, *k8s_event, key) for k8s_event, key in folded.events))
            return
        raise StatusConflict(
            f"ImageJob {first.namespace}/{first.name} kept changing under {MAX_CONFLICT_RETRIES} writes"
        )


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


def by_job(batch: list[tuple[str, JobEvent]]) -> dict[str, list[tuple[int, JobEvent]]]:
    """The batch's events grouped by job, in stream order within each job (superseded progress dropped)."""
    jobs: dict[str, list[tuple[int, JobEvent]]] = {}
    for i, ev in _collapse_indexed(batch):
        jobs.setdefault(ev.uid, []).append((i, ev))
    return jobs


async def consume_once(rt: Runtime, applier: EventApplier) -> None:
    """Read a batch, apply it (one write per job, jobs concurrently), ack what was applied.

    When a job's events cannot be applied for now (the API server is down), every other job's are acked and the
    pass fails: that job's entries stay pending and come back first on the next pass, so its events are still
    applied in order. Events the API server refuses for good are dead-lettered."""
    group = rt.events_group  # one per shard (keys.operator_group); every shard reads every event
    started = time.time()
    batch = await asyncio.to_thread(rt.queue.read_events, rt.consumer, 500, rt.settings.events_block_ms, group)
    if not batch:
        applier.caught_up_at = started
        return
    ours = [(entry_id, ev) for entry_id, ev in batch if not ev.bulk]  # bulk jobs have no ImageJob: acked
    jobs = by_job(ours)
    gate = asyncio.Semaphore(rt.settings.events_concurrency)

    async def one(evs: list[JobEvent]) -> None:
        async with gate:
            if await rt.owns(evs[0]):  # another shard's job: acked here, applied by that shard through its group
                await applier.apply_job(evs)

    outcomes = await asyncio.gather(
        *(one([ev for _, ev in group_]) for group_ in jobs.values()), return_exceptions=True
    )
    await history.record_bulk(rt, [ev for _, ev in batch if ev.bulk])  # before any ack: replayed if it fails
    retry: set[str] = set()
    failure: BaseException | None = None
    for (uid, group_), outcome in zip(jobs.items(), outcomes, strict=True):
        if not isinstance(outcome, BaseException):
            continue
        if isinstance(outcome, Exception) and permanent(outcome):
            EVENTS_DEAD_LETTERED.inc(len(group_))
            for i, ev in group_:
                await asyncio.to_thread(
                    rt.queue.dead_letter_event, ours[i][0], ev, f"{type(outcome).__name__}: {outcome}", group
                )
            continue
        retry.add(uid)
        failure = failure or outcome
    await asyncio.to_thread(rt.queue.ack_events, [entry_id for entry_id, ev in batch if ev.uid not in retry], group)
    if failure is not None:
        raise failure
