"""The operator's side of job history (zimage_history): rows for attempt outcomes as worker events are applied,
and the supervised loop that writes them to PostgreSQL on the lease holder."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from zimage_history.db import connect
from zimage_history.outbox import Outbox
from zimage_history.rows import OUTCOMES, rows_for
from zimage_history.writer import HistoryWriter
from zimage_operator.runtime import Runtime
from zimage_queue import JobEvent, keys


def outbox_for(rt: Runtime) -> Outbox:
    return Outbox(rt.queue.r, store=bool(rt.settings.history_url))


def ran(evs: Sequence[JobEvent]) -> list[tuple[str, int]]:
    """The attempts among the outcomes whose usage the worker kept (attempt 0 never ran)."""
    return [(ev.uid, ev.attempt) for ev in evs if ev.type in OUTCOMES and ev.attempt > 0]


def has_outcome(evs: Sequence[JobEvent]) -> bool:
    return any(ev.type in OUTCOMES for ev in evs)


async def record(rt: Runtime, job: dict[str, Any], evs: Sequence[JobEvent], routed_to: str | None) -> None:
    """Put the rows of the attempt outcomes among ``evs`` in the outbox (before the events are acked: a replica
    that dies here replays them, and the store keeps one row per uid and attempt)."""
    outbox: Outbox | None = rt.history
    if outbox is None or not has_outcome(evs):
        return
    if "spec" not in job:  # the operator's view of an unfinished job keeps its status only
        found = await rt.akube.get_job(evs[0].namespace, evs[0].name)
        if found is None or found["metadata"].get("uid") != evs[0].uid:
            return
        job = found
    usage = await asyncio.to_thread(rt.queue.usage, ran(evs))
    await asyncio.to_thread(outbox.record, rows_for(job, evs, rt.model, routed_to, usage))


def bulk_jobs(r: Any, evs: Sequence[JobEvent]) -> dict[str, dict[str, Any]]:
    """The objects the API keeps for bulk jobs (``keys.bulk_job``), by uid; a job past its retention is absent."""
    pipe = r.pipeline(transaction=False)
    for ev in evs:
        pipe.hget(keys.bulk_job(ev.namespace, ev.name), keys.F_BULK_OBJECT)
    found: dict[str, dict[str, Any]] = {}
    for ev, raw in zip(evs, pipe.execute(), strict=True):
        if raw:
            obj = json.loads(raw)
            if (obj.get("metadata") or {}).get("uid") == ev.uid:
                found[ev.uid] = obj
    return found


async def record_bulk(rt: Runtime, evs: Sequence[JobEvent]) -> None:
    """Rows for bulk jobs' attempt outcomes (no ImageJob: the job is the object the API keeps in Redis). A label
    shard cannot tell its own from the event, so each records them: the store keeps one row per uid and attempt."""
    outbox: Outbox | None = rt.history
    mine = [ev for ev in evs if ev.bulk and ev.type in OUTCOMES and rt.owns.decided(ev) is not False]
    if outbox is None or not mine:
        return
    jobs = await asyncio.to_thread(bulk_jobs, rt.queue.r, mine)
    usage = await asyncio.to_thread(rt.queue.usage, ran(mine))
    by_job: dict[str, list[JobEvent]] = {}
    for ev in mine:
        by_job.setdefault(ev.uid, []).append(ev)
    rows = [
        row
        for uid, job_evs in by_job.items()
        if uid in jobs
        for row in rows_for(jobs[uid], job_evs, rt.model, usage=usage)
    ]
    await asyncio.to_thread(outbox.record, rows)


class HistoryLoop:
    """Writes the outbox into PostgreSQL on the lease holder: batches back to back while rows wait, then a pass
    every ``history_flush_seconds``; retention once an hour."""

    def __init__(self, rt: Runtime) -> None:
        cfg = rt.settings
        self.rt = rt
        self.writer = HistoryWriter(
            outbox_for(rt),
            connect(cfg.history_url, cfg.history_password or None),
            batch=cfg.history_batch,
            retention_days=cfg.history_retention_days,
            usage_retention_days=cfg.history_usage_retention_days,
        )
        self.busy = False

    def pause(self) -> float:
        return 0.0 if self.busy else self.rt.settings.history_flush_seconds

    async def once(self) -> None:
        self.busy = False
        if not await asyncio.to_thread(self.rt.lease.held):
            return
        n = await asyncio.to_thread(self.writer.write_some)
        self.busy = n >= self.writer.batch
        if not self.busy:
            await asyncio.to_thread(self.writer.purge)
