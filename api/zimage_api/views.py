"""Kubernetes-shaped jobs and models -> what clients get back."""

from __future__ import annotations

import json
from typing import Any, cast

from zimage_api.aliases import variant_of
from zimage_api.redis_store import is_bulk
from zimage_api.schemas import ImageLink, JobView, Links, ModelView, Progress
from zimage_api.signing import UrlSigner
from zimage_operator import variants
from zimage_operator.types import TERMINAL_PHASES
from zimage_queue import QueueStats
from zimage_queue.message import Task


def sse_event(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Events frame: the event's name and its JSON data."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def job_path(name: str) -> str:
    return f"/v1/jobs/{name}"


def image_path(name: str, index: int) -> str:
    return f"{job_path(name)}/images/{index}"


def phase_reason(status: dict[str, Any]) -> str | None:
    """The reason of the condition named after the object's phase (why a job or workflow ended)."""
    phase = status.get("phase")
    for c in status.get("conditions") or []:
        if c.get("type") == phase and c.get("status") == "True":
            return str(c.get("reason"))
    return None


def job_view(
    job: dict[str, Any], signer: UrlSigner, base_url: str = "", status: dict[str, Any] | None = None
) -> JobView:
    meta, spec = job["metadata"], job.get("spec") or {}
    status = (job.get("status") or {}) if status is None else status
    name = meta["name"]
    progress = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    images = [
        ImageLink(
            index=i,
            url=base_url + signer.sign(image_path(name, i)),
            width=r["width"],
            height=r["height"],
            seed=r["seed"],
            sha256=r["sha256"],
            bytes=r["bytes"],
        )
        for i, r in enumerate(status.get("results") or [])
    ]
    return JobView(
        id=name,
        mode="bulk" if is_bulk(job) else "imagejob",
        model=spec.get("model", ""),
        phase=phase,
        reason=phase_reason(status) if phase in TERMINAL_PHASES else None,
        message=status.get("message"),
        progress=Progress(step=progress.get("step", 0), total_steps=progress.get("totalSteps", 0)),
        attempts=status.get("attempts"),
        seed=status.get("seed", spec.get("seed")),
        created_at=meta.get("creationTimestamp"),
        queued_at=status.get("queuedAt"),
        started_at=status.get("startedAt"),
        finished_at=status.get("finishedAt"),
        queue_seconds=status.get("queueSeconds"),
        run_seconds=status.get("runSeconds"),
        worker=status.get("worker"),
        gpu_seconds=status.get("gpuSeconds"),
        cost=status.get("cost"),
        currency=status.get("currency"),
        images=images,
        adapters=status.get("adapters"),
        request=spec,
        links=Links(self_=job_path(name), events=f"{job_path(name)}/events"),
    )


def model_view(md: dict[str, Any], stats: QueueStats) -> ModelView:
    status, spec = md.get("status") or {}, md.get("spec") or {}
    ready = int(status.get("readyReplicas") or 0)
    does = variants.accepts(md.get("spec") or {})
    return ModelView(
        id=md["metadata"]["name"],
        variant=variant_of(md),
        ready=ready > 0,
        ready_replicas=ready,
        replicas=int(status.get("replicas") or 0),
        queue_length=stats.queued,
        in_flight=stats.in_flight,
        adapters=[a["name"] for a in spec.get("adapters") or [] if isinstance(a, dict) and "name" in a],
        tasks=cast("list[Task]", list(does.tasks)) if does else None,
        max_reference_images=does.references if does else None,
    )
