"""At-least-once job delivery on Redis Streams.

One stream per model queue and priority, read through the consumer group ``workers``. Guarantees:

* enqueue is idempotent per job uid (a restarted operator never enqueues twice);
* a worker acks only in ``complete``/``fail``, after its images are stored;
* an entry held by a dead worker is reclaimed with XAUTOCLAIM after ``visibility_ms``; a live worker keeps
  its entries fresh with ``heartbeat``;
* a job's result is written once (HSETNX): a redelivered job never yields a second result set;
* a job that fails ``max_retries + 1`` times goes to the dead-letter stream with its error.

The multi-key steps are Lua scripts (``zimage_queue.scripts``) so a crash between two commands cannot leave half
a transition. Every terminal outcome is also kept in the job's own record (``final``) for its retention, so an
operator that missed the event (down, or the capped events stream trimmed) still finds it. Entries that do
not parse are dead-lettered (``zimage_queue.entries``), never retried forever.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis
from pydantic import ValidationError

from zimage_queue import keys, scripts
from zimage_queue.clients import connect
from zimage_queue.entries import Poisoned, decoded, error_text, quarantine, text
from zimage_queue.message import JobEvent, JobMessage, Priority, ResultImage

log = logging.getLogger(__name__)

BeginOutcome = Literal["run", "done", "cancelled", "exhausted"]


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


_s = text


@dataclass(frozen=True)
class Final:
    """A job's terminal outcome as its record keeps it: the event, and the results of a success."""

    event: JobEvent
    results: list[ResultImage] | None


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
        # How long a finished (or cancelled) job's record stays: the window for resyncs and redeliveries.
        self.result_ttl_seconds = result_ttl_seconds
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._begin = client.register_script(scripts.BEGIN)
        self._complete = client.register_script(scripts.COMPLETE)
        self._fail = client.register_script(scripts.FAIL)
        self._cancelled = client.register_script(scripts.CANCELLED)
        self._release = client.register_script(scripts.RELEASE)
        self._take = client.register_script(scripts.TAKE)
        self._move = client.register_script(scripts.MOVE)
        self._ack = client.register_script(scripts.ACK)
        self._groups_ready: set[tuple[str, str]] = set()
        self._next_reclaim: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> JobQueue:
        return cls(connect(url), **kwargs)

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
            moved += int(
                self._move(
                    keys=[keys.job(msg.uid), d.stream, keys.EVENTS_STREAM, keys.stream(target, priority)],  # type: ignore[arg-type]
                    args=[
                        keys.WORKER_GROUP,
                        d.entry_id,
                        event.model_dump_json(by_alias=True),
                        msg.model_dump_json(by_alias=True),
                    ],
                )
            )
        return moved

    def cancel(self, uid: str) -> None:
        """Ask the job's worker to stop (or never start it). The record then lives for the retention only."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(uid), keys.F_CANCEL, "1")
        pipe.expire(keys.job(uid), self.result_ttl_seconds)
        pipe.execute()

    def is_cancelled(self, uid: str) -> bool:
        return bool(self.r.hexists(keys.job(uid), keys.F_CANCEL))

    def result(self, uid: str) -> list[ResultImage] | None:
        raw = self.r.hget(keys.job(uid), keys.F_RESULT)
        if raw is None:
            return None
        return [ResultImage.model_validate(x) for x in json.loads(_s(raw))]

    def state(self, uid: str) -> str | None:
        """queued, running, succeeded, failed or cancelled; None for a job the queue does not know (or forgot)."""
        raw = self.r.hget(keys.job(uid), keys.F_STATE)
        return None if raw is None else _s(raw)

    def finals(self, uids: list[str]) -> dict[str, Final]:
        """The terminal outcomes the queue holds for these jobs (one pipelined round trip per 500)."""
        out: dict[str, Final] = {}
        for i in range(0, len(uids), 500):
            chunk = uids[i : i + 500]
            pipe = self.r.pipeline(transaction=False)
            for uid in chunk:
                pipe.hmget(keys.job(uid), keys.F_FINAL, keys.F_RESULT)
            for uid, (final, result) in zip(chunk, pipe.execute(), strict=True):
                if final is None:
                    continue
                try:
                    ev = JobEvent.model_validate_json(_s(final))
                    results = (
                        None if result is None else [ResultImage.model_validate(x) for x in json.loads(_s(result))]
                    )
                except (ValidationError, ValueError) as e:
                    log.error("unreadable final record of job %s: %s", uid, error_text(e))
                    continue
                out[uid] = Final(ev, results)
        return out

    def forget(self, uid: str) -> None:
        """Drop a finished job's bookkeeping (after its CR is gone)."""
        self.r.delete(keys.job(uid))

    def expire_soon(self, uid: str, seconds: int) -> None:
        """A deleted job's record: kept only long enough for a worker holding it to see the cancel."""
        self.r.expire(keys.job(uid), seconds)

    # -- consumer side ------------------------------------------------------------------------------------
    def _parse(self, stream: str, entry_id: Any, fields: dict[Any, Any] | None) -> Delivery | None:
        if not fields:  # entry trimmed away
            return None
        f = decoded(fields)
        try:
            msg = JobMessage.model_validate_json(f.get(keys.MESSAGE_FIELD) or "")
        except (ValidationError, ValueError) as e:
            # A malformed entry can never succeed: park it with its error instead of redelivering it forever,
            # and fail its ImageJob where the entry still says whose it is.
            error = error_text(e)
            quarantine(
                self.r,
                stream=stream,
                group=keys.WORKER_GROUP,
                entry_id=_s(entry_id),
                fields=f,
                error=error,
                kind="job",
                delete=True,
            )
            self._fail_unreadable(f.get(keys.MESSAGE_FIELD) or "", error)
            return None
        return Delivery(stream=stream, entry_id=_s(entry_id), message=msg)

    def _fail_unreadable(self, raw: str, error: str) -> None:
        try:
            ident = json.loads(raw)
            uid, namespace, name = (ident[k] for k in ("uid", "namespace", "name"))
        except (ValueError, TypeError, KeyError):
            return
        if not all(isinstance(v, str) and v for v in (uid, namespace, name)):
            return
        event = JobEvent(
            type="failed", uid=uid, namespace=namespace, name=name, reason="InvalidMessage", message=error[:1000]
        )
        payload = event.model_dump_json(by_alias=True)
        job = keys.job(uid)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(job, keys.F_FINAL, payload)
        pipe.hset(job, keys.F_STATE, "failed")
        pipe.expire(job, self.result_ttl_seconds)
        pipe.execute()
        self.publish(event)

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
            # Entries deleted while pending (a trim): XAUTOCLAIM has dropped them from the group.
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
        for stream, entries in _stream_items(reply):
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
        """Ack a failed attempt and either requeue it (``retrying``) or dead-letter it (``failed``).

        ``done``: a result was recorded meanwhile; ``stale``: the entry was settled already (by this call's
        lost first run, or by a worker that took it over)."""
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

    def cancelled(self, delivery: Delivery, event: JobEvent) -> bool:
        """Ack a job that was cancelled (before or while running), record the outcome and report it."""
        event = event.model_copy(update={"type": "cancelled"})
        recorded = self._cancelled(
            keys=[keys.job(delivery.message.uid), delivery.stream, keys.EVENTS_STREAM],
            args=[keys.WORKER_GROUP, delivery.entry_id, event.model_dump_json(by_alias=True), self.result_ttl_seconds],
        )
        return bool(int(recorded))

    def release(self, delivery: Delivery) -> None:
        """Hand an unfinished job back to the queue (a worker shutting down); the attempt is not counted."""
        self._release(
            keys=[keys.job(delivery.message.uid), delivery.stream],
            args=[keys.WORKER_GROUP, delivery.entry_id, delivery.message.model_dump_json(by_alias=True)],
        )

    def ack(self, delivery: Delivery) -> None:
        self._ack(keys=[delivery.stream], args=[keys.WORKER_GROUP, delivery.entry_id])

    def publish(self, event: JobEvent) -> None:
        self.r.xadd(
            keys.EVENTS_STREAM,
            {keys.EVENT_FIELD: event.model_dump_json(by_alias=True)},
            maxlen=keys.EVENTS_MAXLEN,
            approximate=True,
        )

    # -- operator side ------------------------------------------------------------------------------------
    def read_events(
        self, consumer: str, count: int = 500, block_ms: int = 1000, group: str = keys.OPERATOR_GROUP
    ) -> list[tuple[str, JobEvent]]:
        """Events not yet handled by this group; pending ones (from a crashed reader) come first.

        An entry that does not parse is dead-lettered and acked here; it never reaches the caller."""
        self.ensure_group(keys.EVENTS_STREAM, group)
        if self._reclaim_due(keys.EVENTS_STREAM):
            # Events left unacked by a reader that died (an operator pod replaced under another name) move
            # to this reader, then come back below with the pending ones.
            self.r.xautoclaim(keys.EVENTS_STREAM, group, consumer, self.visibility_ms, "0-0", count=count, justid=True)
        out: list[tuple[str, JobEvent]] = []
        for start, block in (("0", None), (">", block_ms if block_ms > 0 else None)):  # BLOCK 0 = forever
            reply = self.r.xreadgroup(group, consumer, {keys.EVENTS_STREAM: start}, count=count, block=block)
            seen = 0
            for _stream, entries in _stream_items(reply):
                for entry_id, fields in entries:
                    seen += 1
                    if not fields:  # trimmed while pending
                        self.r.xack(keys.EVENTS_STREAM, group, entry_id)
                        continue
                    f = decoded(fields)
                    try:
                        out.append((_s(entry_id), JobEvent.model_validate_json(f.get(keys.EVENT_FIELD) or "")))
                    except (ValidationError, ValueError) as e:
                        quarantine(
                            self.r,
                            stream=keys.EVENTS_STREAM,
                            group=group,
                            entry_id=_s(entry_id),
                            fields=f,
                            error=error_text(e),
                            kind="events",
                            delete=False,  # other readers (the API's progress streams) tail this stream
                        )
            if out or seen:
                break
        return out

    def dead_letter_event(self, entry_id: str, event: JobEvent, error: str, group: str = keys.OPERATOR_GROUP) -> None:
        """An event that parsed but can never be applied (its status write is refused for good)."""
        quarantine(
            self.r,
            stream=keys.EVENTS_STREAM,
            group=group,
            entry_id=entry_id,
            fields={keys.EVENT_FIELD: event.model_dump_json(by_alias=True)},
            error=error,
            kind="events",
            delete=False,
        )

    def ack_events(self, entry_ids: list[str], group: str = keys.OPERATOR_GROUP) -> None:
        if entry_ids:
            self.r.xack(keys.EVENTS_STREAM, group, *entry_ids)

    def trim_events(self, retention_seconds: float, now: float | None = None) -> int:
        """Drop events older than the retention that every consumer group has read and acked.

        Stream ids are millisecond timestamps, so XTRIM MINID trims by age; no entry a group still has to read
        or ack goes. Returns how many entries went."""
        now_ms = int((time.time() if now is None else now) * 1000)
        keep_from = _id_tuple(f"{now_ms - int(retention_seconds * 1000)}-0")
        try:
            groups = self.r.xinfo_groups(keys.EVENTS_STREAM)
        except redis.ResponseError:  # no stream yet
            return 0
        for g in groups:
            name = _s(_get(g, "name"))
            keep_from = min(keep_from, _after(_s(_get(g, "last-delivered-id") or "0-0")))
            keep_from = min(keep_from, self._oldest_pending(keys.EVENTS_STREAM, name) or keep_from)
        return int(self.r.xtrim(keys.EVENTS_STREAM, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False))

    def trim_queue(self, queue: str) -> int:
        """Drop acked entries a job stream still holds (written by a release that did not delete on ack)."""
        removed = 0
        for stream in keys.streams(queue):
            self.ensure_group(stream)
            keep_from: tuple[int, int] | None = None
            for g in self.r.xinfo_groups(stream):
                last = _after(_s(_get(g, "last-delivered-id") or "0-0"))
                keep_from = last if keep_from is None else min(keep_from, last)
                keep_from = min(keep_from, self._oldest_pending(stream, _s(_get(g, "name"))) or keep_from)
            if keep_from is not None:
                removed += int(self.r.xtrim(stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False))
        return removed

    def _oldest_pending(self, stream: str, group: str) -> tuple[int, int] | None:
        summary = self.r.xpending(stream, group)
        if not summary or not int(summary.get("pending") or 0):
            return None
        return _id_tuple(_s(summary["min"]))

    def stats(self, queue: str) -> QueueStats:
        queued = in_flight = 0
        for stream in keys.streams(queue):
            self.ensure_group(stream)
            for g in self.r.xinfo_groups(stream):
                if _s(_get(g, "name")) != keys.WORKER_GROUP:
                    continue
                lag = _get(g, "lag")
                queued += int(lag) if lag is not None else 0
                in_flight += int(_get(g, "pending") or 0)
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
            try:
                fresh = now - float(ts or 0) <= max_age
            except ValueError:
                fresh = False
            if fresh:
                live[_s(name)] = state == "busy"
            else:
                stale.append(name)
        if stale:  # a worker killed without a goodbye
            self.r.hdel(keys.workers(queue), *stale)
        return live

    def dead_letters(self, count: int = 100) -> list[tuple[JobMessage, str]]:
        """Jobs that failed for good, with their error (oldest first)."""
        out = []
        for _id, fields in self.r.xrange(keys.DEAD_LETTER_STREAM, count=count):
            f = decoded(fields)
            if keys.MESSAGE_FIELD not in f:
                continue  # unreadable input: see poisoned()
            try:
                out.append((JobMessage.model_validate_json(f[keys.MESSAGE_FIELD]), f.get(keys.ERROR_FIELD, "")))
            except (ValidationError, ValueError):
                continue
        return out

    def poisoned(self, count: int = 100) -> list[Poisoned]:
        """Entries no reader could parse, with where they came from and why (oldest first)."""
        out = []
        for _id, fields in self.r.xrange(keys.DEAD_LETTER_STREAM, count=count):
            f = decoded(fields)
            if keys.RAW_FIELD in f:
                out.append(
                    Poisoned(
                        f.get(keys.SOURCE_FIELD, ""),
                        f.get(keys.ENTRY_FIELD, ""),
                        f[keys.RAW_FIELD],
                        f.get(keys.ERROR_FIELD, ""),
                    )
                )
        return out


def _stream_items(reply: Any) -> Any:
    # RESP2 gives [[stream, entries]], RESP3 a {stream: [entries]} dict.
    return reply.items() if isinstance(reply, dict) else (reply or [])


def _get(info: dict[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(entry_id: str) -> tuple[int, int]:
    ms, seq = _id_tuple(entry_id)
    return ms, seq + 1
