"""A failover cuts blocked reads short (Redis answers ``UNBLOCKED``): readers see nothing arrived, not a crash.

A real pair of servers: the one the readers block on is made a replica of the other (what Sentinel and Redis
Cluster do to a demoted master), which is when Redis unblocks every blocked client with that error. A worker
died of it in the cluster failover test; the worker's and the operator's blocking reads must ride it out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from conftest import wait_for
from zimage_queue import JobQueue
from zimage_queue.server import RedisServer


@pytest.fixture
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as a, RedisServer() as b:
        yield a, b


def blocked_readers(r: redis.Redis) -> int:
    return sum(1 for c in r.client_list() if "b" in c["flags"] and c["cmd"] == "xreadgroup")


def read_through_demotion(servers: tuple[RedisServer, RedisServer], read: Callable[[JobQueue], Any]) -> Any:
    a, b = servers
    queue = JobQueue.from_url(a.url)
    queue.ensure_queue("ns/m")
    queue.read_events("setup", block_ms=0)  # creates the operator's group, so only the read below blocks
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["got"] = read(queue)
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    admin = redis.Redis.from_url(a.url)
    started = time.monotonic()
    thread.start()
    wait_for(lambda: blocked_readers(admin) == 1, what="the read to block")
    admin.replicaof("127.0.0.1", str(b.port))
    thread.join(20)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    assert time.monotonic() - started < 20  # cut short, not run out
    return out["got"]


def test_a_workers_blocking_take_sees_no_jobs(servers: tuple[RedisServer, RedisServer]) -> None:
    got = read_through_demotion(servers, lambda q: q.take("ns/m", "w-0", block_ms=30_000))
    assert got == []


def test_the_operators_blocking_event_read_sees_no_events(servers: tuple[RedisServer, RedisServer]) -> None:
    got = read_through_demotion(servers, lambda q: q.read_events("op-0", block_ms=30_000))
    assert got == []
