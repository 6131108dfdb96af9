"""No finished job stays Running: unfinished ImageJobs are settled from the outcome Redis keeps for each job.

Workers record every final outcome (succeeded, failed, cancelled) in the job's own Redis record as well as on
the capped events stream. The leader compares every unfinished ImageJob it knows with those records: soon
after start, when it takes the lease over, and periodically, and applies any outcome the event consumer has
not (the operator was down, the stream was trimmed, an event was dead-lettered).
"""

from __future__ import annotations

import asyncio
import logging
import time

from zimage_operator.events import EventApplier
from zimage_operator.metrics import RESYNCED
from zimage_operator.runtime import Runtime
from zimage_queue import JobEvent
from zimage_queue.queue import Final

log = logging.getLogger(__name__)

# Workers stamp events with their clock, the consumer's watermark is the operator's.
CLOCK_SKEW_SECONDS = 2.0
PHASES = {"succeeded": "Succeeded", "failed": "Failed", "cancelled": "Cancelled"}


def next_resync(now: float, next_at: float, leader: bool, was_leader: bool, first_delay: float) -> float:
    """When the next resync is due: soon after this replica becomes leader (at start, or taking over from a
    replica that stopped; the delay lets the watch list every ImageJob first), else as planned."""
    if leader and not was_leader:
        return min(next_at, now + first_delay)
    return next_at


def settling_event(final: Final) -> JobEvent:
    """The event to apply for a final record: a success carries its results (kept beside it)."""
    ev = final.event
    if ev.type == "succeeded" and not ev.results and final.results:
        return ev.model_copy(update={"results": final.results})
    return ev


class Resync:
    def __init__(self, rt: Runtime, applier: EventApplier) -> None:
        self.rt = rt
        self.applier = applier
        self.next_at = float("inf")
        self.was_leader = False

    async def once(self) -> None:
        leader = await asyncio.to_thread(self.rt.lease.held)
        now = time.monotonic()
        cfg = self.rt.settings
        self.next_at = next_resync(now, self.next_at, leader, self.was_leader, cfg.resync_first_seconds)
        self.was_leader = leader
        if not leader or now < self.next_at:
            return
        self.next_at = now + cfg.resync_seconds
        settled = await self.settle(list(self.rt.unfinished))
        if settled:
            log.info("resync: %d unfinished ImageJob(s) settled from the outcomes kept in Redis", settled)

    async def settle(self, uids: list[str]) -> int:
        """Apply the outcomes Redis keeps for these unfinished jobs that the events consumer has missed: those
        recorded before it last found the stream drained. Younger ones are still on their way through it (a
        backlog), and applying them twice would cost a conflict and a read each."""
        finals = await asyncio.to_thread(self.rt.queue.finals, uids)
        cutoff = self.applier.caught_up_at - CLOCK_SKEW_SECONDS
        due = [f for uid, f in finals.items() if uid in self.rt.unfinished and f.event.ts <= cutoff]
        gate = asyncio.Semaphore(self.rt.settings.events_concurrency)

        async def one(final: Final) -> None:
            async with gate:
                await self.applier.apply(settling_event(final))
            RESYNCED.labels(phase=PHASES.get(final.event.type, final.event.type)).inc()

        await asyncio.gather(*(one(f) for f in due))
        return len(due)
