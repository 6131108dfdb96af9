"""Fairness in Redis, shared by every API replica: a token bucket per API key and a concurrent-jobs quota per
tenant. Both decide in a single Lua script on a single key, so two replicas never both take the last token or
slot, and each runs on a Redis Cluster (every key a script touches is in its KEYS, and there is one)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from zimage_queue import JobQueue
from zimage_queue.clients import SyncClient
from zimage_queue.keys import PREFIX

# KEYS: bucket ; ARGV: rate per second, burst -> {allowed, retry after ms}. Redis's clock, so replicas agree.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local retry = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  retry = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, retry}
"""

# KEYS: tenant's active set ; ARGV: limit, token, now, then the members that are gone.
# Members are job uids (or "r:<token>" while a job is being created). Which are gone is read just before
# (``settled``): a uid whose queue record shows it finished or cancelled (or whose record is gone), a
# reservation past its time; so the quota heals itself even if the API replica that admitted the job is long
# gone. The records are not read in the script: on a cluster they live on their queues' slots.
_RESERVE = """
local limit = tonumber(ARGV[1])
for i = 4, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then return {0, n} end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), 'r:' .. ARGV[2])
return {1, n + 1}
"""

_COMMIT = """
redis.call('ZREM', KEYS[1], 'r:' .. ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds


class RateLimiter:
    def __init__(self, r: SyncClient) -> None:
        self._script = r.register_script(_BUCKET)

    def hit(self, key_id: str, rate_per_second: float, burst: int) -> Verdict:
        allowed, retry_ms = self._script(keys=[f"{PREFIX}:ratelimit:{key_id}"], args=[rate_per_second, burst])
        return Verdict(bool(int(allowed)), int(retry_ms) / 1000)


@dataclass(frozen=True)
class Slot:
    tenant: str
    token: str
    active: int


class ConcurrencyQuota:
    RESERVATION_TTL = 60.0
    MISSING_GRACE = 300.0

    def __init__(self, r: SyncClient, queue: JobQueue | None = None) -> None:
        self.r = r
        self.queue = queue or JobQueue(r)
        self._reserve = r.register_script(_RESERVE)
        self._commit = r.register_script(_COMMIT)

    @staticmethod
    def _key(tenant: str) -> str:
        return f"{PREFIX}:active:{tenant}"

    def reserve(self, tenant: str, limit: int) -> Slot | None:
        """A slot for one more job, or None when the tenant has ``limit`` jobs queued or running."""
        token = uuid.uuid4().hex
        now = time.time()
        gone = self.settled(self._key(tenant), now)
        ok, active = self._reserve(keys=[self._key(tenant)], args=[limit, token, now, *gone])
        return Slot(tenant, token, int(active)) if int(ok) else None

    def settled(self, key: str, now: float) -> list[str]:
        """Members of an active set that no longer count: finished, cancelled or forgotten jobs, and stale
        reservations (a missing record gets a grace: the job may be being created)."""
        raw: Any = self.r.zrange(key, 0, -1, withscores=True)
        members = [(m.decode() if isinstance(m, bytes) else str(m), float(score)) for m, score in raw]
        states = self.queue.states([m for m, _ in members if not m.startswith("r:")])
        gone = []
        for m, score in members:
            if m.startswith("r:"):
                if now - score > self.RESERVATION_TTL:
                    gone.append(m)
                continue
            found = states.get(m)
            if found is None:
                if now - score > self.MISSING_GRACE:
                    gone.append(m)
            elif found[0] in ("succeeded", "failed") or found[1]:
                gone.append(m)
        return gone

    def commit(self, slot: Slot, uid: str) -> None:
        self._commit(keys=[self._key(slot.tenant)], args=[slot.token, uid, time.time()])

    def release(self, slot: Slot) -> None:
        self.r.zrem(self._key(slot.tenant), f"r:{slot.token}")

    def active(self, tenant: str) -> int:
        return int(self.r.zcard(self._key(tenant)))
