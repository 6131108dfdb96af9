"""The queue contract against a real redis-server: idempotence, redelivery, results once, dead-letter."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import Processes, start_worker, wait_for
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, keys
from zimage_worker.engine import NoopEngine
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore

Q = "ns/model"


def message(uid: str | None = None, max_retries: int = 2, **params: Any) -> JobMessage:
    uid = uid or str(uuid.uuid4())
    p = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 7, **params}
    return JobMessage(
        uid=uid,
        namespace="ns",
        name=f"job-{uid[:6]}",
        queue=Q,
        params=GenerationParams.model_validate(p),
        max_retries=max_retries,
    )


def all_events(r: redis.Redis, uid: str) -> list[JobEvent]:
    return [
        e for e in (JobEvent.model_validate_json(f[b"event"]) for _, f in r.xrange(keys.EVENTS_STREAM)) if e.uid == uid
    ]


class FailingEngine(NoopEngine):
    def __init__(self, fails: int, error: Exception | None = None) -> None:
        super().__init__()
        self.fails = fails
        self.calls = 0
        self.error = error or RuntimeError("pipeline exploded")

    def generate(self, params: GenerationParams, **kw: Any) -> Any:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return super().generate(params, **kw)


def make_worker(q: JobQueue, tmp_path: Path, engine: Any = None, name: str = "w1") -> Worker:
    # Every step checked and reported: the no-op engine's steps take microseconds, and these tests cancel at a
    # given step and count the progress events.
    return Worker(
        q,
        engine or NoopEngine(),
        LocalStore(tmp_path / "images"),
        Q,
        name,
        heartbeat_seconds=0.1,
        cancel_poll_seconds=0,
        progress_interval_seconds=0,
    )


def test_enqueue_is_idempotent_per_uid(queue: JobQueue) -> None:
    m = message()
    first, second = queue.enqueue(m), queue.enqueue(m.model_copy(update={"name": "other"}))
    assert first.created and not second.created
    assert first.entry_id == second.entry_id
    assert queue.r.xlen(keys.stream(Q, "normal")) == 1
    assert queue.stats(Q).queued == 1


def test_job_runs_stores_then_acks_with_one_result(queue: JobQueue, tmp_path: Path) -> None:
    m = message(num_images=2)
    queue.enqueue(m)
    w = make_worker(queue, tmp_path)
    w.run(max_jobs=1, block_ms=0)
    results = queue.result(m.uid)
    assert results is not None and len(results) == 2
    assert [r.seed for r in results] == [7, 8]
    for r in results:
        assert Path(r.uri.removeprefix("file://")).stat().st_size == r.bytes
    assert queue.stats(Q) == type(queue.stats(Q))(queued=0, in_flight=0)
    types = [e.type for e in all_events(queue.r, m.uid)]
    assert types[0] == "started" and types[-1] == "succeeded" and types.count("progress") == 4  # 2 steps x 2 images


def test_priority_order(queue: JobQueue, tmp_path: Path) -> None:
    low, normal, high = message(), message(), message()
    queue.enqueue(low, "low")
    queue.enqueue(normal, "normal")
    queue.enqueue(high, "high")
    got = [queue.take(Q, "c", block_ms=0)[0].message.uid for _ in range(3)]
    assert got == [high.uid, normal.uid, low.uid]


def test_redelivered_job_never_yields_a_second_result_set(queue: JobQueue, tmp_path: Path) -> None:
    m = message()
    queue.enqueue(m)
    w = make_worker(queue, tmp_path)
    d = queue.take(Q, "slow-worker", block_ms=0)[0]
    assert queue.begin(d, "slow-worker") == "run"
    # The slow worker lost its lease; another worker reclaims the entry and finishes the job first.
    d2 = wait_for(lambda: queue.reclaim(Q, "w1"), what="reclaim after the visibility timeout")[0]
    assert w.process(d2) == "succeeded"
    ev = JobEvent(type="succeeded", uid=m.uid, namespace="ns", name=m.name)
    assert queue.complete(d, [], ev) is False  # the slow worker's late result is dropped
    assert [e.type for e in all_events(queue.r, m.uid)].count("succeeded") == 1
    assert len(queue.result(m.uid) or []) == 1
    # and a third delivery of the same uid is acked without running
    queue.r.xadd(keys.stream(Q, "normal"), {keys.MESSAGE_FIELD: m.model_dump_json(by_alias=True)})
    assert w.process(queue.take(Q, "w1", block_ms=0)[0]) == "duplicate"


def test_failing_job_is_retried_then_dead_lettered(queue: JobQueue, tmp_path: Path) -> None:
    m = message(max_retries=2)
    queue.enqueue(m)
    engine = FailingEngine(fails=100)
    w = make_worker(queue, tmp_path, engine)
    w.run(max_jobs=3, block_ms=0)
    assert engine.calls == 3  # first attempt + 2 retries
    dead = queue.dead_letters()
    assert [d[0].uid for d in dead] == [m.uid]
    assert "pipeline exploded" in dead[0][1]
    types = [e.type for e in all_events(queue.r, m.uid) if e.type != "progress"]
    assert types == ["started", "retrying", "started", "retrying", "started", "failed"]
    assert queue.stats(Q).queued == 0 and queue.stats(Q).in_flight == 0


def test_transient_error_retries_and_succeeds(queue: JobQueue, tmp_path: Path) -> None:
    m = message()
    queue.enqueue(m)
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    w = make_worker(queue, tmp_path, FailingEngine(fails=1, error=oom))
    w.run(max_jobs=2, block_ms=0)
    evs = all_events(queue.r, m.uid)
    retry = next(e for e in evs if e.type == "retrying")
    assert retry.reason == "OutOfMemory"
    assert evs[-1].type == "succeeded" and evs[-1].attempt == 2


def test_cancel_before_start_and_while_running(queue: JobQueue, tmp_path: Path) -> None:
    before, during = message(), message(steps=50)
    queue.enqueue(before)
    queue.cancel(before.uid)
    w = make_worker(queue, tmp_path)
    assert w.process(queue.take(Q, "w1", block_ms=0)[0]) == "cancelled"

    queue.enqueue(during)

    class CancelAtStep3(NoopEngine):
        def generate(self, params: GenerationParams, *, on_step: Callable[[int, int], None], **kw: Any) -> Any:
            def step(i: int, n: int) -> None:
                on_step(i, n)
                if i == 3:
                    queue.cancel(during.uid)

            return super().generate(params, on_step=step, **kw)

    w2 = make_worker(queue, tmp_path, CancelAtStep3())
    assert w2.process(queue.take(Q, "w1", block_ms=0)[0]) == "cancelled"
    progress = [e.step for e in all_events(queue.r, during.uid) if e.type == "progress"]
    assert progress == [1, 2, 3]
    assert queue.result(during.uid) is None and queue.stats(Q).in_flight == 0


def test_reclaimed_job_past_max_retries_is_dead_lettered(queue: JobQueue, tmp_path: Path) -> None:
    m = message(max_retries=0)
    queue.enqueue(m)
    d = queue.take(Q, "dead-1", block_ms=0)[0]
    assert queue.begin(d, "dead-1") == "run"  # then this worker "dies"
    w = make_worker(queue, tmp_path)
    d2 = wait_for(lambda: queue.reclaim(Q, "w1"), what="reclaim")[0]
    assert w.process(d2) == "dead_lettered"
    assert [x[0].uid for x in queue.dead_letters()] == [m.uid]
    assert all_events(queue.r, m.uid)[-1].reason == "MaxRetriesExceeded"


def test_heartbeat_keeps_a_live_workers_job(queue: JobQueue) -> None:
    m = message()
    queue.enqueue(m)
    d = queue.take(Q, "alive", block_ms=0)[0]
    for _ in range(4):  # over 2x the visibility timeout, the holder keeps beating
        queue.heartbeat(d, "alive")
        assert queue.reclaim(Q, "thief") == []
        time.sleep(0.2)  # nothing to await: the point is to let the entry age past half the visibility timeout
    assert queue.stats(Q).in_flight == 1


def test_malformed_entry_is_dead_lettered_not_redelivered(queue: JobQueue) -> None:
    queue.ensure_queue(Q)
    queue.r.xadd(keys.stream(Q, "normal"), {keys.MESSAGE_FIELD: '{"uid": ""}'})
    assert queue.take(Q, "w", block_ms=0) == []
    assert queue.stats(Q).in_flight == 0
    assert queue.r.xlen(keys.DEAD_LETTER_STREAM) == 1


@pytest.mark.slow
def test_sigkilled_worker_job_is_redelivered_and_succeeds_once(
    redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    """A real worker process (tiny Z-Image model) is SIGKILLed mid-job; a second one finishes it, once."""
    q = JobQueue.from_url(redis_url)
    m = message(steps=40, width=64, height=64, num_images=1)
    q.enqueue(m)
    images = tmp_path / "images"
    fast_reclaim = {"ZIMAGE_VISIBILITY_MS": "1000", "ZIMAGE_HEARTBEAT_SECONDS": "0.2"}
    a = start_worker(processes, redis_url, Q, images, ZIMAGE_WORKER_NAME="victim", **fast_reclaim)
    wait_for(
        lambda: any(e.type == "progress" and e.worker == "victim" for e in all_events(q.r, m.uid)),
        timeout=120,
        what="the victim to start denoising",
    )
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert q.result(m.uid) is None
    start_worker(processes, redis_url, Q, images, ZIMAGE_WORKER_NAME="rescuer", **fast_reclaim)
    wait_for(lambda: q.result(m.uid), timeout=180, what="the rescuer to finish the job")
    evs = all_events(q.r, m.uid)
    succeeded = [e for e in evs if e.type == "succeeded"]
    assert len(succeeded) == 1 and succeeded[0].worker == "rescuer" and succeeded[0].attempt == 2
    assert len(q.result(m.uid) or []) == 1
    assert len(list(images.rglob("*.png"))) == 1
    assert q.dead_letters() == []
    assert q.stats(Q).in_flight == 0


def test_events_left_by_a_dead_reader_are_read_by_the_next(queue: JobQueue) -> None:
    ev = JobEvent(type="succeeded", uid="u", namespace="ns", name="fox")
    queue.publish(ev)
    [(entry_id, got)] = queue.read_events("operator-pod-a", block_ms=0)
    assert got.uid == "u"  # pod a dies before acking
    assert queue.read_events("operator-pod-b", block_ms=0) == []  # not yet: a may only be slow
    again = wait_for(lambda: queue.read_events("operator-pod-b", block_ms=0), what="reclaimed events")
    assert [(i, e.uid) for i, e in again] == [(entry_id, "u")]
    queue.ack_events([entry_id])
    assert queue.read_events("operator-pod-b", block_ms=0) == []


def test_workers_report_busy_and_idle(queue: JobQueue, tmp_path: Path) -> None:
    seen: list[dict[str, bool]] = []

    class Spy(NoopEngine):
        def generate(self, params: GenerationParams, **kw: Any) -> Any:
            seen.append(queue.workers(Q))
            return super().generate(params, **kw)

    queue.enqueue(message())
    w = make_worker(queue, tmp_path, Spy(), name="w-busy")
    w.run(max_jobs=1, block_ms=0)
    assert seen == [{"w-busy": True}]
    assert queue.workers(Q) == {}  # said goodbye on exit
    queue.worker_heartbeat(Q, "idle-one", busy=False)
    queue.r.hset(keys.workers(Q), "dead-one", "busy 1.0")
    assert queue.workers(Q) == {"idle-one": False}


def test_reroute_moves_waiting_jobs_to_the_fallback_keeping_priority(queue: JobQueue, tmp_path: Path) -> None:
    urgent, normal = message(), message()
    queue.enqueue(urgent, "high")
    queue.enqueue(normal)
    assert queue.reroute(Q, "ns/backup", "backup") == 2
    assert queue.stats(Q) == type(queue.stats(Q))(queued=0, in_flight=0)
    assert queue.stats("ns/backup").queued == 2
    got = queue.take("ns/backup", "w", block_ms=0)[0]
    assert got.message.uid == urgent.uid and got.message.queue == "ns/backup" and got.stream.endswith(":high")
    assert [e.type for e in all_events(queue.r, normal.uid)] == ["rerouted"]
    # and it runs there like any job
    w = Worker(queue, NoopEngine(), LocalStore(tmp_path), "ns/backup", "w2", heartbeat_seconds=0.1)
    w.run(max_jobs=1, block_ms=0)
    assert queue.result(normal.uid) is not None
