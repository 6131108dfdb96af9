"""Kubernetes Events, recorded off the critical path.

A status write never waits for its Event: transitions put their Event on a bounded in-memory queue and one
supervised loop posts them, several at a time. By default only Warnings are recorded (a failure, a retry, a move
to a fallback model, a timeout, an invalid spec, a missing model, a spec edit): those are what a person reads in
``kubectl describe``; the Normal ones (Enqueued, Started, Completed) are in the status conditions anyway, and
at three per job they were a third of the API server's load. ``ZIMAGE_NORMAL_EVENTS=true`` records them too.
When the queue is full (the API server is down or slow) Events are dropped and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from zimage_operator.k8s import AsyncKube
from zimage_operator.metrics import EVENTS_DROPPED, EVENTS_RECORDED
from zimage_queue.supervise import take_batch

log = logging.getLogger(__name__)

MAX_QUEUED = 10_000
POSTS_PER_PASS = 64
IDLE_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class Pending:
    obj: dict[str, Any]  # apiVersion, kind and metadata (name, namespace, uid, resourceVersion) are enough
    type_: str
    reason: str
    message: str
    key: str | None


def involved(obj: dict[str, Any]) -> dict[str, Any]:
    """The part of an object an Event refers to (the rest is not kept while the Event waits)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion")},
    }


class Recorder:
    def __init__(self, kube: AsyncKube, normal: bool = False, max_queued: int = MAX_QUEUED) -> None:
        self.kube = kube
        self.normal = normal
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max_queued)

    def wanted(self, type_: str) -> bool:
        return type_ != "Normal" or self.normal

    def record(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None, always: bool = False
    ) -> None:
        """``always``: a Normal Event recorded even without ZIMAGE_NORMAL_EVENTS (a workflow's few transitions)."""
        if not (always or self.wanted(type_)):
            return
        try:
            self.queue.put_nowait(Pending(involved(obj), type_, reason, message, key))
        except asyncio.QueueFull:
            EVENTS_DROPPED.inc()

    async def record_now(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None
    ) -> None:
        """Post at once, for a caller that acks its source only after (a worker event's transitions: a replica
        killed between the status write and a queued post lost the Event; redelivered, it is replayed under its
        key). A failure is counted and logged, never raised."""
        if not self.wanted(type_):
            return
        try:
            await self._post(Pending(involved(obj), type_, reason, message, key))
        except Exception as e:
            EVENTS_DROPPED.inc()
            log.warning("could not record Event %s: %s", reason, e)

    async def once(self) -> None:
        """Post what is queued (up to POSTS_PER_PASS at a time); wait a little for the first one."""
        batch = await take_batch(self.queue, POSTS_PER_PASS, IDLE_WAIT_SECONDS)
        results = await asyncio.gather(*(self._post(p) for p in batch), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            EVENTS_DROPPED.inc(len(failed))
            log.warning("could not record %d Event(s): %s", len(failed), failed[0])

    async def _post(self, p: Pending) -> None:
        if await self.kube.post_event(p.obj, p.type_, p.reason, p.message, p.key):
            EVENTS_RECORDED.labels(reason=p.reason).inc()
