"""The events consumer's batching, against a real Redis: one status write per job per read, jobs written
concurrently, and what is acked when one job's write fails for now or for good.

The Kubernetes side is injected (an in-memory stand-in for the three calls the hot path makes, with
resourceVersions and conflicts), so the requests per job can be counted exactly; the real API server path is
covered by the kube tests and bench/crs.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration

from zimage_operator import events
from zimage_operator.k8s import Kube, KubeError, StatusConflict
from zimage_operator.recorder import Recorder
from zimage_operator.runtime import Runtime
from zimage_operator.settings import OperatorSettings
from zimage_operator.types import GROUP, VERSION
from zimage_queue import JobEvent, JobQueue, keys


class Api:
    """ImageJobs by (namespace, name): GET, status merge-PATCH on a resourceVersion, Event POST."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 100
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}  # job name -> HTTP status to answer its PATCHes with
        self.posted: list[tuple[str, str]] = []

    def create(self, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageJob",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": str(self.rv), "generation": 1},
            "spec": {"model": "m", "prompt": name},
            "status": status,
        }
        self.jobs["ns", name] = obj
        return obj

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("GET", name))
        obj = self.jobs.get((namespace, name))
        return None if obj is None else {**obj, "status": dict(obj["status"])}

    async def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any] | None:
        self.calls.append(("PATCH", name))
        await asyncio.sleep(0)  # let the other writes of the batch start: they run concurrently
        if name in self.fail:
            raise KubeError(self.fail[name], "refused")
        obj = self.jobs.get((namespace, name))
        if obj is None:
            return None
        if resource_version and resource_version != obj["metadata"]["resourceVersion"]:
            raise StatusConflict(name)
        self.rv += 1
        obj["status"] = {**obj["status"], **status}
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return {**obj, "status": dict(obj["status"])}

    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str, key: Any = None) -> bool:
        self.posted.append((obj["metadata"]["name"], reason))
        return True

    def count(self, verb: str) -> int:
        return sum(1 for v, _ in self.calls if v == verb)


@pytest.fixture
def stack(queue: JobQueue) -> tuple[Runtime, Api, events.EventApplier]:
    api = Api()
    settings = OperatorSettings(redis_url="redis://unused", events_block_ms=10, events_concurrency=4)
    rt = Runtime(
        settings=settings,
        kube=Kube(ApiClient(Configuration())),
        queue=queue,
        akube=api,  # type: ignore[arg-type]
        recorder=Recorder(api, normal=True),  # type: ignore[arg-type]
    )
    return rt, api, events.EventApplier(rt)


def publish(q: JobQueue, name: str, uid: str, *types: str) -> None:
    for t in types:
        q.publish(JobEvent(type=t, uid=uid, namespace="ns", name=name, worker="w", attempt=1, step=1))  # type: ignore[arg-type]


def queued(api: Api, rt: Runtime, n: int) -> list[tuple[str, str]]:
    jobs = []
    for i in range(n):
        obj = api.create(f"job-{i}", f"uid-{i}", {"phase": "Queued", "progress": {"step": 0, "totalSteps": 2}})
        rt.observe_job(obj)  # what the watch saw
        jobs.append((f"job-{i}", f"uid-{i}"))
    return jobs


def pending(q: JobQueue) -> int:
    return int(q.r.xpending(keys.EVENTS_STREAM, keys.OPERATOR_GROUP)["pending"])


def test_a_batch_costs_one_write_per_job_and_no_read(stack: tuple[Runtime, Api, events.EventApplier]) -> None:
    rt, api, applier = stack
    jobs = queued(api, rt, 20)
    for name, uid in jobs:
        publish(rt.queue, name, uid, "started", "progress", "succeeded")
    asyncio.run(events.consume_once(rt, applier))
    assert api.count("PATCH") == 20 and api.count("GET") == 0
    assert {api.jobs["ns", n]["status"]["phase"] for n, _ in jobs} == {"Succeeded"}
    assert all(api.jobs["ns", n]["status"]["startedAt"] for n, _ in jobs)  # the start folded into the one write
    assert pending(rt.queue) == 0 and not rt.unfinished  # all acked; finished jobs leave the view
    assert not applier.last_progress  # nor is a finished job's progress time kept


def test_a_stale_view_is_read_again_on_the_conflict(stack: tuple[Runtime, Api, events.EventApplier]) -> None:
    rt, api, applier = stack
    [(name, uid)] = queued(api, rt, 1)
    api.jobs["ns", name]["metadata"]["resourceVersion"] = "999"  # someone wrote after the watch's version
    publish(rt.queue, name, uid, "succeeded")
    asyncio.run(events.consume_once(rt, applier))
    assert api.calls == [("PATCH", name), ("GET", name), ("PATCH", name)]
    assert api.jobs["ns", name]["status"]["phase"] == "Succeeded"


def test_a_job_whose_write_fails_for_now_stays_pending_alone_and_comes_back_first(
    stack: tuple[Runtime, Api, events.EventApplier],
) -> None:
    rt, api, applier = stack
    jobs = queued(api, rt, 3)
    for name, uid in jobs:
        publish(rt.queue, name, uid, "started", "succeeded")
    api.fail["job-1"] = 503
    with pytest.raises(KubeError):
        asyncio.run(events.consume_once(rt, applier))
    assert api.jobs["ns", "job-0"]["status"]["phase"] == "Succeeded"
    assert api.jobs["ns", "job-2"]["status"]["phase"] == "Succeeded"
    assert pending(rt.queue) == 2  # job-1's two events, the others acked
    del api.fail["job-1"]
    publish(rt.queue, "job-0", "uid-0", "progress")  # a new event behind the pending ones
    api.calls.clear()
    asyncio.run(events.consume_once(rt, applier))  # the pending ones first, in their order
    assert api.calls == [("PATCH", "job-1")] and api.jobs["ns", "job-1"]["status"]["phase"] == "Succeeded"
    assert pending(rt.queue) == 0
    asyncio.run(events.consume_once(rt, applier))  # then the new one: job-0 is final, nothing moves back
    assert api.jobs["ns", "job-0"]["status"]["phase"] == "Succeeded" and pending(rt.queue) == 0


def test_a_write_refused_for_good_is_dead_lettered_and_nothing_stalls(
    stack: tuple[Runtime, Api, events.EventApplier],
) -> None:
    rt, api, applier = stack
    jobs = queued(api, rt, 2)
    for name, uid in jobs:
        publish(rt.queue, name, uid, "succeeded")
    api.fail["job-0"] = 422
    asyncio.run(events.consume_once(rt, applier))
    assert pending(rt.queue) == 0
    assert api.jobs["ns", "job-1"]["status"]["phase"] == "Succeeded"
    dead = rt.queue.r.xrange(keys.DEAD_LETTER_STREAM)
    assert len(dead) == 1 and b"job-0" in dead[0][1][keys.RAW_FIELD.encode()] and b"422" in dead[0][1][b"error"]


def test_bulk_jobs_events_cost_no_request(stack: tuple[Runtime, Api, events.EventApplier]) -> None:
    rt, api, applier = stack
    rt.queue.publish(JobEvent(type="succeeded", uid="b-1", namespace="ns", name="bulk-1", bulk=True))
    asyncio.run(events.consume_once(rt, applier))
    assert api.calls == [] and pending(rt.queue) == 0
