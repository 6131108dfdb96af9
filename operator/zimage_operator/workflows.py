"""The operator's side of ImageWorkflows: a book of workflows and their step jobs kept by the watches, and one
supervised loop that plans the workflows something happened to (``workflow.plan``, pure) and applies the plan:
step ImageJobs created (owned by the workflow, so deleting it deletes them and their queued work is cancelled by the
ImageJob watch), jobs cancelled, the status written on the resourceVersion it was computed from, Events recorded.

The watches only mark a workflow dirty; the loop does every API call, and only on the replica holding the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from zimage_operator import reconcile, workflow
from zimage_operator.conditions import parse_iso
from zimage_operator.k8s import StatusConflict
from zimage_operator.lease import LeaseLost
from zimage_operator.runtime import newer
from zimage_operator.types import TERMINAL_PHASES, Reason
from zimage_operator.workflow_types import WORKFLOW_LABEL

log = logging.getLogger(__name__)

RESYNC_SECONDS = 10.0  # every workflow in flight is planned at least this often (a model appeared, a lost event)
MAX_PER_PASS = 64
MAX_FINISHED_KEPT = 10_000


Key = tuple[str, str]  # (namespace, workflow name)


@dataclass
class WorkflowBook:
    workflows: dict[Key, dict[str, Any]] = field(default_factory=dict)  # in flight (and finished with a TTL)
    jobs: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # step jobs by workflow, by name
    dirty: set[Key] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    next_resync: float = 0.0

    def observe_workflow(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if deleted:
            self.workflows.pop(key, None)
            self.jobs.pop(key, None)
            self.dirty.discard(key)
            return
        status = body.get("status") or {}
        finished = status.get("phase") in workflow.WORKFLOW_TERMINAL
        if finished and (body.get("spec") or {}).get("ttlSecondsAfterFinished") is None:
            self.workflows.pop(key, None)
            self.jobs.pop(key, None)
            return
        seen = self.workflows.get(key)
        if seen is not None and not newer(meta.get("resourceVersion"), seen["metadata"].get("resourceVersion")):
            return  # a watch event older than (or the same as) a write of ours already seen
        self.workflows[key] = body
        self.mark(key)

    def observe_job(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(WORKFLOW_LABEL)
        if not owner:
            return
        key = (meta.get("namespace", ""), owner)
        if key not in self.jobs and len(self.jobs) >= MAX_FINISHED_KEPT + len(self.workflows):
            for gone in [k for k in self.jobs if k not in self.workflows][: MAX_FINISHED_KEPT // 10]:
                del self.jobs[gone]  # step jobs of finished workflows (kept a while in case one comes back)
        jobs = self.jobs.setdefault(key, {})
        if deleted:
            jobs.pop(meta.get("name", ""), None)
        else:
            jobs[meta.get("name", "")] = body
        if key in self.workflows:
            self.mark(key)

    def mark(self, key: Key) -> None:
        self.dirty.add(key)
        self.wake.set()

    def take(self, now: float) -> list[Key]:
        if now >= self.next_resync:
            self.next_resync = now + RESYNC_SECONDS
            self.dirty.update(self.workflows)
        taken = sorted(self.dirty)[:MAX_PER_PASS]
        self.dirty.difference_update(taken)
        return taken


class WorkflowLoop:
    """One pass: plan and apply every dirty workflow (waits briefly for a watch event when none is)."""

    def __init__(self, rt: Any, book: WorkflowBook) -> None:
        self.rt = rt
        self.book = book

    async def once(self) -> None:
        book = self.book
        if not book.dirty and time.monotonic() < book.next_resync:
            book.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(book.wake.wait(), timeout=1.0)
        if not await asyncio.to_thread(self.rt.lease.held):
            return
        for key in book.take(time.monotonic()):
            body = book.workflows.get(key)
            if body is None:
                continue
            try:
                await self.reconcile(key, body)
            except LeaseLost as e:
                log.warning("%s", e)
                book.mark(key)
                return
            except StatusConflict:
                book.mark(key)  # the watch brings the newer version; plan again on it
            except Exception:
                log.exception("workflow %s/%s: pass failed; will retry", *key)
                book.mark(key)
                raise

    async def reconcile(self, key: Key, body: dict[str, Any]) -> None:
        rt, book = self.rt, self.book
        namespace, name = key
        now = datetime.now(UTC)
        status = body.get("status") or {}
        if status.get("phase") in workflow.WORKFLOW_TERMINAL:
            await self._expire(key, body, now)
            return
        jobs = book.jobs.get(key, {})
        plan = workflow.plan(body, jobs, now, lambda model: rt.model(namespace, model) is not None)
        rt.lease.check()
        for job in plan.create:
            await asyncio.to_thread(rt.kube.create_object, job)
        for job_name in plan.cancel:
            await self._cancel(jobs.get(job_name), now)
        known = {i.get("job") for st in status.get("steps") or [] for i in st.get("instances") or []}
        for job in plan.create:  # a job created before but never seen is read back (the watch missed nothing new)
            if job["metadata"]["name"] in known:
                got = await asyncio.to_thread(rt.kube.get_job, namespace, job["metadata"]["name"])
                if got is not None:
                    book.observe_job(got)
        if plan.status is not None:
            rv = body["metadata"].get("resourceVersion")
            written = await asyncio.to_thread(rt.kube.patch_workflow_status, namespace, name, plan.status, rv)
            if written is not None:
                book.observe_workflow(written)  # the version just written, until the watch brings it too
        for type_, reason, message in plan.events:
            rt.recorder.record(body, type_, reason, message, always=True)
        if plan.requeue:
            loop = asyncio.get_running_loop()
            loop.call_later(rt.settings.model_recheck_seconds, book.mark, key)

    async def _cancel(self, job: dict[str, Any] | None, now: datetime) -> None:
        """A step job cancelled with its workflow: its queued or running work stops, its status says why."""
        if job is None:
            return
        meta, status = job["metadata"], job.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            return
        await asyncio.to_thread(self.rt.queue.cancel, meta["uid"])
        patch = reconcile.cancel_patch(
            status, now, meta.get("generation"), Reason.CANCELLED, "cancelled with its workflow"
        )
        if patch:
            await asyncio.to_thread(self.rt.kube.patch_job_status, meta["namespace"], meta["name"], patch)

    async def _expire(self, key: Key, body: dict[str, Any], now: datetime) -> None:
        ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
        finished = parse_iso((body.get("status") or {}).get("finishedAt"))
        if ttl is None or finished is None:
            self.book.workflows.pop(key, None)
            return
        if (now - finished).total_seconds() >= ttl:
            self.rt.lease.check()
            await asyncio.to_thread(self.rt.kube.delete_workflow, *key)
            self.book.workflows.pop(key, None)
            self.book.jobs.pop(key, None)
