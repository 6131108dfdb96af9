"""History rows from an ImageJob and its worker events: GPU-seconds (a batch's time split by images), cost, and
which deployment ran each attempt (pure: no database)."""

from __future__ import annotations

from typing import Any

import pytest

from zimage_history.rows import cost_of, gpu_seconds, gpus_of, price_of, rows_for
from zimage_queue import JobEvent, ResultImage

QUEUED = 1796637600.0  # 2026-12-07T10:00:00Z


def job(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "fox", "namespace": "team-a", "uid": "u1", "labels": {"zimage.dev/tenant": "acme"}},
        "spec": {"model": "turbo", "prompt": "a red fox", "width": 512, "height": 512, "numImages": 2, **spec},
        "status": {"phase": "Succeeded", "seed": 7, "steps": 8, "queuedAt": "2026-12-07T10:00:00Z"},
    }


def pool(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a"}, "spec": spec}


POOLS = {
    "turbo": pool("turbo", cost={"perGpuHour": 3.6, "perImage": 0.01, "perJob": 0.5, "currency": "EUR"},
                  resources={"limits": {"nvidia.com/gpu": 2}}),
    "backup": pool("backup", cost={"perGpuHour": 36.0}),
    "llm": pool("llm", backend="remote", cost={"perJob": 0.002}),
}  # fmt: skip


def lookup(namespace: str, name: str) -> dict[str, Any] | None:
    return POOLS.get(name) if namespace == "team-a" else None


def image(i: int) -> ResultImage:
    return ResultImage(uri=f"file:///img/{i}.png", width=512, height=512, seed=7 + i, sha256="0" * 64, bytes=10)


def ev(type_: str, attempt: int, **kw: Any) -> JobEvent:
    return JobEvent(type=type_, uid="u1", namespace="team-a", name="fox", attempt=attempt, worker="w1", **kw)  # type: ignore[arg-type]


def test_a_batch_is_split_by_images_and_multiplied_by_gpus() -> None:
    assert gpu_seconds(10.0, 2.0, images=2, batch_images=8) == pytest.approx(5.0)
    assert gpu_seconds(10.0, 1.0, images=1, batch_images=None) == pytest.approx(10.0)  # an older worker: alone
    assert gpu_seconds(10.0, 0.0, images=1, batch_images=1) == 0.0  # a remote or function pool holds no GPU
    assert gpu_seconds(None, 1.0, images=1, batch_images=1) == 0.0
    # the shares of one batch add up to its time x GPUs
    shares = [gpu_seconds(6.0, 2.0, images=n, batch_images=6) for n in (1, 2, 3)]
    assert sum(shares) == pytest.approx(12.0)


def test_gpus_per_worker_come_from_the_pool() -> None:
    assert gpus_of(POOLS["turbo"]) == 2.0
    assert gpus_of(POOLS["backup"]) == 1.0  # a diffusers pool that names none holds one
    assert gpus_of(POOLS["llm"]) == 0.0
    assert gpus_of(pool("x", resources={"requests": {"nvidia.com/gpu": "4"}})) == 4.0


def test_price_ignores_fields_of_a_later_release_and_bad_values() -> None:
    assert price_of(pool("x", cost={"perGpuHour": 2, "perToken": 1})).per_gpu_hour == 2.0
    assert price_of(pool("x", cost={"perGpuHour": -1})).per_gpu_hour == 0.0
    assert price_of(None).currency == "USD"
    assert cost_of(price_of(POOLS["turbo"]), 3600.0, images=2, succeeded=True) == pytest.approx(3.6 + 0.02 + 0.5)
    assert cost_of(price_of(POOLS["turbo"]), 1800.0, images=0, succeeded=False) == pytest.approx(1.8)


def test_each_attempt_outcome_is_a_row_on_the_deployment_that_ran_it() -> None:
    results = [image(0), image(1)]
    evs = [
        ev("started", 1),
        ev("retrying", 1, reason="WorkerError", run_seconds=4.0),
        ev("rerouted", 0, reason="FallbackModel", message="backup"),
        ev("progress", 2, step=3),
        ev("succeeded", 2, results=results, run_seconds=10.0, ts=QUEUED + 30),
    ]
    # what the workers kept of each attempt (JobQueue.usage)
    usage = {("u1", 1): {"batchImages": 2, "device": "cpu"}, ("u1", 2): {"batchImages": 4, "device": "NVIDIA H100"}}
    rows = rows_for(job(), evs, lookup, usage=usage)
    assert [(r.attempt, r.outcome, r.deployment) for r in rows] == [
        (1, "retrying", "turbo"),
        (2, "succeeded", "backup"),
    ]
    first, last = rows
    assert (first.gpus, first.gpu_seconds, first.cost, first.images) == (2.0, 8.0, pytest.approx(8.0 / 3600 * 3.6), 0)
    assert not first.final and last.final
    assert (last.gpus, last.gpu_seconds) == (1.0, 5.0)  # its 2 images of a batch of 4, on one GPU
    assert last.cost == pytest.approx(5.0 / 3600 * 36.0)
    assert (last.tenant, last.model, last.prompt, last.seed, last.steps, last.gpu_type) == (
        "acme", "turbo", "a red fox", 7, 8, "NVIDIA H100"
    )  # fmt: skip
    assert [r["uri"] for r in last.results or []] == ["file:///img/0.png", "file:///img/1.png"]
    assert (last.queued_at, last.finished_at) == (QUEUED, QUEUED + 30)


def test_a_job_on_a_fallback_before_these_events_and_a_cancel_before_running() -> None:
    [row] = rows_for(job(), [ev("failed", 3, reason="OutOfMemory", run_seconds=1.0)], lookup, routed_to="backup")
    assert (row.deployment, row.outcome, row.reason, row.gpu_seconds) == ("backup", "failed", "OutOfMemory", 1.0)
    [queued] = rows_for(job(), [ev("cancelled", 0, reason="Cancelled")], lookup)
    assert (queued.attempt, queued.gpus, queued.gpu_seconds, queued.cost, queued.started_at) == (0, 0.0, 0.0, 0.0, None)


def test_a_job_made_with_kubectl_belongs_to_its_namespace() -> None:
    body = job()
    del body["metadata"]["labels"]
    [row] = rows_for(body, [ev("succeeded", 1, results=[image(0)], run_seconds=1.0)], lookup)
    assert row.tenant == "team-a"
