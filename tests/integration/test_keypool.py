"""The API key pool against a real redis-server: no key's limit is ever exceeded, by many tasks or by several
processes at once; rate limits, failures and dead holders take a key out for as long as they should; every
key gets used; a pool whose keys changed just works; a pool lives on one slot of a real Redis Cluster."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.cluster import key_slot

from bench.provider import max_in_window
from zimage_queue import keys
from zimage_queue.clients import connect_async
from zimage_queue.keypool import CONCURRENCY_POLL_SECONDS, Grant, KeyLimits, KeyPool, PoolKey

T = TypeVar("T")
POOL = "ns/remote"
US = 1_000_000


def run(redis_url: str, body: Callable[[Any], Awaitable[T]]) -> T:
    """``body(client)`` in a fresh event loop with an async client of its own."""

    async def main() -> T:
        r = connect_async(redis_url)
        try:
            return await body(r)
        finally:
            await r.aclose()

    return asyncio.run(main())


def us(grant: Grant) -> int:
    return round(grant.granted_at * US)


def assert_within_limits(grants: list[tuple[str, int]], limits: dict[str, KeyLimits]) -> None:
    """Per key at most ``requests`` grants in any closed window of ``per_seconds``, and the pool at most their sum."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for key_id, t in grants:
        by_key[key_id].append(t)
    for key_id, times in by_key.items():
        lim = limits[key_id]
        assert lim.requests is not None
        peak = max_in_window(times, round(lim.per_seconds * US))
        assert peak <= lim.requests, f"key {key_id}: {peak} grants in one window, limit {lim.requests}"
    window = round(max(lim.per_seconds for lim in limits.values()) * US)
    total = sum(lim.requests or 0 for lim in limits.values())
    assert max_in_window([t for _, t in grants], window) <= total


LIMITS = {
    "a": KeyLimits(requests=5, per_seconds=1.0),
    "b": KeyLimits(requests=3, per_seconds=1.0),
    "c": KeyLimits(requests=4, per_seconds=1.0),
}


def test_many_tasks_never_exceed_a_key_and_use_every_key(redis_url: str) -> None:
    async def body(r: Any) -> list[tuple[str, int]]:
        pool = KeyPool(r, POOL, [PoolKey(k, lim) for k, lim in LIMITS.items()])
        grants: list[tuple[str, int]] = []
        end = time.monotonic() + 2.5

        async def worker() -> None:
            while time.monotonic() < end:
                try:
                    g = await pool.acquire(timeout=max(0.01, end - time.monotonic()))
                except TimeoutError:
                    return
                grants.append((g.key_id, us(g)))
                await asyncio.sleep(random.uniform(0, 0.01))
                await pool.release(g, "ok")

        await asyncio.gather(*(worker() for _ in range(40)))
        return grants

    grants = run(redis_url, body)
    assert_within_limits(grants, LIMITS)
    per_key = Counter(k for k, _ in grants)
    # 2.5 s of 1 s windows: each key fills at least two of them.
    for key_id, lim in LIMITS.items():
        assert lim.requests is not None
        assert per_key[key_id] >= 2 * lim.requests, per_key


WORKER = """
import asyncio, json, sys, time
from pathlib import Path
from zimage_queue.clients import connect_async
from zimage_queue.keypool import KeyLimits, KeyPool, PoolKey

url, pool_name, go, seconds, limits = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
keys = [PoolKey(k, KeyLimits(**v)) for k, v in json.loads(limits).items()]

async def main():
    r = connect_async(url)
    pool = KeyPool(r, pool_name, keys)
    grants = []
    await r.ping()
    print("ready", flush=True)
    while not go.exists():
        await asyncio.sleep(0.002)
    # All three start together, at the instant the go file names (seeing the file first must not win the first
    # window: that decides how the window is shared, not the pool).
    await asyncio.sleep(max(0.0, float(go.read_text()) - time.time()))
    end = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < end:
            try:
                g = await pool.acquire(timeout=max(0.01, end - time.monotonic()))
            except TimeoutError:
                return
            grants.append([g.key_id, round(g.granted_at * 1_000_000)])
            await asyncio.sleep(0.002)
            await pool.release(g, "ok")

    await asyncio.gather(*(worker() for _ in range(8)))
    await r.aclose()
    print(json.dumps(grants))

asyncio.run(main())
"""


def test_three_processes_never_exceed_a_key(redis_url: str, tmp_path: Path) -> None:
    spec = json.dumps({k: {"requests": v.requests, "per_seconds": v.per_seconds} for k, v in LIMITS.items()})
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, POOL, str(go), "2.5", spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=30)
    (tmp_path / "go.new").write_text(str(time.time() + 0.2))
    (tmp_path / "go.new").replace(go)  # whole when it appears
    grants: list[tuple[str, int]] = []
    per_process = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        got = [(k, int(t)) for k, t in json.loads(out)]
        per_process.append(len(got))
        grants += got
    assert_within_limits(grants, LIMITS)
    # Every process got grants: they really competed (each window is shared, not swept by the first to wake).
    assert all(n > 0 for n in per_process), f"grants per process: {per_process}"
    per_key = Counter(k for k, _ in grants)
    for key_id, lim in LIMITS.items():
        assert lim.requests is not None
        assert per_key[key_id] >= 2 * lim.requests, per_key


def test_concurrency_limit(redis_url: str) -> None:
    limits = {"a": KeyLimits(concurrency=2), "b": KeyLimits(concurrency=1)}

    async def body(r: Any) -> tuple[dict[str, int], int]:
        pool = KeyPool(r, POOL, [PoolKey(k, lim) for k, lim in limits.items()])
        now: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        seen_in_flight = 0

        async def worker() -> None:
            nonlocal seen_in_flight
            for _ in range(4):
                g = await pool.acquire(timeout=10)
                now[g.key_id] += 1
                peak[g.key_id] = max(peak[g.key_id], now[g.key_id])
                seen_in_flight = max(seen_in_flight, sum(s.in_flight for s in await pool.status()))
                await asyncio.sleep(0.03)
                now[g.key_id] -= 1
                await pool.release(g, "ok")

        await asyncio.gather(*(worker() for _ in range(12)))
        return dict(peak), seen_in_flight

    peak, seen = run(redis_url, body)
    assert peak == {"a": 2, "b": 1}  # never above, and both filled
    assert seen <= 3


def test_a_full_key_waits_and_a_release_here_wakes_the_waiter(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits(concurrency=1))])
        g = await pool.try_acquire()
        assert isinstance(g, Grant)
        wait = await pool.try_acquire()
        assert isinstance(wait, float) and 0 < wait <= CONCURRENCY_POLL_SECONDS
        with pytest.raises(TimeoutError):
            await pool.acquire(timeout=0.3)

        async def later() -> None:
            await asyncio.sleep(0.2)
            await pool.release(g, "ok")

        t0 = time.monotonic()
        task = asyncio.create_task(later())
        g2 = await pool.acquire(timeout=5)
        took = time.monotonic() - t0
        await task
        assert g2.key_id == "a" and g2.lease != g.lease
        assert 0.19 <= took < 0.2 + CONCURRENCY_POLL_SECONDS, took

    run(redis_url, body)


def test_tokens_limit(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits(tokens=100, per_seconds=1.0))])
        g1 = await pool.try_acquire(40)
        g2 = await pool.try_acquire(40)
        assert isinstance(g1, Grant) and isinstance(g2, Grant)
        wait = await pool.try_acquire(40)
        assert isinstance(wait, float) and 0.5 < wait <= 1.0  # until g1 leaves the window
        await pool.release(g1, "ok", tokens_used=10)  # the estimate was high: 10 + 40 counted now
        g3 = await pool.try_acquire(40)
        assert isinstance(g3, Grant)
        assert isinstance(await pool.try_acquire(20), float)  # 90 counted, 10 left
        assert isinstance(await pool.try_acquire(0), Grant)  # a request needs one token of room
        [s] = await pool.status()
        assert s.used_tokens == 90 and s.used_requests == 4
        with pytest.raises(ValueError, match="101 tokens"):
            await pool.try_acquire(101)  # no key could ever take it
        await asyncio.sleep(1.05)  # the window has moved past all of them
        assert isinstance(await pool.try_acquire(100), Grant)

    run(redis_url, body)


def test_rate_limited_blocks_the_key_for_retry_after(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits()), PoolKey("b", KeyLimits())])
        while True:
            g = await pool.acquire(timeout=5)
            if g.key_id == "a":
                break
            await pool.release(g, "ok")
        await pool.release(g, "rate_limited", retry_after=0.6)
        t0 = time.time()
        status = {s.id: s for s in await pool.status()}
        a = status["a"]
        assert a.reason == "rate_limited" and a.benched_until is not None
        assert t0 + 0.3 < a.benched_until < t0 + 0.7
        assert a.used_requests == 1  # a 429'd request stays counted
        assert a.consecutive_failures == 0
        for _ in range(10):  # meanwhile every request goes to b
            g = await pool.acquire(timeout=5)
            assert g.key_id == "b"
            await pool.release(g, "ok")
        await asyncio.sleep(max(0.0, a.benched_until - time.time()) + 0.05)
        used: Counter[str] = Counter()
        for _ in range(4):
            g = await pool.acquire(timeout=5)
            used[g.key_id] += 1
            await pool.release(g, "ok")
        assert used["a"] >= 1  # back in use (and the least used of the two)

    run(redis_url, body)


def test_failures_bench_a_key_and_it_comes_back(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits())], bench_after_failures=2, bench_seconds=0.5)

        async def once(outcome: Any) -> None:
            g = await pool.try_acquire()
            assert isinstance(g, Grant)
            await pool.release(g, outcome)

        await once("failed")
        await once("ok")  # an ok resets the count
        await once("failed")
        [s] = await pool.status()
        assert s.consecutive_failures == 1 and s.benched_until is None
        await once("failed")
        [s] = await pool.status()
        assert s.consecutive_failures == 2 and s.reason == "failing" and s.benched_until is not None
        wait = await pool.try_acquire()
        assert isinstance(wait, float) and 0.3 < wait <= 0.5
        await asyncio.sleep(wait + 0.02)
        # Back, half-open: one probe at a time; it fails, and the key is benched again at once.
        probe = await pool.try_acquire()
        assert isinstance(probe, Grant)
        assert isinstance(await pool.try_acquire(), float)
        await pool.release(probe, "failed")
        [s] = await pool.status()
        assert s.consecutive_failures == 3 and s.reason == "failing"
        probe = await pool.acquire(timeout=2)
        await pool.release(probe, "ok")
        [s] = await pool.status()
        assert s.consecutive_failures == 0 and s.benched_until is None
        both = [await pool.try_acquire(), await pool.try_acquire()]  # closed again: no limit on the key
        assert all(isinstance(g, Grant) for g in both)

        # A release that reached Redis twice (a retried reply) counts its failure once.
        g = await pool.try_acquire()
        assert isinstance(g, Grant)
        await pool.release(g, "failed")
        await pool.release(g, "failed")
        [s] = await pool.status()
        assert s.consecutive_failures == 1

    run(redis_url, body)


def test_failing_key_is_skipped_while_the_others_serve(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey(k, KeyLimits()) for k in "abc"], bench_after_failures=3, bench_seconds=30)
        used: Counter[str] = Counter()
        for _ in range(60):
            g = await pool.acquire(timeout=5)
            used[g.key_id] += 1
            await pool.release(g, "failed" if g.key_id == "b" else "ok")
        assert used["b"] == 3, used  # benched after its third failure
        assert used["a"] + used["c"] == 57
        status = {s.id: s for s in await pool.status()}
        assert status["b"].reason == "failing" and status["a"].benched_until is None

    run(redis_url, body)


HOLDER = """
import asyncio, sys, time
from zimage_queue.clients import connect_async
from zimage_queue.keypool import KeyLimits, KeyPool, PoolKey

async def main():
    r = connect_async(sys.argv[1])
    pool = KeyPool(r, sys.argv[2], [PoolKey("a", KeyLimits(concurrency=1))], lease_seconds=float(sys.argv[3]))
    await pool.acquire(timeout=10)
    print("granted", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_leases_of_a_dead_holder_expire(redis_url: str) -> None:
    lease_seconds = 1.5
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, POOL, str(lease_seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "granted"
        granted = time.monotonic()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    async def body(r: Any) -> float:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits(concurrency=1))], lease_seconds=lease_seconds)
        [s] = await pool.status()
        assert s.in_flight == 1  # the dead holder's lease
        assert isinstance(await pool.try_acquire(), float)
        g = await pool.acquire(timeout=lease_seconds + 2)
        assert g.key_id == "a"
        return time.monotonic() - granted

    took = run(redis_url, body)
    assert lease_seconds - 0.3 <= took <= lease_seconds + 1.0, took


def test_load_spreads_over_all_keys(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey(f"k{i}", KeyLimits()) for i in range(5)])
        used: Counter[str] = Counter()
        for _ in range(50):
            g = await pool.acquire()
            used[g.key_id] += 1
            await pool.release(g, "ok")
        assert sorted(used.values()) == [10] * 5  # one after the other: the least used in its window

        held = [await pool.acquire() for _ in range(10)]  # all held at once: the fewest in flight
        assert sorted(Counter(g.key_id for g in held).values()) == [2] * 5
        for g in held:
            await pool.release(g, "ok")

        # Unequal limits: each key in proportion to what it may take.
        other = KeyPool(
            r,
            "ns/other",
            [PoolKey("small", KeyLimits(requests=10)), PoolKey("big", KeyLimits(requests=30, concurrency=30))],
        )
        by_key: Counter[str] = Counter()
        for _ in range(20):
            g = await other.acquire()
            by_key[g.key_id] += 1
            await other.release(g, "ok")
        assert abs(by_key["small"] - 5) <= 1 and abs(by_key["big"] - 15) <= 1, by_key

    run(redis_url, body)


def test_keys_and_limits_changed_between_runs(redis_url: str) -> None:
    async def body(r: Any) -> None:
        limit = KeyLimits(requests=5, per_seconds=60)
        first = KeyPool(r, POOL, [PoolKey("a", limit), PoolKey("b", limit)])
        for _ in range(8):
            g = await first.acquire()
            await first.release(g, "ok")
        counts = {s.id: s.used_requests for s in await first.status()}
        assert counts == {"a": 4, "b": 4}
        # Next run: b removed, c added, a's limit lowered below what it has used in the window.
        second = KeyPool(r, POOL, [PoolKey("a", KeyLimits(requests=3, per_seconds=60)), PoolKey("c", KeyLimits())])
        used: Counter[str] = Counter()
        for _ in range(5):
            g = await second.acquire()
            used[g.key_id] += 1
            await second.release(g, "ok")
        assert used == {"c": 5}
        status = {s.id: s for s in await second.status()}
        assert set(status) == {"a", "c"} and status["a"].used_requests == 4
        with pytest.raises(TimeoutError):
            await KeyPool(r, POOL, [PoolKey("a", KeyLimits(requests=3, per_seconds=60))]).acquire(timeout=0.2)

    run(redis_url, body)


def test_refund_gives_back_a_request_never_sent(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits(requests=1, tokens=50, concurrency=1))])
        g = await pool.try_acquire(30)
        assert isinstance(g, Grant)
        await pool.refund(g)
        [s] = await pool.status()
        assert (s.in_flight, s.used_requests, s.used_tokens) == (0, 0, 0)
        assert isinstance(await pool.try_acquire(30), Grant)

    run(redis_url, body)


def test_a_cancelled_acquire_gives_back_what_the_script_granted(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey("a", KeyLimits(requests=1, per_seconds=60, concurrency=1))])
        admin = connect_async(redis_url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # holds the script until after the cancel
            task = asyncio.create_task(pool.try_acquire())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await admin.aclose()
        await asyncio.sleep(0.5)  # the pause is over: the script ran, its grant was refunded
        [s] = await pool.status()
        assert (s.in_flight, s.used_requests) == (0, 0)
        assert isinstance(await pool.try_acquire(), Grant)

    run(redis_url, body)


def test_every_redis_key_has_a_ttl_and_one_slot(redis_url: str) -> None:
    async def body(r: Any) -> None:
        pool = KeyPool(r, POOL, [PoolKey(k, KeyLimits(requests=5, per_seconds=1)) for k in "ab"], lease_seconds=5)
        held = [await pool.acquire(tokens=3) for _ in range(4)]
        await pool.release(held[0], "rate_limited", retry_after=120)
        await pool.release(held[1], "failed")
        found = [k.decode() for k in await r.keys("*")]
        assert found and all(k.startswith(f"{keys.PREFIX}:keypool:{{{POOL}}}:") for k in found)
        assert len({key_slot(k.encode()) for k in found}) == 1
        for k in found:
            ttl = await r.pttl(k)
            assert 0 < ttl <= (120 + 61) * 1000, (k, ttl)

    run(redis_url, body)


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli (Debian redis-tools) missing")
def test_on_a_redis_cluster() -> None:
    from zimage_queue.cluster import LocalCluster

    with LocalCluster(masters=3, replicas=0) as c:

        async def body(r: Any) -> list[tuple[str, int]]:
            pools = [KeyPool(r, f"ns/pool-{i}", [PoolKey(k, lim) for k, lim in LIMITS.items()]) for i in range(3)]
            grants: list[tuple[str, int]] = []
            for pool in pools:
                for _ in range(12):
                    g = await pool.acquire(timeout=5)
                    if pool is pools[0]:
                        grants.append((g.key_id, us(g)))
                    await pool.release(g, "ok", tokens_used=1)
                assert sum(s.used_requests for s in await pool.status()) == 12
            return grants

        grants = run(c.url, body)
        assert_within_limits(grants, LIMITS)
        slots = {key_slot(keys.keypool(f"ns/pool-{i}", "a", "log").encode()) for i in range(3)}
        assert len(slots) == 3  # three pools, three slots (each pool on one)
        names = []
        for node in c.nodes:
            client = node.client()
            try:
                names += [str(k) for k in client.keys("*")]
            finally:
                client.close()
        assert {key_slot(k.encode()) for k in names} == slots
