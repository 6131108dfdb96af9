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

On a Redis Cluster (``zimage_queue.clients``) the keys follow ``keys.TAGGED``: everything of one queue on one
slot, so every script still runs on one node. What changes there: a job's record is found from its uid through
a small index key (``keys.job_queue``); events go to the queue's own events stream, and the readers here visit
every queue's; a reroute crosses slots in three steps; the acceptance and terminal writes wait for a replica
(``WAIT``), so a master killed right after it answered has not lost them. docs/scaling.md has the layout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis
from pydantic import ValidationError
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from zimage_queue import keys, scripts
from zimage_queue.clients import Credentials, SyncClient, connect, is_cluster, retrying, unblocked, wait_replicas
from zimage_queue.entries import Poisoned, decoded, error_text, quarantine, text
from zimage_queue.message import JobEvent, JobMessage, Priority, ResultImage

log = logging.getLogger(__name__)

BeginOutcome = Literal["run", "done", "cancelled", "exhausted"]

# How long a write waits for its replica (``WAIT``), and how long a master whose replica did not answer is left
# unconfirmed before the next try (so a shard without a live replica costs one wait per interval, not per write).
WAIT_MS = 500
UNREPLICATED_RETRY_SECONDS = 10.0
# Cluster only: how often the set of queues (hence events streams) is read again; and how often the events
# readers look again when nothing came (one blocking read cannot span slots).
QUEUES_REFRESH_SECONDS = 2.0
EVENTS_POLL_SECONDS = 0.05
# Cluster only: a job's index key lives as long as its record; this caps one whose last write was lost.
INDEX_TTL_SECONDS = 30 * 24 * 3600


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
        client: SyncClient,
        *,
        visibility_ms: int = 30_000,
        result_ttl_seconds: int = 7 * 24 * 3600,
        wait_replicas: int | None = None,
    ) -> None:
        # redis-py types replies as unions over RESP2/RESP3 shapes; the parsing below handles both.
        self.r: Any = client
        self.cluster = is_cluster(client)
        self.k = keys.TAGGED if self.cluster else keys.FLAT
        # Replicas that must confirm an accepted job and a terminal outcome before the call returns.
        self.wait_replicas = (1 if self.cluster else 0) if wait_replicas is None else wait_replicas
        self._unreplicated_until: dict[str, float] = {}
        self._queues_ready: set[str] = set()
        self._queues: list[str] = []
        self._queues_read = 0.0
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
        self._move_out = client.register_script(scripts.MOVE_OUT)
        self._move_in = client.register_script(scripts.MOVE_IN)
        self._move_done = client.register_script(scripts.MOVE_DONE)
        self._groups_ready: set[tuple[str, str]] = set()
        self._next_reclaim: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, credentials: Credentials | None = None, **kwargs: Any) -> JobQueue:
        kwargs.setdefault("wait_replicas", wait_replicas(url))
        return cls(connect(url, credentials), **kwargs)

    # -- where things are -----------------------------------------------------------------------------------
    def _queue_of(self, d: Delivery) -> str:
        """The queue whose slot holds the delivery's job: the stream it came from (the message may lie)."""
        return self.k.queue_of(d.stream) or d.message.queue

    def _job(self, d: Delivery) -> str:
        return self.k.job(self._queue_of(d), d.message.uid)

    def _locate(self, uids: list[str]) -> dict[str, tuple[str, str]]:
        """uid -> (queue, record key) for the jobs whose record can be found; flat names need no lookup."""
        if not self.k.tagged:
            return {uid: ("", keys.job(uid)) for uid in uids}
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(uids), 500):
            chunk = uids[i : i + 500]

            def read(chunk: list[str] = chunk) -> list[Any]:
                pipe = self.r.pipeline(transaction=False)
                for uid in chunk:
                    pipe.get(keys.job_queue(uid))
                return list(pipe.execute())

            for uid, queue in zip(chunk, retrying(self.r, read), strict=True):
                if queue is not None:
                    out[uid] = (_s(queue), self.k.job(_s(queue), uid))
        return out

    def _record(self, uid: str, queue: str | None = None) -> str | None:
        if not self.k.tagged:
            return keys.job(uid)
        if queue is not None:
            return self.k.job(queue, uid)
        found = self._locate([uid]).get(uid)
        return found[1] if found else None

    def _register(self, queue: str) -> None:
        """Cluster only: note the queue, so the events readers find its stream."""
        if self.k.tagged and queue not in self._queues_ready:
            self.r.sadd(keys.QUEUES, queue)
            self._queues_ready.add(queue)

    def queues(self) -> list[str]:
        """Cluster only: every queue set up so far (re-read every few seconds)."""
        now = time.monotonic()
        if now - self._queues_read >= QUEUES_REFRESH_SECONDS:
            self._queues = sorted(_s(q) for q in self.r.smembers(keys.QUEUES))
            self._queues_read = now
        return self._queues

    def _events_streams(self) -> list[str]:
        return [self.k.events(q) for q in self.queues()] if self.k.tagged else [keys.EVENTS_STREAM]

    # -- writes that must survive a failover ------------------------------------------------------------------
    def _durable(self, script: Any, keys_: list[str], args: list[Any]) -> Any:
        """Run a script and, when replicas must confirm, ``WAIT`` for them on the same connection (WAIT counts
        the writes of the connection it is sent on, so the two go down one pipeline to the slot's master)."""
        if self.wait_replicas <= 0:
            return script(keys=keys_, args=args)
        if not self.cluster:
            pipe = self.r.pipeline(transaction=False)
            pipe.eval(script.script, len(keys_), *keys_, *args)
            if time.monotonic() >= self._unreplicated_until.get("", 0.0):
                pipe.wait(self.wait_replicas, WAIT_MS)
            out = pipe.execute()
            self._replicated("", out)
            return out[0]
        return retrying(self.r, lambda: self._durable_on_master(script, keys_, args))

    def _durable_on_master(self, script: Any, keys_: list[str], args: list[Any]) -> Any:
        node = self.r.get_node_from_key(keys_[0])
        pipe = self.r.get_redis_connection(node).pipeline(transaction=False)
        pipe.eval(script.script, len(keys_), *keys_, *args)
        if time.monotonic() >= self._unreplicated_until.get(node.name, 0.0):
            pipe.wait(self.wait_replicas, WAIT_MS)
        try:
            out = pipe.execute()
        except (MovedError, AskError, TryAgainError, ClusterDownError, redis.ConnectionError) as e:
            # The slot has moved (a failover): learn the new map, then the caller's retry goes again.
            self.r.nodes_manager.initialize()
            raise ClusterDownError(f"slot of {keys_[0]} moved: {e}") from e
        self._replicated(node.name, out)
        return out[0]

    def _replicated(self, node: str, out: list[Any]) -> None:
        if len(out) > 1 and int(out[1]) < self.wait_replicas:
            self._unreplicated_until[node] = time.monotonic() + UNREPLICATED_RETRY_SECONDS
            log.warning(
                "Redis master %s confirmed a write on %s of %s replicas within %d ms; not waiting again for %.0fs",
                node or "(single)",
                out[1],
                self.wait_replicas,
                WAIT_MS,
                UNREPLICATED_RETRY_SECONDS,
            )

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
        self._register(queue)
        for s in self.k.streams(queue):
            self.ensure_group(s)

    # -- producer side ------------------------------------------------------------------------------------
    def enqueue(self, message: JobMessage, priority: Priority = "normal") -> EnqueueResult:
        queue = message.queue
        stream = self.k.stream(queue, priority)
        self._register(queue)
        self.ensure_group(stream)
        if self.k.tagged:
            # The index first: a job already known to another queue (rerouted there) is not enqueued again.
            home = self.r.set(keys.job_queue(message.uid), queue, nx=True, get=True, ex=INDEX_TTL_SECONDS)
            if home is not None and _s(home) != queue:
                entry = self.r.hget(self.k.job(_s(home), message.uid), keys.F_ENQUEUED)
                return EnqueueResult(entry_id=_s(entry) if entry is not None else "-", created=False)
        created, entry_id = self._durable(
            self._enqueue,
            [self.k.job(queue, message.uid), stream],
            [keys.MESSAGE_FIELD, message.model_dump_json(by_alias=True), keys.F_ENQUEUED, keys.F_STREAM],
        )
        return EnqueueResult(entry_id=_s(entry_id), created=bool(int(created)))

    def reroute(self, queue: str, target: str, target_model: str, count: int = 100) -> int:
        """Move jobs no worker has taken yet from ``queue`` to ``target`` (a fallback pool), keeping priority."""
        moved = 0
        self.ensure_queue(target)
        for d in self.take(queue, "fallback-router", count=count, block_ms=0):
            moved += self.move(d, target, target_model)
        return moved

    def move(
        self,
        d: Delivery,
        target: str,
        target_model: str,
        reason: str = "FallbackModel",
        update: dict[str, Any] | None = None,
    ) -> int:
        """Move a taken job to the queue ``target`` (of the ModelDeployment ``target_model``) at its priority, and
        report it (``rerouted``, with ``reason``: why it left). ``update`` changes fields of its message."""
        msg = d.message.model_copy(update={"queue": target, **(update or {})})
        event = JobEvent(
            type="rerouted",
            uid=msg.uid,
            namespace=msg.namespace,
            name=msg.name,
            reason=reason,
            message=target_model,
            bulk=msg.bulk,
        )
        self.ensure_queue(target)
        if self.k.tagged:
            return self._move_across(d, target, event, msg)
        priority = d.stream.rsplit(":", 1)[-1]
        return int(
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

    def _move_across(
        self, d: Delivery, target: str, event: JobEvent | None = None, message: JobMessage | None = None
    ) -> int:
        """A reroute between two slots (cluster): mark the source record, create the target record and entry,
        point the index at the target, then settle the source entry and leave a tombstone. Each step is safe
        to repeat, and a worker that finds a half-done move (``begin``) finishes it instead of running the job."""
        uid = d.message.uid
        source = self._job(d)
        priority = d.stream.rsplit(":", 1)[-1]
        msg = message or d.message.model_copy(update={"queue": target})
        if event is None:
            event = JobEvent(
                type="rerouted",
                uid=uid,
                namespace=msg.namespace,
                name=msg.name,
                reason="FallbackModel",
                message=target.partition("/")[2] or target,
                bulk=msg.bulk,
            )
        flat = self._move_out(keys=[source], args=[target])
        fields = decoded(dict(zip(flat[::2], flat[1::2], strict=True)))
        copied = [
            x
            for k, v in fields.items()
            if k not in (keys.F_ENQUEUED, keys.F_STREAM, keys.F_MOVING, keys.F_STATE)
            for x in (k, v)
        ]
        self.ensure_queue(target)
        created = self._durable(
            self._move_in,
            [self.k.job(target, uid), self.k.stream(target, priority), self.k.events(target)],  # type: ignore[arg-type]
            [msg.model_dump_json(by_alias=True), event.model_dump_json(by_alias=True), *copied],
        )
        self.r.set(keys.job_queue(uid), target, ex=INDEX_TTL_SECONDS)
        self._move_done(keys=[source, d.stream], args=[keys.WORKER_GROUP, d.entry_id, target, self.result_ttl_seconds])
        return int(created)

    def cancel(self, uid: str, queue: str | None = None) -> None:
        """Ask the job's worker to stop (or never start it). The record then lives for the retention only.

        On a cluster the record is found through the job's index (or ``queue``); a job not enqueued yet has
        neither, and nothing is written."""
        job = self._record(uid, queue)
        if job is None:
            log.info("cancel of job %s: the queue does not know it", uid)
            return

        def write() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(job, keys.F_CANCEL, "1")
            pipe.expire(job, self.result_ttl_seconds)
            pipe.execute()

        retrying(self.r, write)
        if self.k.tagged:
            self.r.expire(keys.job_queue(uid), self.result_ttl_seconds)

    def is_cancelled(self, uid: str, queue: str | None = None) -> bool:
        job = self._record(uid, queue)
        return job is not None and bool(self.r.hexists(job, keys.F_CANCEL))

    def record_usage(self, deliveries: list[Delivery], facts: dict[str, Any]) -> None:
        """What these attempts ran on (``batchImages``: the images of their whole batch; ``device``), kept in each
        job's record (``keys.F_USAGE_PREFIX``) for the operator's usage rows; it expires with the record."""
        pipe = self.r.pipeline(transaction=False)
        for d in deliveries:
            pipe.hset(self._job(d), f"{keys.F_USAGE_PREFIX}{d.attempt}", json.dumps(facts))
        pipe.execute()

    def usage(self, attempts: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
        """(uid, attempt) -> what ``record_usage`` kept, for those found (pipelined)."""
        found = self._locate(sorted({uid for uid, _ in attempts}))
        asked = [(uid, n) for uid, n in attempts if uid in found]
        if not asked:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for uid, n in asked:
            pipe.hget(found[uid][1], f"{keys.F_USAGE_PREFIX}{n}")
        return {key: json.loads(_s(raw)) for key, raw in zip(asked, pipe.execute(), strict=True) if raw is not None}

    def result(self, uid: str) -> list[ResultImage] | None:
        job = self._record(uid)
        raw = None if job is None else self.r.hget(job, keys.F_RESULT)
        if raw is None:
            return None
        return [ResultImage.model_validate(x) for x in json.loads(_s(raw))]

    def state(self, uid: str) -> str | None:
        """queued, running, succeeded, failed or cancelled; None for a job the queue does not know (or forgot)."""
        job = self._record(uid)
        raw = None if job is None else self.r.hget(job, keys.F_STATE)
        return None if raw is None else _s(raw)

    def states(self, uids: list[str]) -> dict[str, tuple[str | None, bool]]:
        """uid -> (state, cancel asked) for the jobs whose record exists (pipelined)."""
        found = self._locate(uids)
        located = [u for u in uids if u in found]

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for uid in located:
                pipe.hmget(found[uid][1], keys.F_STATE, keys.F_CANCEL, keys.F_ENQUEUED)
            return list(pipe.execute()) if located else []

        out: dict[str, tuple[str | None, bool]] = {}
        for uid, (state, cancel, enqueued) in zip(located, retrying(self.r, read), strict=True):
            if state is not None or cancel is not None or enqueued is not None:
                out[uid] = (None if state is None else _s(state), cancel is not None)
        return out

    def records(self, uids: list[str], fields: list[str]) -> list[list[Any]]:
        """These fields of each job's record, in order (all None where the queue has no record): pipelined."""
        found = self._locate(uids)

        def read() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for uid in uids:
                pipe.hmget(found[uid][1] if uid in found else self.k.job("", uid), *fields)
            return list(pipe.execute()) if uids else []

        return [list(v) for v in retrying(self.r, read)]

    def finals(self, uids: list[str]) -> dict[str, Final]:
        """The terminal outcomes the queue holds for these jobs (one pipelined round trip per 500)."""
        out: dict[str, Final] = {}
        for i in range(0, len(uids), 500):
            found = self._locate(uids[i : i + 500])
            chunk = [u for u in uids[i : i + 500] if u in found]

            def read(chunk: list[str] = chunk, found: dict[str, tuple[str, str]] = found) -> list[Any]:
                pipe = self.r.pipeline(transaction=False)
                for uid in chunk:
                    pipe.hmget(found[uid][1], keys.F_FINAL, keys.F_RESULT)
                return list(pipe.execute()) if chunk else []

            for uid, (final, result) in zip(chunk, retrying(self.r, read), strict=True):
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
        job = self._record(uid)
        if job is not None:
            self.r.delete(job)
        if self.k.tagged:
            self.r.delete(keys.job_queue(uid))

    def expire_soon(self, uid: str, seconds: int) -> None:
        """A deleted job's record: kept only long enough for a worker holding it to see the cancel."""
        job = self._record(uid)
        if job is not None:
            self.r.expire(job, seconds)
        if self.k.tagged:
            self.r.expire(keys.job_queue(uid), seconds)

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
            queue = self.k.queue_of(stream) or ""
            quarantine(
                self.r,
                stream=stream,
                group=keys.WORKER_GROUP,
                entry_id=_s(entry_id),
                fields=f,
                error=error,
                kind="job",
                delete=True,
                dead_letter=self.k.dead_letter(queue),
            )
            self._fail_unreadable(f.get(keys.MESSAGE_FIELD) or "", error, queue)
            return None
        return Delivery(stream=stream, entry_id=_s(entry_id), message=msg)

    def _fail_unreadable(self, raw: str, error: str, queue: str = "") -> None:
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
        job = self.k.job(queue, uid)

        def write() -> None:
            pipe = self.r.pipeline(transaction=True)
            pipe.hsetnx(job, keys.F_FINAL, payload)
            pipe.hset(job, keys.F_STATE, "failed")
            pipe.expire(job, self.result_ttl_seconds)
            pipe.execute()

        retrying(self.r, write)
        if self.k.tagged:
            self.r.set(keys.job_queue(uid), queue, nx=True, ex=self.result_ttl_seconds)
        self.publish(event, queue=queue)

    def reclaim(self, queue: str, consumer: str, count: int = 1) -> list[Delivery]:
        """Take over entries whose holder has not heartbeated for visibility_ms (a dead worker)."""
        out: list[Delivery] = []
        for stream in self.k.streams(queue):
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
        names = self.k.streams(queue)
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
        reply = self._xreadgroup(keys.WORKER_GROUP, consumer, streams, count, block)
        out = []
        for stream, entries in _stream_items(reply):
            for entry in entries:
                d = self._parse(_s(stream), entry[0], entry[1])
                if d is not None:
                    out.append(d)
        return out

    def _xreadgroup(self, group: str, consumer: str, streams: dict[str, str], count: int, block: int | None) -> Any:
        """XREADGROUP, where a failover that cuts a blocking read short reads as nothing arrived."""
        try:
            return self.r.xreadgroup(group, consumer, streams, count=count, block=block)
        except redis.ResponseError as e:
            if not unblocked(e):
                raise
            log.info("a blocking read was cut short by a Redis failover (%s); reading again", e)
            return None

    def heartbeat(self, delivery: Delivery, consumer: str) -> None:
        """Reset the entry's idle time so no other worker reclaims it while this one is alive."""
        self.r.xclaim(delivery.stream, keys.WORKER_GROUP, consumer, 0, [delivery.entry_id], justid=True)

    def begin(self, delivery: Delivery, worker: str) -> BeginOutcome:
        """Count an attempt and decide whether to run it; ``done``/``cancelled``/``exhausted`` must not run."""
        outcome, attempts = self._begin(keys=[self._job(delivery)], args=[worker, delivery.message.max_retries + 1])
        delivery.attempt = int(attempts)
        if _s(outcome) == "moving":  # a cluster reroute that stopped half-way: finish it, the job runs there
            target = _s(self.r.hget(self._job(delivery), keys.F_MOVING))
            self._move_across(delivery, target)
            return "done"
        return cast(BeginOutcome, _s(outcome))

    def complete(self, delivery: Delivery, results: list[ResultImage], event: JobEvent) -> bool:
        """Record the results (once), ack, and report. Returns False when a result was already recorded."""
        payload = json.dumps([r.wire() for r in results])
        first = self._durable(
            self._complete,
            [self._job(delivery), delivery.stream, self.k.events(self._queue_of(delivery))],
            [
                keys.WORKER_GROUP,
                delivery.entry_id,
                payload,
                event.model_dump_json(by_alias=True),
                self.result_ttl_seconds,
            ],
        )
        self._expire_index(delivery)
        return bool(int(first))

    def _expire_index(self, delivery: Delivery) -> None:
        """Cluster only: the index lives as long as the record (a lost call leaves it to INDEX_TTL_SECONDS)."""
        if self.k.tagged:
            self.r.expire(keys.job_queue(delivery.message.uid), self.result_ttl_seconds)

    def fail(self, delivery: Delivery, event: JobEvent, *, retry: bool) -> str:
        """Ack a failed attempt and either requeue it (``retrying``) or dead-letter it (``failed``).

        ``done``: a result was recorded meanwhile; ``stale``: the entry was settled already (by this call's
        lost first run, or by a worker that took it over)."""
        msg = delivery.message
        retry = retry and delivery.attempt <= msg.max_retries
        event = event.model_copy(update={"type": "retrying" if retry else "failed"})
        queue = self._queue_of(delivery)
        outcome = self._durable(
            self._fail,
            [self._job(delivery), delivery.stream, self.k.events(queue), self.k.dead_letter(queue)],
            [
                keys.WORKER_GROUP,
                delivery.entry_id,
                event.model_dump_json(by_alias=True),
                msg.model_dump_json(by_alias=True),
                "1" if retry else "0",
                f"{event.reason}: {event.message}",
                self.result_ttl_seconds,
            ],
        )
        if _s(outcome) == "failed":
            self._expire_index(delivery)
        return _s(outcome)

    def cancelled(self, delivery: Delivery, event: JobEvent) -> bool:
        """Ack a job that was cancelled (before or while running), record the outcome and report it."""
        event = event.model_copy(update={"type": "cancelled"})
        recorded = self._durable(
            self._cancelled,
            [self._job(delivery), delivery.stream, self.k.events(self._queue_of(delivery))],
            [keys.WORKER_GROUP, delivery.entry_id, event.model_dump_json(by_alias=True), self.result_ttl_seconds],
        )
        self._expire_index(delivery)
        return bool(int(recorded))

    def release(self, delivery: Delivery) -> None:
        """Hand an unfinished job back to the queue (a worker shutting down); the attempt is not counted."""
        self._release(
            keys=[self._job(delivery), delivery.stream],
            args=[keys.WORKER_GROUP, delivery.entry_id, delivery.message.model_dump_json(by_alias=True)],
        )

    def ack(self, delivery: Delivery) -> None:
        self._ack(keys=[delivery.stream], args=[keys.WORKER_GROUP, delivery.entry_id])

    def publish(self, event: JobEvent, queue: str | None = None) -> None:
        """Add an event outside any script (started, progress). On a cluster it goes to the job's queue's
        events stream: ``queue`` when the caller knows it, else the job's index says."""
        if self.k.tagged and queue is None:
            queue = (self._locate([event.uid]).get(event.uid) or (None, ""))[0]
            if queue is None:
                log.warning("dropped %s event of job %s: the queue does not know the job", event.type, event.uid)
                return
        self.r.xadd(
            self.k.events(queue or ""),
            {keys.EVENT_FIELD: event.model_dump_json(by_alias=True)},
            maxlen=keys.EVENTS_MAXLEN,
            approximate=True,
        )

    # -- operator side ------------------------------------------------------------------------------------
    # On one server there is one events stream and entry ids are its ids. On a cluster each queue has its own,
    # and an entry id is "<stream> <id>" so acks and dead-letters find their stream.
    def _entry(self, stream: str, entry_id: str) -> str:
        return f"{stream} {entry_id}" if self.k.tagged else entry_id

    def _split(self, entry: str) -> tuple[str, str]:
        if not self.k.tagged:
            return keys.EVENTS_STREAM, entry
        stream, _, entry_id = entry.rpartition(" ")
        return stream, entry_id

    def read_events(
        self, consumer: str, count: int = 500, block_ms: int = 1000, group: str = keys.OPERATOR_GROUP
    ) -> list[tuple[str, JobEvent]]:
        """Events not yet handled by this group; pending ones (from a crashed reader) come first.

        An entry that does not parse is dead-lettered and acked here; it never reaches the caller. On a
        cluster every queue's events stream is read (one round trip per node), and ``block_ms`` is spent
        looking again every ``EVENTS_POLL_SECONDS``: one blocking read cannot span slots."""
        if not self.k.tagged:
            return self._read_events([keys.EVENTS_STREAM], consumer, count, block_ms, group)
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            streams = self._events_streams()
            got = self._read_events(streams, consumer, count, 0, group) if streams else []
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(min(EVENTS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def _read_events(
        self, streams: list[str], consumer: str, count: int, block_ms: int, group: str
    ) -> list[tuple[str, JobEvent]]:
        for stream in streams:
            self.ensure_group(stream, group)
            if self._reclaim_due(stream):
                # Events left unacked by a reader that died (an operator pod replaced under another name) move
                # to this reader, then come back below with the pending ones.
                self.r.xautoclaim(stream, group, consumer, self.visibility_ms, "0-0", count=count, justid=True)
        out: list[tuple[str, JobEvent]] = []
        for start, block in (("0", None), (">", block_ms if block_ms > 0 else None)):  # BLOCK 0 = forever
            if len(streams) == 1:
                replies = [self._xreadgroup(group, consumer, {streams[0]: start}, count, block)]
            else:  # a cluster's streams: one pipelined XREADGROUP each, never blocking

                def read(start: str = start) -> list[Any]:
                    pipe = self.r.pipeline(transaction=False)
                    for stream in streams:
                        pipe.xreadgroup(group, consumer, {stream: start}, count=count)
                    return list(pipe.execute())

                replies = retrying(self.r, read)
            seen = 0
            for reply in replies:
                for raw_stream, entries in _stream_items(reply):
                    stream = _s(raw_stream)
                    for entry_id, fields in entries:
                        seen += 1
                        if not fields:  # trimmed while pending
                            self.r.xack(stream, group, entry_id)
                            continue
                        f = decoded(fields)
                        try:
                            ev = JobEvent.model_validate_json(f.get(keys.EVENT_FIELD) or "")
                            out.append((self._entry(stream, _s(entry_id)), ev))
                        except (ValidationError, ValueError) as e:
                            quarantine(
                                self.r,
                                stream=stream,
                                group=group,
                                entry_id=_s(entry_id),
                                fields=f,
                                error=error_text(e),
                                kind="events",
                                delete=False,  # other readers (the API's progress streams) tail this stream
                                dead_letter=self.k.dead_letter(self.k.queue_of(stream) or ""),
                            )
            if out or seen:
                break
        return out

    def dead_letter_event(self, entry_id: str, event: JobEvent, error: str, group: str = keys.OPERATOR_GROUP) -> None:
        """An event that parsed but can never be applied (its status write is refused for good)."""
        stream, raw_id = self._split(entry_id)
        quarantine(
            self.r,
            stream=stream,
            group=group,
            entry_id=raw_id,
            fields={keys.EVENT_FIELD: event.model_dump_json(by_alias=True)},
            error=error,
            kind="events",
            delete=False,
            dead_letter=self.k.dead_letter(self.k.queue_of(stream) or ""),
        )

    def ack_events(self, entry_ids: list[str], group: str = keys.OPERATOR_GROUP) -> None:
        by_stream: dict[str, list[str]] = {}
        for entry in entry_ids:
            stream, entry_id = self._split(entry)
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            self.r.xack(stream, group, *ids)

    def trim_events(self, retention_seconds: float, now: float | None = None) -> int:
        """Drop events older than the retention that every consumer group has read and acked.

        Stream ids are millisecond timestamps, so XTRIM MINID trims by age; no entry a group still has to read
        or ack goes. Returns how many entries went."""
        now_ms = int((time.time() if now is None else now) * 1000)
        return sum(self._trim_events(stream, now_ms, retention_seconds) for stream in self._events_streams())

    def _trim_events(self, stream: str, now_ms: int, retention_seconds: float) -> int:
        keep_from = _id_tuple(f"{now_ms - int(retention_seconds * 1000)}-0")
        try:
            groups = self.r.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet
            return 0
        for g in groups:
            name = _s(_get(g, "name"))
            keep_from = min(keep_from, _after(_s(_get(g, "last-delivered-id") or "0-0")))
            keep_from = min(keep_from, self._oldest_pending(stream, name) or keep_from)
        return int(self.r.xtrim(stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False))

    def trim_queue(self, queue: str) -> int:
        """Drop acked entries a job stream still holds (written by a release that did not delete on ack)."""
        removed = 0
        for stream in self.k.streams(queue):
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
        for stream in self.k.streams(queue):
            self.ensure_group(stream)
            for g in self.r.xinfo_groups(stream):
                if _s(_get(g, "name")) != keys.WORKER_GROUP:
                    continue
                lag = _get(g, "lag")
                queued += int(lag) if lag is not None else 0
                in_flight += int(_get(g, "pending") or 0)
        return QueueStats(queued=queued, in_flight=in_flight)

    def worker_heartbeat(self, queue: str, worker: str, busy: bool) -> None:
        self.r.hset(self.k.workers(queue), worker, f"{'busy' if busy else 'idle'} {time.time():.3f}")

    def worker_gone(self, queue: str, worker: str) -> None:
        self.r.hdel(self.k.workers(queue), worker)
        self.r.hdel(self.k.worker_adapters(queue), worker)

    def report_adapters(self, queue: str, worker: str, names: list[str]) -> None:
        """The LoRA adapters ``worker`` holds loaded now (for the ModelDeployment's status)."""
        if names:
            self.r.hset(self.k.worker_adapters(queue), worker, ",".join(names))
        else:
            self.r.hdel(self.k.worker_adapters(queue), worker)

    def loaded_adapters(self, queue: str, live: Iterable[str]) -> dict[str, list[str]]:
        """Adapter -> the live workers holding it loaded; reports of workers no longer live are dropped."""
        live = set(live)
        found: dict[str, list[str]] = {}
        gone = []
        for worker, value in self.r.hgetall(self.k.worker_adapters(queue)).items():
            name = _s(worker)
            if name not in live:
                gone.append(worker)
                continue
            for adapter in filter(None, _s(value).split(",")):
                found.setdefault(adapter, []).append(name)
        if gone:
            self.r.hdel(self.k.worker_adapters(queue), *gone)
        return {a: sorted(ws) for a, ws in found.items()}

    def workers(self, queue: str, max_age: float = 15.0) -> dict[str, bool]:
        """Live workers of a queue (heartbeat within max_age seconds) and whether each is busy."""
        now = time.time()
        live: dict[str, bool] = {}
        stale = []
        for name, value in self.r.hgetall(self.k.workers(queue)).items():
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
            self.r.hdel(self.k.workers(queue), *stale)
        return live

    def dead_letters(self, count: int = 100) -> list[tuple[JobMessage, str]]:
        """Jobs that failed for good, with their error (oldest first)."""
        out = []
        for fields in self._dead_letter_entries(count):
            f = decoded(fields)
            if keys.MESSAGE_FIELD not in f:
                continue  # unreadable input: see poisoned()
            try:
                out.append((JobMessage.model_validate_json(f[keys.MESSAGE_FIELD]), f.get(keys.ERROR_FIELD, "")))
            except (ValidationError, ValueError):
                continue
        return out

    def _dead_letter_entries(self, count: int) -> list[Any]:
        """The oldest ``count`` dead-letter entries: of the one stream, or (cluster) of every queue's."""
        if not self.k.tagged:
            return [fields for _id, fields in self.r.xrange(keys.DEAD_LETTER_STREAM, count=count)]
        entries = [e for q in self.queues() for e in self.r.xrange(self.k.dead_letter(q), count=count)]
        entries += self.r.xrange(self.k.dead_letter(""), count=count)  # entries of no known queue
        return [fields for _id, fields in sorted(entries, key=_by_id)[:count]]

    def poisoned(self, count: int = 100) -> list[Poisoned]:
        """Entries no reader could parse, with where they came from and why (oldest first)."""
        out = []
        for fields in self._dead_letter_entries(count):
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


def _by_id(entry: tuple[Any, Any]) -> tuple[int, int]:
    return _id_tuple(_s(entry[0]))


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
