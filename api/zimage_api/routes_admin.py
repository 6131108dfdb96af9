"""What operators of the API look at (admin keys only): ``GET /v1/deployments``, every ModelDeployment's status,
queue, workers and recent throughput."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from zimage_api.aliases import variant_of
from zimage_api.deps import AdminCaller, App
from zimage_api.schemas import DeploymentList, DeploymentView, ThroughputMinute, WorkerCounts
from zimage_history.outbox import throughput
from zimage_operator.conditions import iso
from zimage_operator.types import Condition, ScalingDecision
from zimage_queue import JobQueue, keys

router = APIRouter(prefix="/v1", tags=["admin"])
THROUGHPUT_MINUTES = 15
ADMIN_ANSWERS: dict[int | str, dict[str, Any]] = {403: {"description": "The key is not an admin key"}}

M = TypeVar("M", bound=BaseModel)


def known(model: type[M], items: Any) -> list[M]:
    """The entries of a status list that ``model`` reads, fields of a later release dropped (a newer operator's
    status must not break this view); entries it cannot read at all are left out."""
    names = {f.alias or name for name, f in model.model_fields.items()}
    out = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(model.model_validate({k: v for k, v in item.items() if k in names}))
        except (ValidationError, AttributeError):
            continue
    return out


def deployment_view(md: dict[str, Any], queue: JobQueue, namespace: str, now: float) -> DeploymentView:
    """One ModelDeployment's view (blocking: Redis)."""
    name = md["metadata"]["name"]
    status = md.get("status") or {}
    q = keys.queue_name(namespace, name)
    stats = queue.stats(q)
    workers = queue.workers(q)  # fresh heartbeats only, as the scaler reads them
    busy = sum(workers.values())
    desired = status.get("desiredReplicas")
    return DeploymentView(
        id=name,
        variant=variant_of(md),
        replicas=int(status.get("replicas") or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        desired_replicas=int(desired) if desired is not None else None,
        queue_length=stats.queued,
        in_flight=stats.in_flight,
        workers=WorkerCounts(busy=busy, idle=len(workers) - busy),
        throughput=[
            ThroughputMinute(minute=iso(m.start), jobs=m.jobs, images=m.images)
            for m in throughput(queue.r, namespace, name, now, THROUGHPUT_MINUTES)
        ],
        conditions=known(Condition, status.get("conditions")),
        scaling_history=known(ScalingDecision, status.get("scalingHistory")),
    )


@router.get("/deployments", response_model=DeploymentList, responses=ADMIN_ANSWERS)
async def deployments(_: AdminCaller, app: App) -> DeploymentList:
    """Every ModelDeployment of the API's namespace: replicas, the scaler's decisions and conditions (its status),
    its queue and live workers now, and the jobs that ended on it and their images per UTC minute over the last 15
    minutes (oldest first, empty minutes included). Admin keys only."""
    store, queue = app.service.store, app.service.queue
    models = await asyncio.to_thread(store.list_models)
    now = time.time()
    views = [await asyncio.to_thread(deployment_view, md, queue, store.namespace, now) for md in models]
    return DeploymentList(data=views)
