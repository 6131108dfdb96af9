"""What the handlers share for the operator's lifetime (kept in kopf's memo, not in globals)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from zimage_operator.housekeeping import Deadlines
from zimage_operator.k8s import Kube
from zimage_operator.lease import Lease
from zimage_operator.settings import OperatorSettings
from zimage_operator.shards import Ownership
from zimage_queue import JobQueue, keys
from zimage_queue.supervise import Health


@dataclass
class Runtime:
    settings: OperatorSettings
    kube: Kube
    queue: JobQueue
    consumer: str = field(default_factory=socket.gethostname)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    deadlines: Deadlines = field(default_factory=Deadlines)
    lease: Lease = field(init=False)
    pools: dict[str, Any] = field(default_factory=dict)  # ModelDeployment uid -> pools.Pool
    # ImageJobs not in a terminal phase, as the watch last saw them: uid -> (namespace, name). For the resync.
    unfinished: dict[str, tuple[str, str]] = field(default_factory=dict)
    health: Health = field(init=False)
    # The namespace patterns this process watches (-n; empty: the whole cluster), for its shard's ownership.
    namespaces: list[str] = field(default_factory=list)
    # The shard's events consumer group, and whether an event's job is this shard's (always, unsharded).
    events_group: str = field(init=False)
    owns: Ownership = field(init=False)

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
