"""What the handlers share for the operator's lifetime (kept in kopf's memo, not in globals)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from zimage_operator.housekeeping import Deadlines
from zimage_operator.k8s import AsyncKube, Kube
from zimage_operator.lease import Lease
from zimage_operator.recorder import Recorder
from zimage_operator.settings import OperatorSettings
from zimage_operator.shards import Ownership
from zimage_operator.types import GROUP, TERMINAL_PHASES, VERSION
from zimage_queue import JobQueue, keys
from zimage_queue.supervise import Health


def newer(candidate: str | None, than: str | None) -> bool:
    """Whether resourceVersion ``candidate`` is later than ``than``. Versions are opaque to clients, but every
    API server in use hands out etcd revisions (integers); anything else counts as newer (the watch wins)."""
    if not than:
        return True
    try:
        return int(candidate or 0) > int(than)
    except ValueError:
        return True


@dataclass(slots=True)
class JobView:
    """What the operator keeps of an unfinished ImageJob between writes: enough to compute the next status
    patch and write it on the version it was computed from, without reading the job first."""

    namespace: str
    name: str
    resource_version: str
    generation: int | None
    status: dict[str, Any]

    def body(self, uid: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageJob",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": uid,
                "resourceVersion": self.resource_version,
                "generation": self.generation,
            },
            "status": self.status,
        }


@dataclass
class Runtime:
    settings: OperatorSettings
    kube: Kube
    queue: JobQueue
    akube: AsyncKube
    recorder: Recorder
    consumer: str = field(default_factory=socket.gethostname)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    deadlines: Deadlines = field(default_factory=Deadlines)
    lease: Lease = field(init=False)
    pools: dict[str, Any] = field(default_factory=dict)  # ModelDeployment uid -> pools.Pool
    # ImageJobs not in a terminal phase, as last seen (the watch, or our own write's answer): uid -> view.
    unfinished: dict[str, JobView] = field(default_factory=dict)
    health: Health = field(init=False)
    # The namespace patterns this process watches (-n; empty: the whole cluster), for its shard's ownership.
    namespaces: list[str] = field(default_factory=list)
    # The shard's events consumer group, and whether an event's job is this shard's (always, unsharded).
    events_group: str = field(init=False)
    owns: Ownership = field(init=False)
    # Where attempt outcomes go (zimage_history.outbox): the usage counters, and rows for the history store.
    history: Any = None

    def __post_init__(self) -> None:
        self.consumer = self.settings.consumer_name or self.consumer
        # host and pid: unique per replica, and per process when tests run several on one machine
        self.deadlines.default_ttl = self.settings.default_ttl_seconds_after_finished
        self.health = Health(max_failures=self.settings.loop_max_failures)
        shard = self.settings.shard
        self.lease = Lease(
            self.queue.r,
            f"{self.consumer}-{os.getpid()}",
            ttl_seconds=self.settings.lease_seconds,
            key=keys.operator_lease(shard),
        )
        self.events_group = keys.operator_group(shard)
        self.owns = Ownership(
            bool(shard), self.namespaces, self.settings.shard_selector, lookup=self.kube.get_job, known=self.unfinished
        )

    def observe_job(self, body: dict[str, Any]) -> None:
        """Keep the view of a job current from a watch event or a write's answer; finished jobs are dropped."""
        meta = body.get("metadata") or {}
        uid, status = meta.get("uid", ""), body.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            self.unfinished.pop(uid, None)
            return
        rv = meta.get("resourceVersion") or ""
        seen = self.unfinished.get(uid)
        if seen is not None and not newer(rv, seen.resource_version):
            return  # a watch event older than a write of ours already seen
        self.unfinished[uid] = JobView(meta["namespace"], meta["name"], rv, meta.get("generation"), dict(status))

    def model(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ModelDeployment as the watch last saw it (pools are few: a scan is cheap)."""
        for pool in self.pools.values():
            meta = pool.body.get("metadata") or {}
            if meta.get("name") == name and meta.get("namespace") == namespace:
                body: dict[str, Any] = pool.body
                return body
        return None
