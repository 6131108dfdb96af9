"""The queue's multi-key steps as Lua scripts: a crash between two commands cannot leave half a transition.

Each is safe to run twice (redis-py retries a command whose reply was lost): a step that settles a delivery
checks that XACK still found the entry pending, so a second run, or a run for an entry another worker already
settled, changes nothing. An acked entry is deleted from its job stream at once (XACK + XDEL, the XACKDEL of
Redis 8.2 written out), so job streams hold only what is queued or in flight.
"""

from __future__ import annotations

from zimage_queue import keys

_EVENT = f"redis.call('XADD', KEYS[3], 'MAXLEN', '~', '{keys.EVENTS_MAXLEN}', '*', '{keys.EVENT_FIELD}', %s)"
_SETTLE = """
local acked = redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
"""

# KEYS: job, stream ; ARGV: field, payload, enqueued field, stream field
ENQUEUE = """
if redis.call('HSETNX', KEYS[1], ARGV[3], '-') == 0 then
  return {0, redis.call('HGET', KEYS[1], ARGV[3])}
end
local id = redis.call('XADD', KEYS[2], '*', ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[3], id, ARGV[4], KEYS[2])
return {1, id}
"""

# KEYS: job ; ARGV: worker, max attempts -> {outcome, attempts}. ``moving``: a cluster reroute stopped half-way
# (``MOVE_OUT`` ran, ``MOVE_DONE`` did not); the caller finishes it.
BEGIN = f"""
if redis.call('HEXISTS', KEYS[1], '{keys.F_RESULT}') == 1 then return {{'done', 0}} end
if redis.call('HEXISTS', KEYS[1], '{keys.F_MOVING}') == 1 then return {{'moving', 0}} end
if redis.call('HEXISTS', KEYS[1], '{keys.F_FINAL}') == 1 then return {{'done', 0}} end
if redis.call('HEXISTS', KEYS[1], '{keys.F_CANCEL}') == 1 then return {{'cancelled', 0}} end
local a = redis.call('HINCRBY', KEYS[1], '{keys.F_ATTEMPTS}', 1)
redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'running', '{keys.F_WORKER}', ARGV[1])
if a > tonumber(ARGV[2]) then return {{'exhausted', a}} end
return {{'run', a}}
"""

# KEYS: job, stream, events ; ARGV: group, entry id, result json, event json, ttl -> 1 when this recorded it
COMPLETE = f"""
local first = redis.call('HSETNX', KEYS[1], '{keys.F_RESULT}', ARGV[3])
{_SETTLE}
if first == 1 then
  redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'succeeded', '{keys.F_FINAL}', ARGV[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  {_EVENT % "ARGV[4]"}
end
return first
"""

# KEYS: job, stream, events, dead-letter ; ARGV: group, entry id, event json, payload, retry(1/0), error, ttl
FAIL = f"""
{_SETTLE}
if acked == 0 then return 'stale' end
if redis.call('HEXISTS', KEYS[1], '{keys.F_RESULT}') == 1 then return 'done' end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[2], '*', '{keys.MESSAGE_FIELD}', ARGV[4])
  redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'queued')
  {_EVENT % "ARGV[3]"}
  return 'retrying'
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '{keys.DEAD_LETTER_MAXLEN}', '*', '{keys.MESSAGE_FIELD}', ARGV[4],
  '{keys.ERROR_FIELD}', ARGV[6])
redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'failed', '{keys.F_FINAL}', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
{_EVENT % "ARGV[3]"}
return 'failed'
"""

# KEYS: job, stream, events ; ARGV: group, entry id, event json, ttl -> 1 when this recorded it
CANCELLED = f"""
{_SETTLE}
if acked == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], '{keys.F_RESULT}') == 1 then return 0 end
redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'cancelled', '{keys.F_FINAL}', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
{_EVENT % "ARGV[3]"}
return 1
"""

# Highest priority first, in one round trip. KEYS: streams by priority ; ARGV: group, consumer, count
TAKE = """
local want = tonumber(ARGV[3])
local out = {}
for _, stream in ipairs(KEYS) do
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want - #out, 'STREAMS', stream, '>')
  if got then
    for _, entry in ipairs(got[1][2]) do table.insert(out, {stream, entry[1], entry[2]}) end
  end
  if #out >= want then break end
end
return out
"""

# KEYS: job, source stream, events, target stream ; ARGV: group, entry id, event json, payload
MOVE = f"""
{_SETTLE}
if acked == 0 then return 0 end
redis.call('XADD', KEYS[4], '*', '{keys.MESSAGE_FIELD}', ARGV[4])
redis.call('HSET', KEYS[1], '{keys.F_STREAM}', KEYS[4], '{keys.F_STATE}', 'queued')
{_EVENT % "ARGV[3]"}
return 1
"""

# KEYS: job, stream ; ARGV: group, entry id, payload
RELEASE = f"""
{_SETTLE}
if acked == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', '{keys.MESSAGE_FIELD}', ARGV[3])
redis.call('HINCRBY', KEYS[1], '{keys.F_ATTEMPTS}', -1)
redis.call('HSET', KEYS[1], '{keys.F_STATE}', 'queued')
return 1
"""

# KEYS: stream ; ARGV: group, entry id
ACK = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return acked
"""


# A reroute on a cluster, where the two queues live on two slots: three steps, each safe to repeat, in order.
# 1. KEYS: source job ; ARGV: target queue -> the record's fields (to copy), marked as moving there.
MOVE_OUT = f"""
redis.call('HSET', KEYS[1], '{keys.F_MOVING}', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# 2. KEYS: target job, target stream, target events ; ARGV: payload, event json, then field, value pairs to copy
# -> 1 when this created the target record. The record's HSETNX makes a second run a no-op.
MOVE_IN = f"""
if redis.call('HSETNX', KEYS[1], '{keys.F_ENQUEUED}', '-') == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = redis.call('XADD', KEYS[2], '*', '{keys.MESSAGE_FIELD}', ARGV[1])
redis.call('HSET', KEYS[1], '{keys.F_ENQUEUED}', id, '{keys.F_STREAM}', KEYS[2], '{keys.F_STATE}', 'queued')
redis.call('HDEL', KEYS[1], '{keys.F_MOVING}')
{_EVENT % "ARGV[2]"}
return 1
"""

# 3. (after the job's index names the target) KEYS: source job, source stream ; ARGV: group, entry id, target
# queue, ttl. The source record shrinks to a tombstone naming the target, so a worker that took the entry over
# meanwhile finds it moved (BEGIN says ``moving``) instead of running it a second time.
MOVE_DONE = f"""
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '{keys.F_MOVING}', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


# -- API key pools (zimage_queue.keypool) ----------------------------------------------------------------------
# KEYS: per pool key its log, live and meta (keys.keypool), in the pool's order. Times are microseconds of Redis
# TIME, so replicas whose clocks differ agree. Numbers reach Redis as redis.call arguments, never through Lua's
# tostring (14 digits: it would round a microsecond timestamp). A window entry counts while its start is at
# most the window's length ago, so no closed window of that length ever holds more than the limit.
_KEYPOOL_COMMON = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function keep(key, ms)
  local left = redis.call('PTTL', key)
  if left ~= -2 and left < ms then redis.call('PEXPIRE', key, ms) end
end
-- Drops expired leases and the window's old entries (with their token counts) -> tokens counted, requests in
-- the window.
local function trim(log, live, meta, window)
  redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
  local cutoff = now - window - 1
  local counted = tonumber(redis.call('HGET', meta, '{keys.KEYPOOL_TOKENS}') or 0)
  local sum = counted
  if sum > 0 then
    for _, lease in ipairs(redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)) do
      local a = redis.call('HGET', meta, lease)
      if a then
        sum = sum - tonumber(a)
        redis.call('HDEL', meta, lease)
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  local count = redis.call('ZCARD', log)
  if sum > 0 and count == 0 then
    -- nothing left in the window: whatever is still counted is stale (a log that expired before its meta)
    for _, f in ipairs(redis.call('HKEYS', meta)) do
      if string.sub(f, 1, 1) ~= '~' then redis.call('HDEL', meta, f) end
    end
    sum = 0
  end
  if sum < 0 then sum = 0 end
  if sum > 0 and sum ~= counted then
    redis.call('HSET', meta, '{keys.KEYPOOL_TOKENS}', sum)
  elseif sum == 0 and counted ~= 0 then
    redis.call('HDEL', meta, '{keys.KEYPOOL_TOKENS}')
  end
  return sum, count
end
"""

# ARGV: lease, tokens, lease us, bench after failures, concurrency poll us, first key to look at (0-based),
# ttl ms, then per key: requests, window us, tokens, concurrency (-1: no limit)
# -> {1, key index (1-based), start us} | {0, wait us} | {-1} (no key can ever take that many tokens).
# Among the keys with room, the least used (its highest share of any limit, then fewest in flight, then fewest
# in the window; ties go to the first from the rotating start). A key past its bench that has failed since runs
# one probe at a time until an ``ok`` (half-open circuit).
KEYPOOL_ACQUIRE = (
    _KEYPOOL_COMMON
    + f"""
local lease = ARGV[1]
local est = tonumber(ARGV[2])
local lease_us = tonumber(ARGV[3])
local bench_after = tonumber(ARGV[4])
local poll_us = tonumber(ARGV[5])
local first = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local n = #KEYS / 3
for i = 1, n do
  if redis.call('ZSCORE', KEYS[3 * i - 1], lease) then  -- a retried call whose reply was lost
    return {{1, i, tonumber(redis.call('ZSCORE', KEYS[3 * i - 2], lease) or now)}}
  end
end
local need = est
if need < 1 then need = 1 end
local best, best_share, best_flight, best_count = nil, 0, 0, 0
local soonest = nil
for j = 0, n - 1 do
  local i = (first + j) % n + 1
  local log, live, meta = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local o = 7 + 4 * (i - 1)
  local req, win, tok, conc = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]),
    tonumber(ARGV[o + 4])
  if tok < 0 or need <= tok then
    local m = redis.call('HMGET', meta, '{keys.KEYPOOL_BLOCKED}', '{keys.KEYPOOL_BENCHED}', '{keys.KEYPOOL_FAILURES}')
    local blocked = math.max(tonumber(m[1] or 0), tonumber(m[2] or 0))
    local at = now
    if blocked > now then
      at = blocked
    else
      local sum, count = trim(log, live, meta, win)
      local flight = redis.call('ZCARD', live)
      if tonumber(m[3] or 0) >= bench_after and (conc < 0 or conc > 1) then conc = 1 end
      if conc >= 0 and flight >= conc then
        local e = redis.call('ZRANGE', live, flight - conc, flight - conc, 'WITHSCORES')
        at = math.max(at, math.min(tonumber(e[2]), now + poll_us))
      end
      if req >= 0 and count >= req then
        local e = redis.call('ZRANGE', log, count - req, count - req, 'WITHSCORES')
        at = math.max(at, tonumber(e[2]) + win + 1)
      end
      if tok >= 0 and sum + need > tok then
        local s, found = sum, false
        local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
        for k = 1, #entries, 2 do
          s = s - tonumber(redis.call('HGET', meta, entries[k]) or 0)
          if s + need <= tok then
            at = math.max(at, tonumber(entries[k + 1]) + win + 1)
            found = true
            break
          end
        end
        if not found then at = math.max(at, now + win) end
      end
      if at <= now then
        local share = 0
        if req > 0 then share = math.max(share, count / req) end
        if conc > 0 then share = math.max(share, flight / conc) end
        if tok > 0 then share = math.max(share, (sum + need) / tok) end
        if best == nil or share < best_share or (share == best_share and (flight < best_flight
            or (flight == best_flight and count < best_count))) then
          best, best_share, best_flight, best_count = i, share, flight, count
        end
      end
    end
    if at > now and (soonest == nil or at < soonest) then soonest = at end
  end
end
if best == nil then
  if soonest == nil then return {{-1}} end
  return {{0, soonest - now}}
end
local log, live, meta = KEYS[3 * best - 2], KEYS[3 * best - 1], KEYS[3 * best]
redis.call('ZADD', log, now, lease)
redis.call('ZADD', live, now + lease_us, lease)
if est > 0 then
  redis.call('HSET', meta, lease, est)
  redis.call('HINCRBY', meta, '{keys.KEYPOOL_TOKENS}', est)
end
keep(log, ttl)
keep(live, ttl)
keep(meta, ttl)
return {{1, best, now}}
"""
)

# KEYS: the key's log, live, meta ; ARGV: lease, outcome (ok, rate_limited, failed), retry after us, tokens used
# (-1: keep the estimate), bench after failures, bench us, ttl ms -> 1 when the lease was still held. Safe to
# run twice: a failure counts only while the lease is held, a block only moves later, a token count is set.
KEYPOOL_RELEASE = (
    _KEYPOOL_COMMON
    + f"""
local log, live, meta = KEYS[1], KEYS[2], KEYS[3]
local lease, outcome = ARGV[1], ARGV[2]
local ttl = tonumber(ARGV[7])
local held = redis.call('ZREM', live, lease)
local used = tonumber(ARGV[4])
if used >= 0 and redis.call('ZSCORE', log, lease) then
  local old = tonumber(redis.call('HGET', meta, lease) or 0)
  if used > 0 then redis.call('HSET', meta, lease, used) else redis.call('HDEL', meta, lease) end
  if redis.call('HINCRBY', meta, '{keys.KEYPOOL_TOKENS}', used - old) <= 0 then
    redis.call('HDEL', meta, '{keys.KEYPOOL_TOKENS}')
  end
end
if outcome == 'ok' then
  redis.call('HDEL', meta, '{keys.KEYPOOL_FAILURES}')
elseif outcome == 'rate_limited' then
  local till = now + tonumber(ARGV[3])
  if till > tonumber(redis.call('HGET', meta, '{keys.KEYPOOL_BLOCKED}') or 0) then
    redis.call('HSET', meta, '{keys.KEYPOOL_BLOCKED}', till)
  end
  ttl = math.max(ttl, math.ceil(tonumber(ARGV[3]) / 1000) + 60000)
elseif outcome == 'failed' and held == 1 then
  if redis.call('HINCRBY', meta, '{keys.KEYPOOL_FAILURES}', 1) >= tonumber(ARGV[5]) then
    redis.call('HSET', meta, '{keys.KEYPOOL_BENCHED}', now + tonumber(ARGV[6]))
    ttl = math.max(ttl, math.ceil(tonumber(ARGV[6]) / 1000) + 60000)
  end
end
keep(log, ttl)
keep(live, ttl)
keep(meta, ttl)
return held
"""
)

# KEYS: the key's log, live, meta ; ARGV: lease. The request was never sent: its window entry, token count and
# slot go back. Safe to run twice.
KEYPOOL_REFUND = f"""
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local a = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or 0)
  redis.call('HDEL', KEYS[3], ARGV[1])
  if a > 0 and redis.call('HINCRBY', KEYS[3], '{keys.KEYPOOL_TOKENS}', -a) <= 0 then
    redis.call('HDEL', KEYS[3], '{keys.KEYPOOL_TOKENS}')
  end
end
return 1
"""

# KEYS: as KEYPOOL_ACQUIRE ; ARGV: per key its window us -> {now us, then per key: in flight, requests in the
# window, tokens in the window, blocked until us, benched until us, consecutive failures}
KEYPOOL_STATUS = (
    _KEYPOOL_COMMON
    + f"""
local out = {{now}}
for i = 1, #KEYS / 3 do
  local log, live, meta = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local sum, count = trim(log, live, meta, tonumber(ARGV[i]))
  local m = redis.call('HMGET', meta, '{keys.KEYPOOL_BLOCKED}', '{keys.KEYPOOL_BENCHED}', '{keys.KEYPOOL_FAILURES}')
  table.insert(out, redis.call('ZCARD', live))
  table.insert(out, count)
  table.insert(out, sum)
  table.insert(out, tonumber(m[1] or 0))
  table.insert(out, tonumber(m[2] or 0))
  table.insert(out, tonumber(m[3] or 0))
end
return out
"""
)
