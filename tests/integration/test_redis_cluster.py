"""The queue on a real Redis Cluster: three masters and three replicas of Debian's redis-server on loopback.

Every key of one queue hashes to one slot, every script runs there (a key outside KEYS, or on another slot,
fails with CROSSSLOT on a cluster), and real worker processes keep every accepted job through a manual
failover and a SIGKILLed master: each job has exactly one result and one ``succeeded`` event.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from conftest import Processes, start_worker, wait_for
from zimage_api.limits import ConcurrencyQuota, RateLimiter
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, ResultImage, keys
from zimage_queue.clients import parse
from zimage_queue.cluster import LocalCluster

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli (Debian redis-tools) missing")

A, B = "ns/alpha", "ns/beta"


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def master_port(r: Any, key: str) -> int:
    return int(r.get_node_from_key(key).port)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        yield c


@pytest.fixture
def q(cluster: LocalCluster) -> Iterator[JobQueue]:
    cluster.wait_healthy()
    queue = JobQueue.from_url(cluster.url, visibility_ms=500)
    queue.r.flushall(target_nodes=queue.r.PRIMARIES)
    yield queue
    queue.r.close()


def msg(queue: str = A, **params: Any) -> JobMessage:
    p = GenerationParams(prompt="a red fox", width=64, height=64, steps=1, seed=1, **params)
    return JobMessage(uid=str(uuid.uuid4()), namespace="ns", name=f"fox-{uuid.uuid4().hex[:6]}", queue=queue, params=p)


def event(m: JobMessage, type_: str = "succeeded") -> JobEvent:
    return JobEvent(type=type_, uid=m.uid, namespace=m.namespace, name=m.name, worker="w")  # type: ignore[arg-type]


def test_url_kinds() -> None:
    assert parse("redis://127.0.0.1:6379/0").kind == "single"
    c = parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/?wait_replicas=2")
    assert (c.kind, c.nodes, c.wait_replicas) == ("cluster", (("10.0.0.1", 7000), ("10.0.0.2", 7001)), 2)
    assert parse("redis://h:7000/?cluster=true").kind == "cluster"
    s = parse("redis+sentinel://:pw@s1:26379,s2/mymaster/2")
    assert (s.kind, s.nodes, s.service, s.db, s.password) == (
        "sentinel",
        (("s1", 26379), ("s2", 26379)),
        "mymaster",
        2,
        "pw",
    )
    assert parse("redis://h/0?wait_replicas=1").url == "redis://h/0"
    for bad in ("http://h", "redis+sentinel://h:1/", "redis+cluster://h:1/3", "redis+cluster://h:1/?db=2"):
        with pytest.raises(ValueError):
            parse(bad)


def test_a_queue_lives_on_one_slot_and_queues_spread() -> None:
    k = keys.TAGGED
    uid = str(uuid.uuid4())
    one_queue = [*k.streams(A), k.job(A, uid), k.events(A), k.dead_letter(A), k.workers(A)]
    assert len({slot(x) for x in one_queue}) == 1
    assert slot(k.stream(A, "normal")) != slot(k.stream(B, "normal"))
    assert k.queue_of(k.stream(A, "high")) == A
    # A single server keeps the names a worker of the previous release uses.
    assert keys.FLAT.stream(A, "normal") == "zimage:q:ns/alpha:normal" and keys.FLAT.job(A, uid) == keys.job(uid)


def test_contract_on_the_cluster(q: JobQueue) -> None:
    assert q.cluster and q.wait_replicas == 1
    assert master_port(q.r, keys.TAGGED.stream(A, "normal")) != master_port(q.r, keys.TAGGED.stream(B, "normal"))
    m = msg()
    first, again = q.enqueue(m), q.enqueue(m)
    assert first.created and not again.created and again.entry_id == first.entry_id
    assert q.stats(A).queued == 1
    [d] = q.take(A, "w1", block_ms=0)
    assert d.message.uid == m.uid and q.begin(d, "w1") == "run" and q.state(m.uid) == "running"
    q.publish(event(m, "started"), queue=A)
    result = [ResultImage(uri="file:///x.png", seed=1, width=64, height=64, sha256="0" * 64, bytes=1)]
    assert q.complete(d, result, event(m)) and not q.complete(d, result, event(m))
    assert q.result(m.uid) == result and q.state(m.uid) == "succeeded"
    assert set(q.finals([m.uid, "nope"])) == {m.uid}
    assert q.stats(A).queued == 0 and q.stats(A).in_flight == 0

    # Failure to the dead-letter stream of its own queue; cancel by uid alone.
    f, c = msg(B), msg(B)
    q.enqueue(f)
    q.enqueue(c)
    q.cancel(c.uid)
    got = {d.message.uid: d for d in q.take(B, "w2", count=2, block_ms=0)}
    assert q.begin(got[f.uid], "w2") == "run" and q.fail(got[f.uid], event(f, "failed"), retry=False) == "failed"
    assert q.begin(got[c.uid], "w2") == "cancelled" and q.cancelled(got[c.uid], event(c))
    assert [j.uid for j, _ in q.dead_letters()] == [f.uid]
    assert q.state(c.uid) == "cancelled" and q.is_cancelled(c.uid)

    # A poison entry: dead-lettered on its queue's slot, its job failed.
    poison_stream = keys.TAGGED.stream(A, "low")
    q.r.xadd(poison_stream, {keys.MESSAGE_FIELD: '{"uid": "p1", "namespace": "ns", "name": "bad"}'})
    assert q.take(A, "w1", block_ms=0) == []
    assert [p.entry_id for p in q.poisoned()] and q.state("p1") == "failed"

    # Events of both queues reach one reader; acks and a dead-lettered event find their streams.
    batch = q.read_events("op", block_ms=0)
    types = Counter(ev.type for _, ev in batch)
    assert types["succeeded"] == 1 and types["failed"] == 2 and types["cancelled"] == 1 and types["started"] == 1
    q.dead_letter_event(batch[0][0], batch[0][1], "refused")
    q.ack_events([entry for entry, _ in batch])
    assert q.read_events("op", block_ms=0) == []
    assert q.trim_events(0) == len(batch)

    q.worker_heartbeat(A, "w1", busy=True)
    assert q.workers(A) == {"w1": True}


def test_reroute_moves_a_job_across_slots(q: JobQueue) -> None:
    src, dst = keys.TAGGED.job(A, "x"), keys.TAGGED.job(B, "x")
    assert slot(src) != slot(dst)
    m = msg(A)
    q.enqueue(m)
    assert q.reroute(A, B, "beta") == 1
    assert q.stats(A).queued == 0 and q.stats(B).queued == 1
    assert not q.enqueue(m).created  # its index names the fallback queue now: never enqueued twice
    [d] = q.take(B, "w", block_ms=0)
    assert q.begin(d, "w") == "run" and q.complete(d, [], event(m))
    assert q.state(m.uid) == "succeeded" and set(q.finals([m.uid])) == {m.uid}
    assert [ev.type for _, ev in q.read_events("op", block_ms=0)] == ["rerouted", "succeeded"]


def test_a_reroute_stopped_half_way_is_finished_not_run_twice(q: JobQueue) -> None:
    m = msg(A)
    q.enqueue(m)
    [d] = q.take(A, "fallback-router", block_ms=0)
    q._move_out(keys=[keys.TAGGED.job(A, m.uid)], args=[B])  # the operator died here
    time.sleep(0.6)  # the entry's idle time passes the 0.5 s visibility
    [again] = q.reclaim(A, "w1")
    assert again.message.uid == m.uid and q.begin(again, "w1") == "done"  # it finished the move instead
    q.ack(again)
    assert q.stats(A).queued == 0 and q.stats(A).in_flight == 0 and q.stats(B).queued == 1
    [moved] = q.take(B, "w2", block_ms=0)
    assert q.begin(moved, "w2") == "run" and moved.message.queue == B
    del d


def test_api_limits_on_the_cluster(q: JobQueue) -> None:
    quota, limiter = ConcurrencyQuota(q.r, q), RateLimiter(q.r)
    assert limiter.hit("key-1", 1.0, 1).allowed and not limiter.hit("key-1", 1.0, 1).allowed
    s1 = quota.reserve("t", 2)
    assert s1 is not None
    m = msg(A)
    q.enqueue(m)
    quota.commit(s1, m.uid)
    assert quota.reserve("t", 2) is not None and quota.reserve("t", 2) is None  # m + one reservation
    [d] = q.take(A, "w", block_ms=0)
    q.begin(d, "w")
    q.complete(d, [], event(m))
    assert quota.reserve("t", 2) is not None  # the finished job left the set


def _enqueue_until_accepted(q: JobQueue, m: JobMessage, deadline: float) -> bool:
    """What a client does: retry (enqueue is idempotent) until the call returns. Accepted = it returned."""
    while time.monotonic() < deadline:
        try:
            q.enqueue(m)
            return True
        except (redis.RedisError, OSError):
            time.sleep(0.2)
    return False


def _count_events(r: Any) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for queue in (A, B):
        for _id, fields in r.xrange(keys.TAGGED.events(queue)):
            ev = JobEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()])
            out[(ev.uid, ev.type)] += 1
    return out


@pytest.mark.parametrize("after_kill", [40, pytest.param(1000, marks=pytest.mark.slow)])
def test_failover_mid_load_loses_and_duplicates_nothing(
    cluster: LocalCluster, tmp_path: Path, processes: Processes, after_kill: int
) -> None:
    """Jobs flow through real workers on two queues (on two masters) while one master hands over to its replica
    (CLUSTER FAILOVER) and then another is SIGKILLed: every accepted job ends with exactly one result and one
    succeeded event, none lost."""
    cluster.wait_healthy()
    q = JobQueue.from_url(cluster.url)
    q.r.flushall(target_nodes=q.r.PRIMARIES)
    for queue in (A, B):
        q.ensure_queue(queue)
        for i in range(2):
            start_worker(
                processes,
                cluster.url,
                queue,
                tmp_path / "images",
                ZIMAGE_MODEL_SOURCE="noop",
                ZIMAGE_WORKER_NAME=f"{queue.split('/')[1]}-{i}",
                ZIMAGE_VISIBILITY_MS="3000",
            )
    accepted: list[JobMessage] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            m = msg(A if n % 2 else B)
            n += 1
            if _enqueue_until_accepted(q, m, time.monotonic() + 30):
                accepted.append(m)
            time.sleep(0.01)

    def done() -> int:
        return sum(1 for final in q.finals([m.uid for m in accepted]).values() if final.event.type == "succeeded")

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        wait_for(lambda: done() >= 20, timeout=120, what="the workers to finish their first jobs")
        # 1. A manual failover of queue A's master: the replica takes over without losing a write.
        a_master = cluster.master_of(keys.TAGGED.stream(A, "normal"))
        cluster.failover(cluster.replica_of(a_master))
        wait_for(lambda: done() >= len(accepted) - 20 and len(accepted) > 60, timeout=60, what="jobs after failover")
        # 2. SIGKILL of queue B's master, mid-load: its replica is elected after the node timeout (2 s).
        b_master = cluster.master_of(keys.TAGGED.stream(B, "normal"))
        cluster.kill(b_master)
        n_at_kill = len(accepted)
        cluster.wait_healthy(timeout=30, replicated=False)
        # Back as a replica of the node that took over, so B's writes are confirmed on a replica again.
        cluster.restart(b_master)
        cluster.wait_healthy(timeout=30)
        wait_for(lambda: len(accepted) > n_at_kill + after_kill, timeout=600, what="jobs accepted after the kill")
    finally:
        stop.set()
        producer.join(40)
    wait_for(lambda: done() == len(accepted), timeout=90, what=f"all {len(accepted)} accepted jobs to finish")

    uids = [m.uid for m in accepted]
    print(f"accepted {len(uids)} jobs, {n_at_kill} before the SIGKILL")
    assert len(set(uids)) == len(uids) > 100
    finals = q.finals(uids)
    assert all(finals[u].event.type == "succeeded" and finals[u].results is not None for u in uids)
    events = _count_events(q.r)
    succeeded = [events[(u, "succeeded")] for u in uids]
    assert succeeded.count(1) == len(uids), Counter(succeeded)  # not 0 (lost), not 2 (duplicated)
    for queue in (A, B):
        assert q.stats(queue).queued == 0 and q.stats(queue).in_flight == 0
