"""Images and uploads past their retention are deleted from the image store.

A file store (the chart's volume) has no lifecycle rules, and an S3 lifecycle rule cannot select
``tenants/*/jobs/`` (a prefix has no wildcard), so the operator sweeps the store itself: one pass lists every
object under ``tenants/`` and deletes those older than their kind's retention. Objects it does not recognise
(anything outside ``tenants/<tenant>/jobs|uploads/``) are never touched, so a shared bucket is safe.

Uploads (inputs and masks sent through the API) are kept as long as job images by default: a job may wait in
its queue, and a retry reads its input again. An upload whose job was refused is deleted by the API at once.

The decision is pure (:func:`expired`); the loop (:class:`ImageRetention`) only lists, decides and deletes,
and only on the replica holding the lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from zimage_operator import metrics
from zimage_operator.runtime import Runtime
from zimage_worker.storage import ImageStore, StoredObject, open_store

log = logging.getLogger(__name__)

Kind = Literal["image", "upload"]
ROOT = "tenants/"
DELETE_BATCH = 1000


@dataclass(frozen=True)
class Retention:
    images_seconds: int | None  # None: kept forever
    uploads_seconds: int | None

    def seconds(self, kind: Kind) -> int | None:
        return self.images_seconds if kind == "image" else self.uploads_seconds


def kind_of(key: str) -> Kind | None:
    """``tenants/<tenant>/jobs/...`` is a job's image, ``tenants/<tenant>/uploads/...`` an upload."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "tenants" or not parts[1]:
        return None
    return {"jobs": "image", "uploads": "upload"}.get(parts[2])  # type: ignore[return-value]


def expired(objects: Iterable[StoredObject], now: float, policy: Retention) -> Iterator[str]:
    """The keys of the objects older than their kind's retention."""
    for o in objects:
        kind = kind_of(o.key)
        keep = policy.seconds(kind) if kind else None
        if keep is not None and now - o.modified > keep:
            yield o.key


@dataclass
class SweepResult:
    scanned: int = 0
    deleted: int = 0


def sweep_some(
    objects: Iterator[StoredObject],
    store: ImageStore,
    now: float,
    policy: Retention,
    limit: int,
    may_write: Callable[[], None] | None = None,
) -> tuple[SweepResult, bool]:
    """Look at up to ``limit`` more objects of a listing and delete the expired ones (checking ``may_write()``,
    the lease's fencing, before each delete). Returns what it did and whether the listing is done."""
    result = SweepResult()
    done = True

    def counted() -> Iterator[StoredObject]:
        nonlocal done
        for o in objects:
            result.scanned += 1
            yield o
            if result.scanned >= limit:
                done = False
                return

    batch: list[str] = []
    for key in expired(counted(), now, policy):
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            _delete(store, batch, may_write, result)
            batch = []
    if batch:
        _delete(store, batch, may_write, result)
    return result, done


def _delete(store: ImageStore, keys: list[str], may_write: Callable[[], None] | None, result: SweepResult) -> None:
    if may_write is not None:
        may_write()
    store.delete(keys)
    result.deleted += len(keys)
    for key in keys:
        metrics.STORED_OBJECTS_DELETED.labels(kind_of(key) or "other").inc()


class ImageRetention:
    """The loop. A sweep starts every ``retention_interval_seconds`` on the lease holder and goes on for
    ``PASS_OBJECTS`` objects per pass, so a pass stays short (liveness watches each loop's passes) however
    large the store; a replica that loses the lease drops its listing, and the next holder starts afresh."""

    PASS_OBJECTS = 5000
    IDLE_SECONDS = 30.0

    def __init__(self, rt: Runtime, store: ImageStore | None = None, clock: Callable[[], float] = time.time) -> None:
        cfg = rt.settings
        self.rt = rt
        self.clock = clock
        url = cfg.storage_url or cfg.worker_storage_url
        self.store = store if store is not None else (open_store(url) if url else None)
        self.policy = Retention(cfg.image_retention_seconds, cfg.upload_retention_seconds)
        self.interval = cfg.retention_interval_seconds
        self.listing: Iterator[StoredObject] | None = None
        self.sweep_started = 0.0
        self.next_sweep = 0.0  # the first sweep starts at once
        self.current = SweepResult()
        self.last: SweepResult | None = None  # the last complete sweep

    @property
    def enabled(self) -> bool:
        return self.store is not None and (
            self.policy.images_seconds is not None or self.policy.uploads_seconds is not None
        )

    def pause(self) -> float:
        """Seconds until the next pass: none while a sweep is under way."""
        return 0.0 if self.listing is not None else self.IDLE_SECONDS

    async def once(self) -> None:
        if not self.enabled:
            return
        if not await asyncio.to_thread(self.rt.lease.held):
            self.listing = None
            return
        store = self.store
        assert store is not None
        now = self.clock()
        if self.listing is None:
            if now < self.next_sweep:
                return
            self.listing, self.sweep_started, self.current = store.scan(ROOT), now, SweepResult()
        got, done = await asyncio.to_thread(
            sweep_some, self.listing, store, now, self.policy, self.PASS_OBJECTS, self.rt.lease.check
        )
        self.current.scanned += got.scanned
        self.current.deleted += got.deleted
        if done:
            self.listing, self.last = None, self.current
            self.next_sweep = self.sweep_started + self.interval
            log.info(
                "image retention: deleted %d of %d stored objects in %.1fs",
                self.current.deleted,
                self.current.scanned,
                self.clock() - self.sweep_started,
            )
