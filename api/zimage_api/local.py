"""Local mode: the API with a private Redis, a worker thread and an in-memory job store; no cluster.

``zimage serve`` runs it. What the operator does in a cluster (worker events -> job status) is done here by
applying the operator's own ``event_patch`` to the in-memory jobs; its workflow loop, by ``LocalWorkflows``
(the operator's planner over the in-memory workflows, step jobs admitted onto the local queue).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI

from zimage_api.app import create_app
from zimage_api.settings import ApiSettings
from zimage_api.store import JobExists, MemoryJobStore
from zimage_history import db
from zimage_history.outbox import Outbox
from zimage_history.rows import OUTCOMES, rows_for
from zimage_history.writer import HistoryWriter, run_in_thread
from zimage_operator import reconcile, workflow
from zimage_operator.workflow_types import WORKFLOW_LABEL
from zimage_queue import JobEvent, JobQueue
from zimage_queue.keys import queue_name
from zimage_queue.message import AdapterSpec
from zimage_queue.server import RedisServer

log = logging.getLogger(__name__)
LOCAL_NAMESPACE = "local"
DEV_KEY = "zk_dev_local-development-key"  # local mode only: the server listens on loopback


def local_model(name: str, variant: str, adapters: Sequence[AdapterSpec] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"variant": variant}}
    if adapters:  # what admission checks a job's loras against, as the operator's would
        spec["adapters"] = [a.wire() for a in adapters]
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": LOCAL_NAMESPACE},
        "spec": spec,
        "status": {"replicas": 1, "readyReplicas": 1},
    }


class LocalOperator:
    """Worker events -> in-memory job status, with the operator's pure decision; attempt outcomes -> the usage
    counters and the history outbox, as the operator's (``zimage_operator.history.record``)."""

    def __init__(self, store: MemoryJobStore, outbox: Outbox | None = None, queue: JobQueue | None = None) -> None:
        self.store = store
        self.outbox = outbox
        self.queue = queue  # where the workers keep what each attempt ran on

    def __call__(self, ev: JobEvent) -> None:
        now = datetime.now(UTC)
        routed_to: list[str | None] = []

        def decide(status: dict[str, Any]) -> dict[str, Any] | None:
            routed_to.append(status.get("routedTo"))
            return reconcile.event_patch(status, ev, now, min_interval=0)[0]

        self.store.update_status(ev.uid, decide)
        if self.outbox is not None and ev.type in OUTCOMES:
            job = self.store.get_job(ev.name)
            if job is not None and job["metadata"]["uid"] == ev.uid:
                routed = (routed_to or [None])[0]
                usage = self.queue.usage([(ev.uid, ev.attempt)]) if self.queue is not None else {}
                model = self.store.get_model
                self.outbox.record(rows_for(job, [ev], lambda _ns, name: model(name), routed, usage))


class StepJobs:
    """A workflow's step jobs in a memory store: created and admitted with the operator's decision onto the local
    queue, or cancelled there; ``LocalOperator`` moves them with the worker events. Local mode's workflows and
    ``zimage workflow run`` (``zimage_api.workflow_local``) both apply their plans with it."""

    def __init__(self, store: MemoryJobStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue

    def apply(self, plan: workflow.Plan, now: datetime) -> None:
        for body in plan.create:
            self.create(body, now)
        for name in plan.cancel:
            self.cancel(name, now)

    def create(self, body: dict[str, Any], now: datetime) -> None:
        meta = body["metadata"]
        try:
            job = self.store.create_job(meta["name"], body["spec"], meta.get("labels") or {}, {})
        except JobExists:
            return  # the planner asked again (idempotent, as on a cluster)
        model = self.store.get_model(job["spec"]["model"])
        decision = reconcile.admit(spec=job["spec"], status={}, meta=job["metadata"], model=model, now=now)
        self.store.patch_job_status(meta["name"], decision.patch)
        if decision.action == "enqueue" and decision.message is not None:
            self.queue.enqueue(decision.message, job["spec"].get("priority", "normal"))

    def cancel(self, name: str, now: datetime) -> None:
        job = self.store.get_job(name)
        if job is None:
            return
        self.queue.cancel(job["metadata"]["uid"])
        patch = reconcile.cancel_patch(
            job.get("status") or {}, now, job["metadata"].get("generation"), "Cancelled", "cancelled with its workflow"
        )
        if patch:
            self.store.patch_job_status(name, patch)


class LocalWorkflows:
    """The operator's workflow loop in-process: ``workflow.plan`` on every unfinished workflow of the store, the plan
    applied by ``StepJobs``, the status written back."""

    def __init__(self, store: MemoryJobStore, queue: JobQueue) -> None:
        self.store = store
        self.steps = StepJobs(store, queue)

    def once(self) -> None:
        for wf in self.store.unfinished_workflows(workflow.WORKFLOW_TERMINAL):
            name = wf["metadata"]["name"]
            now = datetime.now(UTC)
            jobs = self.store.jobs_labelled({WORKFLOW_LABEL: name})
            plan = workflow.plan(wf, jobs, now, lambda model: self.store.get_model(model) is not None)
            self.steps.apply(plan, now)
            if plan.status is not None:
                self.store.set_workflow_status(name, plan.status)

    def run(self, stop: threading.Event, interval: float = 0.1) -> None:
        while not stop.wait(interval):
            try:
                self.once()
            except Exception:  # a bug in one pass must not end local mode's workflows
                log.exception("local workflow pass failed")


@dataclass
class LocalApi:
    app: FastAPI
    settings: ApiSettings
    redis_url: str
    images_dir: Path
    queue: str


@contextmanager
def local_api(
    model: str = "tiny-random",
    *,
    model_name: str | None = None,  # default: z-image-<variant>, as a ModelDeployment of it would be called
    variant: str = "turbo",
    images_dir: str | Path | None = None,
    models_dir: str | None = None,
    engine: Any = None,
    workers: int = 1,
    adapters: Sequence[AdapterSpec] = (),
    **overrides: Any,
) -> Iterator[LocalApi]:
    """Everything but the HTTP server; serve ``.app`` with uvicorn (``zimage serve``) or an ASGI test client."""
    from zimage_worker.engine import load_engine
    from zimage_worker.loop import Worker
    from zimage_worker.storage import LocalStore

    model_name = model_name or f"z-image-{variant}"

    tmp = None
    if images_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="zimage-serve-")
        images_dir = tmp.name
    images = Path(images_dir).resolve()
    with RedisServer() as srv:
        settings = ApiSettings(
            redis_url=srv.url,
            namespace=LOCAL_NAMESPACE,
            dev_key=overrides.pop("dev_key", DEV_KEY),
            storage_url=f"file://{images}",
            default_model=model_name,
            **overrides,
        )
        store = MemoryJobStore(LOCAL_NAMESPACE, [local_model(model_name, variant, adapters)])
        outbox = Outbox(redis.Redis.from_url(srv.url), store=bool(settings.history_url))
        app = create_app(settings, store, on_event=LocalOperator(store, outbox, JobQueue.from_url(srv.url)))
        q = queue_name(LOCAL_NAMESPACE, model_name)
        engine = engine or load_engine(model, variant=variant, models_dir=models_dir, adapters=list(adapters))
        running = []
        for i in range(workers):
            w = Worker(
                JobQueue.from_url(srv.url, visibility_ms=60_000),
                engine,
                LocalStore(images),
                q,
                f"local-worker-{i}",
                progress_interval_seconds=0,  # one user, watching: every step
            )
            t = threading.Thread(target=w.run, kwargs={"block_ms": 200}, name=f"worker-{i}", daemon=True)
            t.start()
            running.append((w, t))
        stop_workflows = threading.Event()
        flows = threading.Thread(
            target=LocalWorkflows(store, JobQueue.from_url(srv.url)).run,
            args=(stop_workflows,),
            name="workflows",
            daemon=True,
        )
        flows.start()
        if settings.history_url:  # the operator's history writer, in-process
            engine_db = db.connect(settings.history_url, settings.history_password or None)
            run_in_thread(HistoryWriter(outbox, engine_db), stop_workflows)
        try:
            yield LocalApi(app, settings, srv.url, images, q)
        finally:
            stop_workflows.set()
            flows.join(timeout=30)
            for w, _ in running:
                w.request_stop()
            for _, t in running:
                t.join(timeout=30)
            if tmp:
                tmp.cleanup()


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int | None = None, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn from a thread; yields the base URL once it accepts connections.
    ``config``: more uvicorn.Config settings (default: warnings only)."""
    import uvicorn

    from zimage_queue.server import free_port

    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, lifespan="on", **{"log_level": "warning", **config})
    )
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the API server did not start on {host}:{port}")
        thread.join(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
