"""At-least-once job delivery on Redis Streams.

One stream per model queue and priority, read through the consumer group ``workers``. Guarantees:

* enqueue is idempotent per job uid (a restarted operator never enqueues twice);
* a worker acks only in ``complete``/``fail``, after its images are stored;
* an entry held by a dead worker is reclaimed with XAUTOCLAIM after ``visibility_ms``; a live worker keeps
  its entries fresh with ``heartbeat``;
* a job's result is written once (HSETNX): a redelivered job never yields a second result set;
* a job that fails ``max_retries + 1`` times goes to the dead-letter stream with its error.

The multi-key steps are Lua scripts so a crash between two commands cannot leave half a transition.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from zimage_queue import keys
from zimage_queue.message import JobEvent, JobMessage, Priority, ResultImage

log = logging.getLogger(__name__)

BeginOutcome = Literal["run", "done", "cancelled", "exhausted"]

_ENQUEUE = """
if redis.call('HSETNX', KEYS[1], ARGV[3], '-') == 0 then
  return {0, redis.call('HGET', KEYS[1], ARGV[3])}
end
local id = redis.call('XADD', KEYS[2], '*', ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[3], id, ARGV[4], KEYS[2])
return {1, id}
"""

# -> {outcome, attempts}
_BEGIN = """
if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return {'done', 0} end
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then return {'cancelled', 0} end
local a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1])
if a > tonumber(ARGV[2]) then return {'exhausted', a} end
return {'run', a}
"""

# KEYS: job, stream, events ; ARGV: group, entry id, result json, event json, ttl
_COMPLETE = """
local first = redis.call('HSETNX', KEYS[1], 'result', ARGV[3])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if first == 1 then
  redis.call('HSET', KEYS[1], 'state', 'succeeded')
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'event', ARGV[4])
end
return first
"""

# KEYS: job, stream, events, dead-letter ; ARGV: group, entry id, event json, payload, retry(1/0), error, ttl
_FAIL = """
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return 'done' end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
  redis.call('HSET', KEYS[1], 'state', 'queued')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'event', ARGV[3])
  return 'retrying'
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'job', ARGV[4], 'error', ARGV[6])
redis.call('HSET', KEYS[1], 'state', 'failed')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'event', ARGV[3])
return 'failed'
"""


# Highest priority first, in one round trip. KEYS: streams by priority ; ARGV: group, consumer, count
_TAKE = """
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

# KEYS: job, source stream, target stream, events ; ARGV: group, entry id, payload, event json
_MOVE = """
redis.call('XADD', KEYS[3], '*', 'job', ARGV[3])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'stream', KEYS[3], 'state', 'queued')
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100000', '*', 'event', ARGV[4])
return 1
"""

# KEYS: job, stream ; ARGV: group, entry id, payload
_RELEASE = """
redis.call('XADD', KEYS[2], '*', 'job', ARGV[3])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'queued')
return 1
"""


@dataclass(frozen=True)
class EnqueueResult:
    entry_id: str
    created: bool


@dataclass
class Delivery:
    """One job a worker holds: the stream entry it must ack, and the message."""

    stream: str
    entry_id: str
    message: JobMessage
    attempt: int = 0


@dataclass(frozen=True)
class QueueStats:
    queued: int  # entries not yet delivered to any worker
    in_flight: int  # delivered, not acked


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobQueue:
    def __init__(
        self,
        client: redis.Redis,
        *,
        visibility_ms: int = 30_000,
        result_ttl_seconds: int = 7 * 24 * 3600,
    ) -> None:
        # redis-py types replies as unions over RESP2/RESP3 shapes; the parsing below handles both.
        self.r: Any = client
        self.visibility_ms = visibility_ms
        self.result_ttl_seconds = result_ttl_seconds
        self._enqueue = client.register_script(_ENQUEUE)
        self._begin = client.register_script(_BEGIN)
        self._complete = client.register_script(_COMPLETE)
        self._fail = client.register_script(_FAIL)
        self._release = client.register_script(_RELEASE)
        self._take = client.register_script(_TAKE)
        self._move = client.register_script(_MOVE)
        self._groups_ready: set[tuple[str, str]] = set()
        self._next_reclaim: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobQueue:
        return cls(redis.Redis.from_url(url), **kwargs)

    # -- groups -------------------------------------------------------------------------------------------
    def ensure_group(self, stream: str, group: str = keys.WORKER_GROUP) -> None:
        if (stream, group) in self._groups_ready:
            return
        try:
            self.r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups_ready.add((stream, group))

    def ensure_queue(self, queue: str) -> None:
        for s in keys.streams(queue):
            self.ensure_group(s)

    # -- producer side ------------------------------------------------------------------------------------
    def enqueue(self, message: JobMessage, priority: Priority = "normal") -> EnqueueResult:
        stream = keys.stream(message.queue, priority)
        self.ensure_group(stream)
        created, entry_id = self._enqueue(
            keys=[keys.job(message.uid), stream],
            args=[keys.MESSAGE_FIELD, message.model_dump_json(by_alias=True), keys.F_ENQUEUED, keys.F_STREAM],
        )
        return EnqueueResult(entry_id=_s(entry_id), created=bool(int(created)))

    def reroute(self, queue: str, target: str, target_model: str, count: int = 100) -> int:
        """Move jobs no worker has taken yet from ``queue`` to ``target`` (a fallback pool), keeping priority."""
        moved = 0
        self.ensure_queue(target)
        for d in self.take(queue, "fallback-router", count=count, block_ms=0):
            priority = d.stream.rsplit(":", 1)[-1]
            msg = d.message.model_copy(update={"queue": target})
            event = JobEvent(
                type="rerouted",
                uid=msg.uid,
                namespace=msg.namespace,
                name=msg.name,
                reason="FallbackModel",
                message=target_model,
            )
            self._move(
                keys=[keys.job(msg.uid), d.stream, keys.stream(target, priority), keys.EVENTS_STREAM],  # type: ignore[arg-type]
                args=[
                    keys.WORKER_GROUP,
                    d.entry_id,
                    msg.model_dump_json(by_alias=True),
                    event.model_dump_json(by_alias=True),
                ],
            )
            moved += 1
        return moved

    def cancel(self, uid: str) -> None:
        self.r.hset(keys.job(uid), keys.F_CANCEL, "1")

    def is_cancelled(self, uid: str) -> bool:
        return bool(self.r.hexists(keys.job(uid), keys.F_CANCEL))

    def result(self, uid: str) -> list[ResultImage] | None:
        raw = self.r.hget(keys.job(uid), keys.F_RESULT)
        if raw is None:
            return None
        return [ResultImage.model_validate(x) for x in json.loads(_s(raw))]

    def state(self, uid: str) -> str | None:
        """queued, running, succeeded or failed; None for a job the queue does not know (or has forgotten)."""
        raw = self.r.hget(keys.job(uid), keys.F_STATE)
        return None if raw is None else _s(raw)

    def forget(self, uid: str) -> None:
        """Drop a finished job's bookkeeping (after its CR is gone)."""
        self.r.delete(keys.job(uid))

    # -- consumer side ------------------------------------------------------------------------------------
    def _parse(self, stream: str, entry_id: Any, fields: dict[Any, Any] | None) -> Delivery | None:
        if not fields:  # entry trimmed away
            return None
        raw = fields.get(keys.MESSAGE_FIELD.encode()) or fields.get(keys.MESSAGE_FIELD)
        try:
            msg = JobMessage.model_validate_json(_s(raw))
        except Exception as e:
            # A malformed entry can never succeed: park it with its error instead of redelivering it forever.
            log.error("malformed queue entry %s on %s: %s", _s(entry_id), stream, e)
            self.r.xadd(keys.DEAD_LETTER_STREAM, {keys.MESSAGE_FIELD: _s(raw), keys.ERROR_FIELD: str(e)})
            self.r.xack(stream, keys.WORKER_GROUP, entry_id)
            return None
        return Delivery(stream=stream, entry_id=_s(entry_id), message=msg)

    def reclaim(self, queue: str, consumer: str, count: int = 1) -> list[Delivery]:
        """Take over entries whose holder has not heartbeated for visibility_ms (a dead worker)."""
        out: list[Delivery] = []
        for stream in keys.streams(queue):
            self.ensure_group(stream)
            reply = self.r.xautoclaim(stream, keys.WORKER_GROUP, consumer, self.visibility_ms, "0-0", count=count)
            for entry_id, fields in reply[1]:
                d = self._parse(stream, entry_id, fields)
                if d is not None:
                    log.warning("reclaimed %s (job %s) from a silent worker", d.entry_id, d.message.uid)
                    out.append(d)
            if len(out) >= count:
                break
        return out

    def _reclaim_due(self, key: str) -> bool:
        """At most every quarter visibility timeout: nothing becomes reclaimable faster than a whole one."""
        now = time.monotonic()
        if now < self._next_reclaim.get(key, 0.0):
            return False
        self._next_reclaim[key] = now + self.visibility_ms / 4000
        return True

    def take(self, queue: str, consumer: str, count: int = 1, block_ms: int = 1000) -> list[Delivery]:
        """Next jobs for this worker: reclaimed ones first, then by priority, blocking up to block_ms.

        Reclaiming is checked only now and then (``_reclaim_due``), which keeps the hot path at one round trip.
        """
        got = self.reclaim(queue, consumer, count) if self._reclaim_due(queue) else []
        if got:
            return got
        names = keys.streams(queue)
        self.ensure_queue(queue)
        for stream, entry_id, flat in self._take(keys=names, args=[keys.WORKER_GROUP, consumer, count]):
            d = self._parse(_s(stream), entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            if d is not None:
                got.append(d)
        if got or block_ms <= 0:
            return got
        # Nothing waiting: block on all priorities at once; the first entry to arrive wakes us.
        return self._read(dict.fromkeys(names, ">"), consumer, count, block_ms)

    def _read(self, streams: dict[str, str], consumer: str, count: int, block: int | None) -> list[Delivery]:
        reply = self.r.xreadgroup(keys.WORKER_GROUP, consumer, streams, count=count, block=block)
        out = []
        # RESP2 gives [[stream, entries]], RESP3 a {stream: [entries]} dict.
        items = reply.items() if isinstance(reply, dict) else (reply or [])
        for stream, entries in items:
            for entry in entries:
                d = self._parse(_s(stream), entry[0], entry[1])
                if d is not None:
                    out.append(d)
        return out

    def heartbeat(self, delivery: Delivery, consumer: str) -> None:
        """Reset the entry's idle time so no other worker reclaims it while this one is alive."""
        self.r.xclaim(delivery.stream, keys.WORKER_GROUP, consumer, 0, [delivery.entry_id], justid=True)

    def begin(self, delivery: Delivery, worker: str) -> BeginOutcome:
        """Count an attempt and decide whether to run it; ``done``/``cancelled``/``exhausted`` must not run."""
        outcome, attempts = self._begin(
            keys=[keys.job(delivery.message.uid)], args=[worker, delivery.message.max_retries + 1]
        )
        delivery.attempt = int(attempts)
        return cast(BeginOutcome, _s(outcome))

    def complete(self, delivery: Delivery, results: list[ResultImage], event: JobEvent) -> bool:
        """Record the results (once), ack, and report. Returns False when a result was already recorded."""
        payload = json.dumps([r.wire() for r in results])
        first = self._complete(
            keys=[keys.job(delivery.message.uid), delivery.stream, keys.EVENTS_STREAM],
            args=[
                keys.WORKER_GROUP,
                delivery.entry_id,
                payload,
                event.model_dump_json(by_alias=True),
                self.result_ttl_seconds,
            ],
        )
        return bool(int(first))

    def fail(self, delivery: Delivery, event: JobEvent, *, retry: bool) -> str:
        """Ack a failed attempt and either requeue it (``retrying``) or dead-letter it (``failed``)."""
        msg = delivery.message
        retry = retry and delivery.attempt <= msg.max_retries
        event = event.model_copy(update={"type": "retrying" if retry else "failed"})
        outcome = self._fail(
            keys=[keys.job(msg.uid), delivery.stream, keys.EVENTS_STREAM, keys.DEAD_LETTER_STREAM],
            args=[
                keys.WORKER_GROUP,
                delivery.entry_id,
                event.model_dump_json(by_alias=True),
                msg.model_dump_json(by_alias=True),
                "1" if retry else "0",
                f"{event.reason}: {event.message}",
                self.result_ttl_seconds,
            ],
        )
        return _s(outcome)

    def release(self, delivery: Delivery) -> None:
        """Hand an unfinished job back to the queue (a worker shutting down); the attempt is not counted."""
        self._release(
            keys=[keys.job(delivery.message.uid), delivery.stream],
            args=[keys.WORKER_GROUP, delivery.entry_id, delivery.message.model_dump_json(by_alias=True)],
        )

    def ack(self, delivery: Delivery) -> None:
        self.r.xack(delivery.stream, keys.WORKER_GROUP, delivery.entry_id)

    def publish(self, event: JobEvent) -> None:
        self.r.xadd(
            keys.EVENTS_STREAM,
            {keys.EVENT_FIELD: event.model_dump_json(by_alias=True)},
            maxlen=100_000,
            approximate=True,
        )

    # -- operator side ------------------------------------------------------------------------------------
    def read_events(
        self, consumer: str, count: int = 500, block_ms: int = 1000, group: str = keys.OPERATOR_GROUP
    ) -> list[tuple[str, JobEvent]]:
        """Events not yet handled by this group; pending ones (from a crashed reader) come first."""
        self.ensure_group(keys.EVENTS_STREAM, group)
        if self._reclaim_due(keys.EVENTS_STREAM):
            # Events left unacked by a reader that died (an operator pod replaced under another name) move
            # to this reader, then come back below with the pending ones.
            self.r.xautoclaim(keys.EVENTS_STREAM, group, consumer, self.visibility_ms, "0-0", count=count, justid=True)
        out: list[tuple[str, JobEvent]] = []
        for start, block in (("0", None), (">", block_ms if block_ms > 0 else None)):  # BLOCK 0 = forever
            reply = self.r.xreadgroup(group, consumer, {keys.EVENTS_STREAM: start}, count=count, block=block)
            items = reply.items() if isinstance(reply, dict) else (reply or [])
            for _stream, entries in items:
                for entry_id, fields in entries:
                    if not fields:
                        continue
                    raw = fields.get(keys.EVENT_FIELD.encode()) or fields.get(keys.EVENT_FIELD)
                    out.append((_s(entry_id), JobEvent.model_validate_json(_s(raw))))
            if out:
                break
        return out

    def ack_events(self, entry_ids: list[str], group: str = keys.OPERATOR_GROUP) -> None:
        if entry_ids:
            self.r.xack(keys.EVENTS_STREAM, group, *entry_ids)

    def stats(self, queue: str) -> QueueStats:
        queued = in_flight = 0
        for stream in keys.streams(queue):
            self.ensure_group(stream)
            for g in self.r.xinfo_groups(stream):
                name = _s(g.get("name", g.get(b"name", "")))
                if name != keys.WORKER_GROUP:
                    continue
                lag = g.get("lag", g.get(b"lag"))
                queued += int(lag) if lag is not None else 0
                in_flight += int(g.get("pending", g.get(b"pending", 0)))
        return QueueStats(queued=queued, in_flight=in_flight)

    def worker_heartbeat(self, queue: str, worker: str, busy: bool) -> None:
        self.r.hset(keys.workers(queue), worker, f"{'busy' if busy else 'idle'} {time.time():.3f}")

    def worker_gone(self, queue: str, worker: str) -> None:
        self.r.hdel(keys.workers(queue), worker)

    def workers(self, queue: str, max_age: float = 15.0) -> dict[str, bool]:
        """Live workers of a queue (heartbeat within max_age seconds) and whether each is busy."""
        now = time.time()
        live: dict[str, bool] = {}
        stale = []
        for name, value in self.r.hgetall(keys.workers(queue)).items():
            state, _, ts = _s(value).partition(" ")
            if now - float(ts or 0) <= max_age:
                live[_s(name)] = state == "busy"
            else:
                stale.append(name)
        if stale:  # a worker killed without a goodbye
            self.r.hdel(keys.workers(queue), *stale)
        return live

    def dead_letters(self, count: int = 100) -> list[tuple[JobMessage, str]]:
        out = []
        for _id, fields in self.r.xrange(keys.DEAD_LETTER_STREAM, count=count):
            f = {_s(k): _s(v) for k, v in fields.items()}
            out.append((JobMessage.model_validate_json(f[keys.MESSAGE_FIELD]), f.get(keys.ERROR_FIELD, "")))
        return out
