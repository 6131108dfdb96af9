"""Fairness in Redis, shared by every API replica: a token bucket per API key and a concurrent-jobs quota per
tenant. Both are single Lua scripts, so two replicas never both take the last token or slot."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis

from zimage_queue import keys
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

# KEYS: tenant's active set ; ARGV: limit, token, now, reservation ttl, missing-job grace, job key prefix.
# Members are job uids (or "r:<token>" while a job is being created). A uid leaves the set once its queue
# record shows it finished or cancelled (or the record is gone); so the quota heals itself even if the API
# replica that admitted the job is long gone.
_RESERVE = """
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[3])
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local m, score = members[i], tonumber(members[i + 1])
  local gone = false
  if string.sub(m, 1, 2) == 'r:' then
    gone = now - score > tonumber(ARGV[4])
  else
    local job = ARGV[6] .. m
    local state = redis.call('HGET', job, 'state')
    if state == 'succeeded' or state == 'failed' or redis.call('HEXISTS', job, 'cancel') == 1 then
      gone = true
    elseif redis.call('EXISTS', job) == 0 then
      gone = now - score > tonumber(ARGV[5])
    end
  end
  if gone then redis.call('ZREM', KEYS[1], m) end
end
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then return {0, n} end
redis.call('ZADD', KEYS[1], now, 'r:' .. ARGV[2])
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
    def __init__(self, r: redis.Redis) -> None:
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

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._reserve = r.register_script(_RESERVE)
        self._commit = r.register_script(_COMMIT)

    @staticmethod
    def _key(tenant: str) -> str:
        return f"{PREFIX}:active:{tenant}"

    def reserve(self, tenant: str, limit: int) -> Slot | None:
        """A slot for one more job, or None when the tenant has ``limit`` jobs queued or running."""
        token = uuid.uuid4().hex
        ok, active = self._reserve(
            keys=[self._key(tenant)],
            args=[limit, token, time.time(), self.RESERVATION_TTL, self.MISSING_GRACE, keys.job("")],
        )
        return Slot(tenant, token, int(active)) if int(ok) else None

    def commit(self, slot: Slot, uid: str) -> None:
        self._commit(keys=[self._key(slot.tenant)], args=[slot.token, uid, time.time()])

    def release(self, slot: Slot) -> None:
        self.r.zrem(self._key(slot.tenant), f"r:{slot.token}")

    def active(self, tenant: str) -> int:
        return int(self.r.zcard(self._key(tenant)))
