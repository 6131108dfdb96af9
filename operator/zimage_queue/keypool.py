"""A pool of API keys for an external provider, shared by every forwarder replica through Redis.

Each key has its own limits (``KeyLimits``): requests started in any sliding window of ``per_seconds``, tokens
counted in that window, requests in flight. One Lua script per acquisition (``scripts.KEYPOOL_ACQUIRE``) reads
every key of the pool, picks the least used key with room and records the grant, on Redis's clock: replicas
whose clocks differ, or that race for the last slot, never push a key past a limit.

* Requests: a sliding-window log per key (a sorted set of start times), exact: an entry counts until it is
  more than ``per_seconds`` old, so a provider counting any window of that length never sees more than
  ``requests`` started by the pool. The provider sees each request a little after the grant, and the delay
  varies: give ``per_seconds`` a margin above the provider's window (a few hundred ms) where that matters.
* Tokens: the estimate given to ``acquire`` counts in the window from the start, ``release(tokens_used=)``
  corrects it (a request needs at least one token of room).
* Concurrency: a sorted set of leases scored by expiry, so the leases of a crashed forwarder expire after
  ``lease_seconds``.
* ``release(outcome="rate_limited", retry_after=)`` blocks the key until then (what it used stays counted);
  ``"failed"`` counts a consecutive failure, and at ``bench_after_failures`` the key is benched for
  ``bench_seconds`` (a circuit breaker). Back from the bench it takes one request at a time until an ``ok``
  resets the count (half-open).

Keys (and their limits) come from the caller on every call: a pool whose keys were added, removed or changed
since the last run just works; what a removed key left in Redis expires with its TTL. Every Redis key of a
pool carries the pool's hash tag (``keys.keypool``), so the pool lives on one slot of a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from zimage_queue import keys, scripts
from zimage_queue.clients import AsyncClient

Outcome = Literal["ok", "rate_limited", "failed"]

# A wait for a slot another replica may free (a release there does not wake us) is polled this often.
CONCURRENCY_POLL_SECONDS = 0.1
# acquire() never sleeps longer than this between two tries, and adds up to this share of jitter (at most
# MAX_JITTER_SECONDS: replicas waiting for the same window to move wake close together and share what it frees).
# The cap stays below the few ms over which a burst granted together leaves the window: with more (it was 20 ms,
# 10% of a 1 s wait), the replica that drew the least jitter woke alone, found the whole burst free and took it
# all, its local waiters trying one after the other at once, before the others woke to a full window.
MAX_WAIT_SECONDS = 1.0
WAIT_JITTER = 0.1
MAX_JITTER_SECONDS = 0.002
# A 429 that said nothing about when to come back blocks its key this long.
DEFAULT_RETRY_AFTER_SECONDS = 1.0
# Every Redis key of a pool outlives its last use by this much (beyond the window, lease and bench).
TTL_MARGIN_SECONDS = 60.0

_KEY_ID = re.compile(r"[-._a-zA-Z0-9]+")  # a Secret entry's name


@dataclass(frozen=True)
class KeyLimits:
    requests: int | None = None  # at most this many requests started in any sliding window of per_seconds
    per_seconds: float = 60.0
    tokens: int | None = None  # at most this many tokens (estimate at acquire, corrected at release) per window
    concurrency: int | None = None  # at most this many in flight at once

    def __post_init__(self) -> None:
        if not self.per_seconds > 0:
            raise ValueError(f"per_seconds must be positive, not {self.per_seconds}")
        for name in ("requests", "tokens", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None: no limit), not {value}")


@dataclass(frozen=True)
class PoolKey:
    id: str  # the key's id (a Secret entry's name), never the secret itself
    limits: KeyLimits


@dataclass(frozen=True)
class Grant:
    pool: str
    key_id: str
    lease: str  # unique id of this acquisition
    granted_at: float = 0.0  # when the pool granted it: Redis's clock, epoch seconds


@dataclass(frozen=True)
class KeyStatus:
    id: str
    in_flight: int
    used_requests: int  # requests started in the current window
    used_tokens: int  # tokens counted in the current window
    benched_until: float | None  # epoch seconds: the key is skipped until then (rate limited or benched)
    consecutive_failures: int
    reason: Literal["rate_limited", "failing"] | None = None  # why it is skipped, while benched_until is set


def _us(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1_000_000))


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


class KeyPool:
    def __init__(
        self,
        r: AsyncClient,
        pool: str,
        keys: list[PoolKey],
        *,
        bench_after_failures: int = 3,
        bench_seconds: float = 30.0,
        lease_seconds: float = 600.0,
    ) -> None:
        if not pool or "{" in pool or "}" in pool:
            raise ValueError(f"a pool name must be non-empty and without braces (its hash tag): {pool!r}")
        if not keys:
            raise ValueError(f"pool {pool}: no keys")
        ids = [k.id for k in keys]
        bad = [i for i in ids if not _KEY_ID.fullmatch(i)]
        if bad:
            raise ValueError(f"pool {pool}: key ids must be Secret entry names ([-._a-zA-Z0-9]+): {bad}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"pool {pool}: duplicate key ids")
        if bench_after_failures < 1 or bench_seconds < 0 or lease_seconds <= 0:
            raise ValueError("bench_after_failures must be >= 1, bench_seconds >= 0, lease_seconds > 0")
        self.r = r
        self.pool = pool
        self.keys = list(keys)
        self.bench_after_failures = bench_after_failures
        self.bench_seconds = bench_seconds
        self.lease_seconds = lease_seconds
        self._redis_keys = [self._parts(k.id) for k in self.keys]
        self._flat_keys = [name for parts in self._redis_keys for name in parts]
        self._limit_args: list[int] = []
        for k in self.keys:
            lim = k.limits
            self._limit_args += [
                -1 if lim.requests is None else lim.requests,
                _us(lim.per_seconds),
                -1 if lim.tokens is None else lim.tokens,
                -1 if lim.concurrency is None else lim.concurrency,
            ]
        longest = max([k.limits.per_seconds for k in self.keys] + [lease_seconds, bench_seconds])
        self._ttl_ms = math.ceil((longest + TTL_MARGIN_SECONDS) * 1000)
        self._acquire = r.register_script(scripts.KEYPOOL_ACQUIRE)
        self._release = r.register_script(scripts.KEYPOOL_RELEASE)
        self._refund = r.register_script(scripts.KEYPOOL_REFUND)
        self._status = r.register_script(scripts.KEYPOOL_STATUS)
        # One waiter per process polls Redis at a time, the others queue behind it (FIFO); a release in this
        # process wakes it at once.
        self._gate = asyncio.Lock()
        self._released = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    def _parts(self, key_id: str) -> tuple[str, str, str]:
        return (
            keys.keypool(self.pool, key_id, "log"),
            keys.keypool(self.pool, key_id, "live"),
            keys.keypool(self.pool, key_id, "meta"),
        )

    async def try_acquire(self, tokens: int = 0) -> Grant | float:
        """A grant on the least used key with room, or the seconds until one may have room. Raises
        ValueError when no key's token limit could ever take ``tokens``."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        lease = uuid.uuid4().hex
        args: list[str | int] = [
            lease,
            tokens,
            _us(self.lease_seconds),
            self.bench_after_failures,
            _us(CONCURRENCY_POLL_SECONDS),
            random.randrange(len(self.keys)),
            self._ttl_ms,
            *self._limit_args,
        ]
        call = asyncio.ensure_future(self._acquire(keys=self._flat_keys, args=args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script may have granted anyway: give that grant back once its reply is in.
            call.add_done_callback(lambda done: self._refund_abandoned(done, lease))
            raise
        return self._grant_or_wait(reply, lease, tokens)

    def _grant_or_wait(self, reply: Any, lease: str, tokens: int) -> Grant | float:
        verdict = _int(reply[0])
        if verdict == 1:
            key_id = self.keys[_int(reply[1]) - 1].id
            return Grant(self.pool, key_id, lease, _int(reply[2]) / 1_000_000)
        if verdict == 0:
            return _int(reply[1]) / 1_000_000
        raise ValueError(f"pool {self.pool}: no key's token limit can take a request of {tokens} tokens")

    def _refund_abandoned(self, call: asyncio.Future[Any], lease: str) -> None:
        if call.cancelled() or call.exception() is not None or _int(call.result()[0]) != 1:
            return
        grant = Grant(self.pool, self.keys[_int(call.result()[1]) - 1].id, lease)
        task = asyncio.ensure_future(self.refund(grant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def acquire(self, tokens: int = 0, timeout: float | None = None) -> Grant:
        """Waits for a grant (sleeping what ``try_acquire`` says, capped and with a little jitter, or until a
        release in this process); raises TimeoutError after ``timeout`` seconds."""
        started = time.monotonic()
        if not self._gate.locked():
            got = await self.try_acquire(tokens)
            if isinstance(got, Grant):
                return got
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        try:
            async with asyncio.timeout(left), self._gate:
                while True:
                    self._released.clear()
                    got = await self.try_acquire(tokens)
                    if isinstance(got, Grant):
                        return got
                    delay = min(got, MAX_WAIT_SECONDS)
                    delay += random.uniform(0, min(WAIT_JITTER * delay, MAX_JITTER_SECONDS))
                    try:
                        async with asyncio.timeout(delay):
                            await self._released.wait()
                    except TimeoutError:
                        pass
        except TimeoutError:
            raise TimeoutError(f"pool {self.pool}: no key had room within {timeout} s") from None

    async def release(
        self,
        grant: Grant,
        outcome: Outcome,
        *,
        retry_after: float | None = None,
        tokens_used: int | None = None,
    ) -> None:
        """The request ended: ``ok``, ``rate_limited`` (a 429: the key is blocked for ``retry_after`` seconds,
        default ``DEFAULT_RETRY_AFTER_SECONDS``) or ``failed`` (a 5xx, a timeout: counts toward the bench).
        ``tokens_used`` replaces the estimate in the window. Safe to call twice."""
        if outcome not in ("ok", "rate_limited", "failed"):
            raise ValueError(f"unknown outcome {outcome!r}")
        if tokens_used is not None and tokens_used < 0:
            raise ValueError(f"tokens_used must be >= 0, not {tokens_used}")
        if grant.pool != self.pool:
            raise ValueError(f"a grant of pool {grant.pool} released to pool {self.pool}")
        parts = self._parts(grant.key_id)
        wait = DEFAULT_RETRY_AFTER_SECONDS if retry_after is None else max(0.0, retry_after)
        args: list[str | int] = [
            grant.lease,
            outcome,
            _us(wait),
            -1 if tokens_used is None else tokens_used,
            self.bench_after_failures,
            _us(self.bench_seconds),
            self._ttl_ms,
        ]
        try:
            await self._release(keys=list(parts), args=args)
        finally:
            self._released.set()

    async def refund(self, grant: Grant) -> None:
        """The request was never sent: its window entry, its tokens and its slot go back (not an outcome)."""
        try:
            await self._refund(keys=list(self._parts(grant.key_id)), args=[grant.lease])
        finally:
            self._released.set()

    async def status(self) -> list[KeyStatus]:
        """Each key as the pool sees it now, in the pool's order."""
        args = [_us(k.limits.per_seconds) for k in self.keys]
        reply = await self._status(keys=self._flat_keys, args=args)
        now = _int(reply[0])
        out = []
        for i, k in enumerate(self.keys):
            flight, count, tokens, blocked, benched, failures = (_int(v) for v in reply[1 + 6 * i : 7 + 6 * i])
            until = max(blocked, benched)
            reason: Literal["rate_limited", "failing"] | None = None
            if until > now:
                reason = "failing" if benched >= blocked else "rate_limited"
            out.append(
                KeyStatus(
                    id=k.id,
                    in_flight=flight,
                    used_requests=count,
                    used_tokens=tokens,
                    benched_until=until / 1_000_000 if until > now else None,
                    consecutive_failures=failures,
                    reason=reason,
                )
            )
        return out
