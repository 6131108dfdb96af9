"""One tail of the workers' events stream per API process, fanned out to the requests waiting on a job.

The operator reads the same stream through its consumer group; a plain XREAD here takes nothing from it.
However many clients follow jobs, each API replica reads the stream once.
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

import redis.asyncio as aioredis

from zimage_queue import JobEvent, keys
from zimage_queue.supervise import backoff_seconds

log = logging.getLogger(__name__)
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled"})


class EventHub:
    def __init__(self, r: aioredis.Redis, block_ms: int = 1000) -> None:
        self.r = r
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

    async def _last_id(self) -> str:
        """Where "from now on" starts: the newest entry's id (XREAD with "$" would drop events between reads)."""
        newest = await self.r.xrevrange(keys.EVENTS_STREAM, count=1)
        if not newest:
            return "0-0"
        entry_id = newest[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _run(self) -> None:
        last = None
        failures = 0
        while True:
            try:
                if last is None:
                    last = await self._last_id()
                    self._started.set()
                reply: Any = await self.r.xread({keys.EVENTS_STREAM: last}, count=500, block=self.block_ms)
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
            entries: list[tuple[Any, dict[Any, Any]]] = [e for _stream, batch in reply or [] for e in batch]
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                raw = fields.get(keys.EVENT_FIELD.encode()) or fields.get(keys.EVENT_FIELD)
                try:
                    ev = JobEvent.model_validate_json(raw or b"")
                except ValueError:
                    log.warning("skipping malformed event %s", last)
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
