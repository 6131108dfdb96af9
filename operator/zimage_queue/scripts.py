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
