"""Workflows with no cluster: the embedded engine behind ``zimage workflow run`` (and the workflow benchmark).

The same planner as the operator's (``zimage_operator.workflow.plan``) drives the workflow; its step jobs are
admitted with the operator's own decision (``reconcile.admit``) straight onto a Redis queue, worker events move their
status with the operator's ``event_patch``, and every ModelDeployment of the file is served by local processes as
its pod would be (``zimage dev``'s ``DevStack``, without an operator or an API): forwarders for remote pools, function
workers, and GPU workers (the tiny model unless a real source is asked for).
"""

from __future__ import annotations

import base64
import copy
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zimage_api.local import LocalOperator, StepJobs
from zimage_api.store import MemoryJobStore
from zimage_operator import workflow
from zimage_operator.workflow_types import WORKFLOW_LABEL
from zimage_queue import JobQueue
from zimage_queue.keys import queue_name

LOCAL_NAMESPACE = "local"
EVENTS_GROUP = "workflow-local"


class LocalJobs:
    """Step jobs on a local queue, kept in a memory store: ``StepJobs`` admits and cancels them as the operator
    would, and the worker events read here move them (``LocalOperator``, the operator's ``event_patch``)."""

    def __init__(self, queue: JobQueue, models: dict[str, dict[str, Any]]) -> None:
        self.queue = queue
        self.models = models
        self.store = MemoryJobStore(LOCAL_NAMESPACE, list(models.values()))
        self.steps = StepJobs(self.store, queue)
        self.apply_event = LocalOperator(self.store)
        self.consumer = f"workflow-{uuid.uuid4().hex[:8]}"

    def pump(self, block_ms: int = 200) -> int:
        """Apply the worker events there are (waiting up to ``block_ms`` for the first); how many of them matter to
        a workflow (a job's end, or its move to a fallback). Progress only moves the job's own status."""
        got = self.queue.read_events(self.consumer, count=500, block_ms=block_ms, group=EVENTS_GROUP)
        for _, ev in got:
            self.apply_event(ev)
        if got:
            self.queue.ack_events([entry for entry, _ in got], group=EVENTS_GROUP)
        return sum(1 for _, ev in got if ev.type in ("succeeded", "failed", "cancelled", "rerouted"))


def _now() -> datetime:
    return datetime.now(UTC)


def run_workflow(
    wf: dict[str, Any],
    jobs: LocalJobs,
    *,
    timeout: float | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Drive one workflow to its end (or ``timeout`` seconds, or ``stop``): returns it with its final status."""
    wf = copy.deepcopy(wf)
    meta = wf.setdefault("metadata", {})
    meta.setdefault("namespace", LOCAL_NAMESPACE)
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("generation", 1)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set() and not (wf.get("spec") or {}).get("cancel"):
            wf["spec"]["cancel"] = True
        now = _now()
        plan = workflow.plan(
            wf, jobs.store.jobs_labelled({WORKFLOW_LABEL: meta["name"]}), now, jobs.models.__contains__
        )
        jobs.steps.apply(plan, now)
        if plan.status is not None:
            wf["status"] = plan.status
            if on_change is not None:
                on_change(wf)
        phase = (wf.get("status") or {}).get("phase")
        if phase in workflow.WORKFLOW_TERMINAL:
            return wf
        if phase == "Pending" and plan.requeue and not any(jobs.models.get(s["model"]) for s in wf["spec"]["steps"]):
            return wf  # a model the file does not have: nothing will change
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"workflow {meta.get('name')} still {phase} after {timeout:g}s")
        if plan.create:
            continue  # new jobs may already be done; nothing to wait for
        # Plan again when a job ended or moved, or every second (a stop, a deadline); events that arrive together
        # are applied together.
        until = time.monotonic() + 1.0
        while not jobs.pump(block_ms=200) and time.monotonic() < until:
            if stop is not None and stop.is_set():
                break


# -- the file and the processes that serve it ---------------------------------------------------------------------


@dataclass
class WorkflowFile:
    workflows: list[dict[str, Any]]
    models: list[dict[str, Any]]
    secrets: dict[str, dict[str, str]]


def read_file(text: str, namespace: str = LOCAL_NAMESPACE) -> WorkflowFile:
    """ImageWorkflows, ModelDeployments and Secrets (keys of remote pools) from one multi-document YAML."""
    import yaml

    from zimage_operator.types import API_VERSION

    out = WorkflowFile([], [], {})
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        for d in (doc.get("items") or []) if doc.get("kind") == "List" else [doc]:
            kind = d.get("kind")
            d.setdefault("metadata", {})["namespace"] = namespace
            if kind == "ImageWorkflow" and d.get("apiVersion") == API_VERSION:
                out.workflows.append(d)
            elif kind == "ModelDeployment" and d.get("apiVersion") == API_VERSION:
                out.models.append(d)
            elif kind == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
                data.update({k: str(v) for k, v in (d.get("stringData") or {}).items()})
                out.secrets[d["metadata"]["name"]] = data
    return out


def put_input(images: Path, tenant: str, path: Path) -> str:
    """A local file copied into the tenant's part of the store (as an upload): the URI steps read it from."""
    uploads = images / "tenants" / tenant / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    target = uploads / f"{uuid.uuid4().hex[:8]}-{path.name}"
    shutil.copyfile(path, target)
    return target.as_uri()


@contextmanager
def local_pools(
    models: list[dict[str, Any]],
    secrets: dict[str, dict[str, str]],
    state: Path,
    *,
    model_source: str | None = "tiny-random",
    workers: dict[str, int] | None = None,
    redis_url: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[tuple[LocalJobs, Path]]:
    """Redis and one process per pool (``workers`` per pool name to change that), serving ``models``; yields the
    step-job store to run workflows on and the images folder."""
    from zimage_api.dev import DevStack

    models = [{**md, "metadata": {**md["metadata"], "namespace": LOCAL_NAMESPACE}} for md in models]

    def read_secret(_namespace: str, name: str) -> dict[str, str]:
        if name not in secrets:
            raise KeyError(f"no Secret named {name!r} in the file (a remote pool's keysSecret)")
        return secrets[name]

    stack = DevStack(
        [LOCAL_NAMESPACE],
        state,
        workers=1,
        model_source=model_source,
        redis_url=redis_url,
        api_port=None,
        say=say,
        list_pools=lambda _ns: models,
        read_secret=read_secret,
        operator=False,
        pool_workers=workers or {},
    )
    stack.start()
    try:
        stack.sync_pools(models, time.monotonic())
        keeper = threading.Thread(target=stack.run, name="local-pools", daemon=True)
        keeper.start()
        queue = JobQueue.from_url(stack.redis_url or "", visibility_ms=60_000)
        for md in models:  # the groups exist before the first job, as the operator's pool loop makes them
            queue.ensure_queue(queue_name(LOCAL_NAMESPACE, md["metadata"]["name"]))
        yield LocalJobs(queue, {md["metadata"]["name"]: md for md in models}), stack.images
    finally:
        stack.stop()
