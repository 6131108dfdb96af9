"""One leader for everything: the Redis lease follows kopf's peering.

With ``--peering``, kopf pauses every replica but the live one of the highest priority: only that one runs the
handlers, and the handlers are what feed the loops' books (pools, deadlines, the unfinished index). So a replica
may hold the loops' lease only while kopf lets it run handlers, judged from the same peering object by kopf's own
rule (``active``); the lease then fences its writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)
CACHE_SECONDS = 1.0


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def active(status: dict[str, Any] | None, priority: int, now: datetime) -> bool:
    """kopf's rule seen from a replica with ``priority``: it runs while no live peer has a higher priority and
    none but itself has the same one. A replica knows itself by its (random) priority."""
    same = 0
    for info in (status or {}).values():
        if not isinstance(info, dict):
            continue
        seen = _parse(info.get("lastseen"))
        if seen is None or seen + timedelta(seconds=int(info.get("lifetime") or 60)) <= now:
            continue  # dead
        theirs = int(info.get("priority") or 0)
        if theirs > priority:
            return False
        same += theirs == priority
    return same <= 1


class PeeringGate:
    """``active`` for this replica, from the peering object, read at most every CACHE_SECONDS."""

    def __init__(
        self, read: Callable[[], dict[str, Any] | None], priority: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.read = read
        self.priority = priority
        self.clock = clock
        self._cached: tuple[float, bool] | None = None
        self._lock = threading.Lock()  # the loops ask from their threads at once

    def __call__(self) -> bool:
        with self._lock:
            return self._verdict()

    def _verdict(self) -> bool:
        now = self.clock()
        if self._cached is None or now - self._cached[0] >= CACHE_SECONDS:
            obj = self.read()
            verdict = active((obj or {}).get("status"), self.priority, datetime.now(UTC))
            if self._cached is None or self._cached[1] != verdict:
                log.info(
                    "peering: this replica (priority %d) %s", self.priority, "may lead" if verdict else "stands by"
                )
            self._cached = (now, verdict)
        return self._cached[1]
