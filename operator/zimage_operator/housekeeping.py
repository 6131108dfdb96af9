"""timeoutSeconds and ttlSecondsAfterFinished without a kopf timer per job.

kopf timers put a finalizer on every object, so deleting an ImageJob (or its namespace) would hang whenever
the operator is down. Instead a watch handler records each job's next deadline here and one loop per
operator acts on the due ones.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from zimage_operator.conditions import parse_iso
from zimage_operator.types import TERMINAL_PHASES

Action = Literal["timeout", "expire"]


@dataclass(frozen=True)
class Due:
    action: Action
    namespace: str
    name: str
    uid: str


def ttl_after_finished(spec: dict[str, Any], default: int | None) -> int | None:
    """The job's own ttlSecondsAfterFinished, else the operator's default (a chart value)."""
    ttl = spec.get("ttlSecondsAfterFinished")
    return default if ttl is None else int(ttl)


def next_deadline(body: dict[str, Any], default_ttl: int | None = None) -> tuple[datetime, Action] | None:
    spec, status, meta = body.get("spec") or {}, body.get("status") or {}, body.get("metadata") or {}
    if status.get("phase") in TERMINAL_PHASES:
        finished = parse_iso(status.get("finishedAt"))
        ttl = ttl_after_finished(spec, default_ttl)
        if ttl is None or finished is None:
            return None
        return finished + timedelta(seconds=ttl), "expire"
    created = parse_iso(meta.get("creationTimestamp"))
    limit = spec.get("timeoutSeconds")
    if not limit or created is None:
        return None
    return created + timedelta(seconds=limit), "timeout"


@dataclass
class Deadlines:
    """Latest deadline per job uid; stale heap entries are skipped when popped, and the heap is rebuilt when
    they outnumber the live ones (a standby replica observes every job but never pops)."""

    default_ttl: int | None = None
    _by_uid: dict[str, tuple[datetime, Action, str, str]] = field(default_factory=dict)
    _heap: list[tuple[datetime, str]] = field(default_factory=list)

    def observe(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        nd = next_deadline(body, self.default_ttl)
        if nd is None:
            self._by_uid.pop(uid, None)
            return
        when, action = nd
        if self._by_uid.get(uid, (None, None))[:2] != (when, action):
            self._by_uid[uid] = (when, action, meta["namespace"], meta["name"])
            heapq.heappush(self._heap, (when, uid))
            self._compact()

    def forget(self, uid: str) -> None:
        self._by_uid.pop(uid, None)
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._by_uid) + 64:
            self._heap = [(when, uid) for uid, (when, *_rest) in self._by_uid.items()]
            heapq.heapify(self._heap)

    @property
    def heap_size(self) -> int:
        return len(self._heap)

    def due(self, now: datetime) -> list[Due]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, uid = heapq.heappop(self._heap)
            entry = self._by_uid.get(uid)
            if entry is None or entry[0] != when:
                continue  # superseded by a later observation
            del self._by_uid[uid]
            out.append(Due(entry[1], entry[2], entry[3], uid))
        return out

    def __len__(self) -> int:
        return len(self._by_uid)

    def retry_later(self, due: Due, now: datetime, delay: float = 5.0) -> None:
        when = now + timedelta(seconds=delay)
        self._by_uid[due.uid] = (when, due.action, due.namespace, due.name)
        heapq.heappush(self._heap, (when, due.uid))
