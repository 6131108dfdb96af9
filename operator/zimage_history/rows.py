"""A history row per attempt outcome, from the ImageJob the operator just wrote and the worker's event (pure).

GPU-seconds: the attempt's run time x the GPUs its worker holds (the ModelDeployment's ``nvidia.com/gpu``; one
for a diffusers pool that names none, none for remote and function pools) x the job's share of its batch (its
images over the batch's images, reported by the worker), so a batch's time is split fairly between its rows.
Cost: GPU-seconds at the deployment's ``spec.cost.perGpuHour``, plus ``perImage`` per image made and ``perJob``
per job that succeeded. Every attempt that ran is counted, failed ones too: the GPU was held all the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from zimage_operator.types import GPU_RESOURCE, Cost, tenant_of
from zimage_queue import JobEvent

OUTCOMES = ("retrying", "succeeded", "failed", "cancelled")
FINAL_OUTCOMES = ("succeeded", "failed", "cancelled")


def price_of(pool: dict[str, Any] | None) -> Cost:
    """The ModelDeployment's ``spec.cost`` (fields of a later release ignored), or free."""
    raw = ((pool or {}).get("spec") or {}).get("cost") or {}
    known = {f.alias or name for name, f in Cost.model_fields.items()}
    try:
        return Cost.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError:
        return Cost()


class HistoryRow(BaseModel):
    """What goes through the outbox (JSON in Redis) into ``job_history``. Unknown fields are ignored, so an
    operator of the next release can write rows this one's writer still takes during a rolling upgrade."""

    model_config = ConfigDict(extra="ignore")

    uid: str
    attempt: int
    tenant: str
    namespace: str
    name: str
    model: str
    deployment: str
    variant: str | None = None
    worker: str | None = None
    task: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    num_images: int | None = None
    images: int = 0
    seed: int | None = None
    prompt: str | None = None
    queued_at: float | None = None  # unix seconds
    started_at: float | None = None
    finished_at: float
    queue_seconds: float | None = None
    run_seconds: float | None = None
    gpus: float = 0.0
    gpu_type: str | None = None
    gpu_seconds: float = 0.0
    cost: float = 0.0
    currency: str | None = None
    outcome: str
    reason: str | None = None
    results: list[dict[str, Any]] | None = None
    text: str | None = None
    bulk: bool = False

    @property
    def final(self) -> bool:
        return self.outcome in FINAL_OUTCOMES


def gpus_of(pool: dict[str, Any] | None) -> float:
    """The GPUs one worker of the pool holds."""
    if pool is None:
        return 1.0  # the pool is gone: a GPU worker ran it (remote and function pools rarely vanish mid-job)
    spec = pool.get("spec") or {}
    res = spec.get("resources") or {}
    for section in ("limits", "requests"):
        value = (res.get(section) or {}).get(GPU_RESOURCE)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                return 1.0
    return 1.0 if spec.get("backend", "diffusers") == "diffusers" else 0.0


def gpu_seconds(run_seconds: float | None, gpus: float, images: int, batch_images: int | None) -> float:
    """The attempt's share of its batch's GPU time."""
    if not run_seconds or run_seconds < 0 or not gpus:
        return 0.0
    share = min(1.0, images / batch_images) if batch_images else 1.0
    return run_seconds * gpus * share


def cost_of(price: Cost, gpu_secs: float, images: int, succeeded: bool) -> float:
    total = gpu_secs / 3600.0 * price.per_gpu_hour + images * price.per_image + (price.per_job if succeeded else 0)
    return total if math.isfinite(total) else 0.0


def _epoch(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


def rows_for(
    job: dict[str, Any],
    events: Iterable[JobEvent],
    pool: Callable[[str, str], dict[str, Any] | None],
    routed_to: str | None = None,
    usage: Mapping[tuple[str, int], dict[str, Any]] | None = None,
) -> list[HistoryRow]:
    """The rows of the attempt outcomes among ``events`` (one job's, in order), on the job as written after them.

    ``routed_to``: the deployment the job was on before these events (its status before the write); a
    ``rerouted`` event among them moves the later ones to its target. ``pool(namespace, name)``: the
    ModelDeployment (for its price and GPUs), or None. ``usage``: what each attempt ran on, as its worker kept it
    (``JobQueue.usage``: ``batchImages``, ``device``); an attempt without it counts as having run alone."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    namespace, model = str(meta.get("namespace") or ""), str(spec.get("model") or "")
    deployment = routed_to or model
    rows: list[HistoryRow] = []
    for ev in events:
        if ev.type == "rerouted" and ev.message:
            deployment = ev.message
            continue
        if ev.type not in OUTCOMES:
            continue
        md = pool(namespace, deployment)
        price = price_of(md)
        n = int(spec.get("numImages") or 1)
        results = [r.wire() for r in ev.results or []] if ev.type == "succeeded" else []
        ran = ev.run_seconds is not None and ev.attempt > 0
        gpus = gpus_of(md) if ran else 0.0
        ran_on = (usage or {}).get((ev.uid, ev.attempt)) or {}
        secs = gpu_seconds(ev.run_seconds, gpus, n, ran_on.get("batchImages"))
        final = ev.type in FINAL_OUTCOMES
        rows.append(
            HistoryRow(
                uid=ev.uid,
                attempt=ev.attempt,
                tenant=tenant_of(meta),
                namespace=namespace,
                name=str(meta.get("name") or ev.name),
                model=model,
                deployment=deployment,
                variant=((md or {}).get("spec", {}).get("model") or {}).get("variant"),
                worker=ev.worker or None,
                task=spec.get("task", "text-to-image"),
                width=spec.get("width"),
                height=spec.get("height"),
                steps=status.get("steps") or spec.get("steps"),
                num_images=n,
                images=len(results),
                seed=status.get("seed") if status.get("seed") is not None else spec.get("seed"),
                prompt=spec.get("prompt"),
                queued_at=_epoch(status.get("queuedAt")),
                started_at=_epoch(status.get("startedAt")) if ran else None,
                finished_at=ev.ts,
                queue_seconds=status.get("queueSeconds") if ran else None,
                run_seconds=ev.run_seconds,
                gpus=gpus,
                gpu_type=ran_on.get("device"),
                gpu_seconds=secs,
                cost=cost_of(price, secs, len(results), ev.type == "succeeded"),
                currency=price.currency,
                outcome=ev.type,
                reason=ev.reason or ("Completed" if ev.type == "succeeded" else None),
                results=results or None,
                text=ev.text if final else None,
                bulk=bool(ev.bulk),
            )
        )
    return rows
