"""Safe to leave running, at the queue level (real redis-server): poison and future input, rolling upgrades both
ways, bounded streams and records, and final outcomes that outlive the events stream."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import REPO, entries_added, wait_for
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, keys
from zimage_worker.engine import NoopEngine
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore

Q = "ns/model"
PREVIOUS = json.loads((REPO / "tests" / "fixtures" / "wire" / "release-0.1.0.json").read_text())


def message(**params: Any) -> JobMessage:
    uid = str(uuid.uuid4())
    p = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 7, **params}
    return JobMessage(
        uid=uid, namespace="ns", name=f"job-{uid[:6]}", queue=Q, params=GenerationParams.model_validate(p)
    )


@pytest.fixture
def worker(queue: JobQueue, redis_url: str, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(JobQueue.from_url(redis_url, visibility_ms=500), NoopEngine(), LocalStore(tmp_path), Q, "w1")
    t = threading.Thread(target=w.run, kwargs={"block_ms": 100}, daemon=True)
    t.start()
    yield w
    w.request_stop()
    t.join(10)


def _with_unknown_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """What a newer release might write: extra fields at the top level and nested."""
    out = copy.deepcopy(doc)
    out["fieldFromTheFuture"] = {"nested": [1, 2]}
    if "params" in out:
        out["params"]["loraAdapters"] = [{"name": "ink", "scale": 0.7}]
    for r in out.get("results") or []:
        r["thumbnailUri"] = "s3://b/t.png"
    return out


# -- rolling upgrade, both ways --------------------------------------------------------------------------
def test_current_code_reads_the_previous_and_the_next_release() -> None:
    old_msg = PREVIOUS["job_message"]
    for doc in (old_msg, _with_unknown_fields(old_msg)):
        m = JobMessage.model_validate_json(json.dumps(doc))
        assert (m.uid, m.params.seed, m.params.num_images, m.timeout_seconds) == (old_msg["uid"], 42, 2, 600)
    for old_ev in PREVIOUS["events"]:
        for doc in (old_ev, _with_unknown_fields(old_ev)):
            ev = JobEvent.model_validate_json(json.dumps(doc))
            assert ev.wire() == {k: v for k, v in old_ev.items() if v is not None}


def test_what_current_code_writes_the_previous_release_reads(queue: JobQueue, worker: Worker) -> None:
    """The previous release forbids unknown fields: every message and event shape we write must fit its schema."""
    old_message, old_event = PREVIOUS["schemas"]["JobMessage"], PREVIOUS["schemas"]["JobEvent"]
    m = message(num_images=2)
    jsonschema.validate(json.loads(m.model_dump_json(by_alias=True)), old_message)
    queue.enqueue(m)
    wait_for(lambda: queue.state(m.uid) == "succeeded", 30, what="the job")
    written = [json.loads(f[b"event"]) for _, f in queue.r.xrange(keys.EVENTS_STREAM)]
    assert {e["type"] for e in written} >= {"started", "succeeded"}
    for doc in written:
        jsonschema.validate(doc, old_event)


def test_a_previous_release_message_runs_on_the_current_worker(queue: JobQueue, worker: Worker) -> None:
    doc = {**PREVIOUS["job_message"], "uid": str(uuid.uuid4()), "queue": Q, "namespace": "ns"}
    doc["params"] = {**doc["params"], "width": 64, "height": 64}
    queue.ensure_queue(Q)
    queue.r.xadd(keys.stream(Q, "normal"), {keys.MESSAGE_FIELD: json.dumps(_with_unknown_fields(doc))})
    wait_for(lambda: queue.state(doc["uid"]) == "succeeded", 30, what="the old-shaped job")
    assert len(queue.result(doc["uid"]) or []) == 2


# -- poison ----------------------------------------------------------------------------------------------
def test_poison_job_entries_are_dead_lettered_and_the_others_run(queue: JobQueue, worker: Worker) -> None:
    queue.ensure_queue(Q)
    stream = keys.stream(Q, "normal")
    bad_ident = {"uid": "poison-uid", "namespace": "ns", "name": "broken", "params": {"prompt": ""}}
    for fields in (
        {keys.MESSAGE_FIELD: "{not json"},
        {"unrelated": "x"},
        {keys.MESSAGE_FIELD: json.dumps(bad_ident)},
        {keys.MESSAGE_FIELD: "\xff\xfe binary"},
    ):
        queue.r.xadd(stream, fields)
    good = [message() for _ in range(5)]
    for m in good:
        queue.enqueue(m)
    wait_for(lambda: all(queue.state(m.uid) == "succeeded" for m in good), 30, what="the good jobs")
    poisoned = queue.poisoned()
    assert len(poisoned) == 4 and all(p.source == stream and p.error for p in poisoned)
    # The one that still says whose it is fails its job, with the reason, instead of leaving it Queued.
    final = queue.finals(["poison-uid"])["poison-uid"]
    assert final.event.type == "failed" and final.event.reason == "InvalidMessage"
    wait_for(lambda: queue.stats(Q).in_flight == 0 and queue.r.xlen(stream) == 0, 10, what="nothing left")


def test_poison_events_never_stall_the_reader(queue: JobQueue) -> None:
    queue.r.xadd(keys.EVENTS_STREAM, {keys.EVENT_FIELD: "garbage"})
    queue.r.xadd(keys.EVENTS_STREAM, {"no-event-field": "1"})
    queue.r.xadd(keys.EVENTS_STREAM, {keys.EVENT_FIELD: json.dumps({"type": "exploded", "uid": "u"})})
    future = _with_unknown_fields({"type": "started", "uid": "u1", "namespace": "ns", "name": "a"})
    queue.r.xadd(keys.EVENTS_STREAM, {keys.EVENT_FIELD: json.dumps(future)})
    queue.publish(JobEvent(type="succeeded", uid="u2", namespace="ns", name="b"))
    got = queue.read_events("op", block_ms=0)
    assert [e.uid for _, e in got] == ["u1", "u2"]
    queue.ack_events([i for i, _ in got])
    assert queue.read_events("op", block_ms=0) == []  # nothing pending: the bad three were acked
    assert len(queue.poisoned()) == 3


# -- bounded state ---------------------------------------------------------------------------------------
def test_acked_entries_leave_the_job_streams_and_records_expire(queue: JobQueue, worker: Worker) -> None:
    queue.result_ttl_seconds = worker.queue.result_ttl_seconds = 60
    jobs = [message() for _ in range(20)]
    for m in jobs:
        queue.enqueue(m)
    wait_for(lambda: all(queue.state(m.uid) == "succeeded" for m in jobs), 30, what="the jobs")
    streams = keys.streams(Q)
    assert entries_added(queue.r, streams) == 20
    wait_for(lambda: sum(queue.r.xlen(s) for s in streams) == 0, 5, what="acked entries deleted")
    assert queue.stats(Q) == queue.stats(Q).__class__(queued=0, in_flight=0)  # XDEL kept the lag valid
    assert all(0 < queue.r.ttl(keys.job(m.uid)) <= 60 * 60 * 24 * 7 for m in jobs)
    cancelled = message()
    queue.cancel(cancelled.uid)  # a job deleted before it ran: its record expires too
    assert 0 < queue.r.ttl(keys.job(cancelled.uid)) <= queue.result_ttl_seconds


def test_events_are_trimmed_by_age_but_never_before_every_group_acked(queue: JobQueue) -> None:
    for i in range(10):
        queue.publish(JobEvent(type="started", uid=f"u{i}", namespace="ns", name="a"))
    first = queue.read_events("op", count=4, block_ms=0)
    later = time.time() + 1  # ids are milliseconds: the ten may share one
    assert queue.trim_events(retention_seconds=0, now=later) == 0  # four delivered, none acked
    queue.ack_events([i for i, _ in first])
    assert queue.trim_events(retention_seconds=0, now=later) == 4  # read and acked: past a zero retention
    assert queue.trim_events(retention_seconds=3600, now=time.time()) == 0  # young entries stay
    assert queue.r.xlen(keys.EVENTS_STREAM) == 6
    rest = queue.read_events("op", block_ms=0)
    queue.ack_events([i for i, _ in rest])
    assert queue.trim_events(retention_seconds=0, now=later) == 6 and queue.r.xlen(keys.EVENTS_STREAM) == 0


def test_trim_queue_drops_what_an_older_release_acked_but_kept(queue: JobQueue) -> None:
    queue.ensure_queue(Q)
    for m in [message() for _ in range(6)]:
        queue.enqueue(m)
    stream = keys.stream(Q, "normal")
    taken = queue.take(Q, "old-worker", count=4, block_ms=0)
    queue.r.xack(stream, keys.WORKER_GROUP, *[d.entry_id for d in taken[:3]])  # the old way: XACK only
    assert queue.trim_queue(Q) == 3  # the fourth is still in flight, the last two still queued
    assert queue.r.xlen(stream) == 3 and queue.stats(Q).in_flight == 1 and queue.stats(Q).queued == 2


# -- outcomes outlive the events stream ------------------------------------------------------------------
def test_final_outcomes_are_kept_with_the_job(queue: JobQueue, worker: Worker) -> None:
    ok, cancelled = message(), message()
    queue.cancel(cancelled.uid)
    queue.enqueue(ok)
    queue.enqueue(cancelled)
    wait_for(lambda: len(queue.finals([ok.uid, cancelled.uid])) == 2, 30, what="both outcomes")
    queue.r.xtrim(keys.EVENTS_STREAM, maxlen=0)
    finals = queue.finals([ok.uid, cancelled.uid, "unknown"])
    assert finals[ok.uid].event.type == "succeeded" and len(finals[ok.uid].results or []) == 1
    assert finals[cancelled.uid].event.type == "cancelled"
    assert "unknown" not in finals


def test_a_settling_script_run_twice_changes_nothing(queue: JobQueue) -> None:
    """redis-py retries a command whose reply was lost: fail() must not requeue a job twice."""
    m = message()
    queue.enqueue(m)
    [d] = queue.take(Q, "w", block_ms=0)
    queue.begin(d, "w")
    ev = JobEvent(type="failed", uid=m.uid, namespace="ns", name=m.name, reason="WorkerError", message="x")
    assert queue.fail(d, ev, retry=True) == "retrying"
    assert queue.fail(d, ev, retry=True) == "stale"
    assert entries_added(queue.r, keys.streams(Q)) == 2  # the job and one requeue, not two
