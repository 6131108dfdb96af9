"""One tail of the workers' events stream per API process, fanned out to the requests waiting on a job.

The operator reads the same stream through its consumer group; a plain XREAD here takes nothing from it.
However many clients follow jobs, each API replica reads the stream once. On a Redis Cluster every queue has
its own events stream (``zimage_queue.keys.TAGGED``): the hub tails each of them, looking again every
``EVENTS_POLL_SECONDS`` when none had anything (one blocking read cannot span slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis

from zimage_queue import JobEvent, keys
from zimage_queue.clients import AsyncClient, is_cluster, unblocked
from zimage_queue.queue import EVENTS_POLL_SECONDS, QUEUES_REFRESH_SECONDS
from zimage_queue.supervise import backoff_seconds

log = logging.getLogger(__name__)
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})


class EventHub:
    def __init__(self, r: AsyncClient, block_ms: int = 1000) -> None:
        self.r: Any = r
        self.cluster = is_cluster(r)
        self._queues_read = -QUEUES_REFRESH_SECONDS
        self.block_ms = block_ms
        self._subs: dict[str, set[asyncio.Queue[JobEvent]]] = defaultdict(set)
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    def add_listener(self, fn: Callable[[JobEvent], None]) -> None:
        """Called for every event (local mode's stand-in for the operator)."""
        self._listeners.append(fn)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")
        await self._started.wait()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @asynccontextmanager
    async def subscribe(self, uid: str) -> AsyncIterator[asyncio.Queue[JobEvent]]:
        """Events for ``uid`` from now on, in stream order. Subscribe before reading a snapshot."""
        q: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subs[uid].add(q)
        try:
            yield q
        finally:
            self._subs[uid].discard(q)
            if not self._subs[uid]:
                del self._subs[uid]

    async def _last_id(self, stream: str) -> str:
        """Where "from now on" starts: the newest entry's id (XREAD with "$" would drop events between reads)."""
        newest = await self.r.xrevrange(stream, count=1)
        if not newest:
            return "0-0"
        entry_id = newest[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _streams(self, last: dict[str, str]) -> None:
        """Cluster: add the events streams of queues set up since the last look (read from their start: the
        queue is new, so is everything in its stream)."""
        now = asyncio.get_running_loop().time()
        if now - self._queues_read < QUEUES_REFRESH_SECONDS:
            return
        self._queues_read = now
        for raw in await self.r.smembers(keys.QUEUES):
            q = raw.decode() if isinstance(raw, bytes) else str(raw)
            last.setdefault(keys.TAGGED.events(q), "0-0")

    async def _read(self, last: dict[str, str]) -> list[Any]:
        if not self.cluster:
            try:
                return list(await self.r.xread(last, count=500, block=self.block_ms) or [])
            except redis.ResponseError as e:  # a failover cut the blocking read short: nothing was read
                if not unblocked(e):
                    raise
                return []
        await self._streams(last)
        replies = await asyncio.gather(*(self.r.xread({s: i}, count=500) for s, i in last.items()))
        got = [item for reply in replies for item in reply or []]
        if not got:
            await asyncio.sleep(EVENTS_POLL_SECONDS)
        return got

    async def _start(self) -> dict[str, str]:
        if not self.cluster:
            return {keys.EVENTS_STREAM: await self._last_id(keys.EVENTS_STREAM)}
        last: dict[str, str] = {}
        await self._streams(last)
        for stream in list(last):
            last[stream] = await self._last_id(stream)
        return last

    async def _run(self) -> None:
        last: dict[str, str] | None = None
        failures = 0
        while True:
            try:
                if last is None:
                    last = await self._start()
                    self._started.set()
                reply: Any = await self._read(last)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis restarting: keep trying, subscribers just wait
                failures += 1
                delay = backoff_seconds(failures, base=0.2, cap=10.0, jitter=random.random())
                log.warning("events stream unavailable (%s); retrying in %.1fs", e, delay)
                self._started.set()
                await asyncio.sleep(delay)
                continue
            failures = 0
            for raw_stream, batch in reply or []:
                stream = raw_stream.decode() if isinstance(raw_stream, bytes) else str(raw_stream)
                for entry_id, fields in batch:
                    last[stream] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    raw = fields.get(keys.EVENT_FIELD.encode()) or fields.get(keys.EVENT_FIELD)
                    try:
                        ev = JobEvent.model_validate_json(raw or b"")
                    except ValueError:
                        log.warning("skipping malformed event %s of %s", last[stream], stream)
                        continue
                    self._dispatch(ev)

    def _dispatch(self, ev: JobEvent) -> None:
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed on %s %s", ev.type, ev.uid)
        for q in self._subs.get(ev.uid, ()):
            q.put_nowait(ev)
