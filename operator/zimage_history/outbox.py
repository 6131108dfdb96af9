"""The operator's rows wait in Redis (``keys.HISTORY_OUTBOX``) until the writer has them in PostgreSQL.

Appending is one pipelined round trip with the tenant's daily usage counters (``keys.usage_day``), which the
GPU-second quotas read at admission without asking PostgreSQL, and the deployment's per-minute throughput
(``keys.throughput_minute``: jobs that ended, images made; ``throughput`` reads it back). The writer reads the
oldest rows, inserts them (idempotent per uid and attempt) and only then deletes them, so a writer that dies, or
two during a lease handover, repeat rows and lose none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from zimage_history import metrics
from zimage_history.rows import HistoryRow
from zimage_queue import keys
from zimage_queue.entries import text

log = logging.getLogger(__name__)


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")


def minute_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d%H%M")


class Outbox:
    def __init__(self, r: Any, maxlen: int = keys.HISTORY_OUTBOX_MAXLEN, store: bool = True) -> None:
        self.r = r
        self.maxlen = maxlen
        self.store = store  # False: no history store; only the usage counters are kept

    def put(self, rows: Iterable[HistoryRow]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for row in rows:
            if self.store:
                pipe.xadd(
                    keys.HISTORY_OUTBOX,
                    {keys.HISTORY_FIELD: row.model_dump_json(exclude_none=True)},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            key = keys.usage_day(row.tenant, day_of(row.finished_at))
            pipe.hincrbyfloat(key, keys.USAGE_GPU_SECONDS, row.gpu_seconds)
            pipe.hincrbyfloat(key, keys.USAGE_COST, row.cost)
            pipe.hincrby(key, keys.USAGE_IMAGES, row.images)
            pipe.hincrby(key, keys.USAGE_ATTEMPTS, 1)
            pipe.expire(key, keys.USAGE_DAY_TTL_SECONDS)
            if row.final:  # a job that ended (a retried attempt is no job yet)
                minute = keys.throughput_minute(row.namespace, row.deployment, minute_of(row.finished_at))
                pipe.hincrby(minute, keys.THROUGHPUT_JOBS, 1)
                pipe.hincrby(minute, keys.THROUGHPUT_IMAGES, row.images)
                pipe.expire(minute, keys.THROUGHPUT_TTL_SECONDS)
        pipe.execute()
        return len(rows)

    def record(self, rows: list[HistoryRow]) -> None:
        """Put the rows; with no history store, count their usage here (with one, the writer counts what it
        inserts, once per uid and attempt)."""
        self.put(rows)
        if not self.store:
            for r in rows:
                metrics.count_usage(r.tenant, r.deployment, r.gpu_seconds, r.cost)

    def oldest(self, count: int) -> tuple[list[str], list[HistoryRow]]:
        """Up to ``count`` rows from the front, with every entry id read (those that do not parse included:
        they are logged and deleted with the rest, never retried forever)."""
        ids: list[str] = []
        rows: list[HistoryRow] = []
        for entry_id, fields in self.r.xrange(keys.HISTORY_OUTBOX, count=count):
            ids.append(text(entry_id))
            raw = {text(k): v for k, v in fields.items()}.get(keys.HISTORY_FIELD)
            try:
                rows.append(HistoryRow.model_validate_json(raw if raw is not None else b""))
            except ValidationError as e:
                log.error("history outbox entry %s dropped: %s", text(entry_id), e)
        return ids, rows

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.r.xdel(keys.HISTORY_OUTBOX, *ids)

    def length(self) -> int:
        return int(self.r.xlen(keys.HISTORY_OUTBOX))


def usage_since(r: Any, tenant: str, days: list[str]) -> dict[str, float]:
    """A tenant's usage summed over the given days (``YYYYMMDD``), from the daily counters."""
    pipe = r.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(keys.usage_day(tenant, day))
    total = {keys.USAGE_GPU_SECONDS: 0.0, keys.USAGE_COST: 0.0, keys.USAGE_IMAGES: 0.0, keys.USAGE_ATTEMPTS: 0.0}
    for found in pipe.execute():
        for k, v in (found or {}).items():
            name = text(k)
            if name in total:
                total[name] += float(text(v))
    return total


@dataclass(frozen=True)
class Minute:
    start: datetime  # UTC
    jobs: int
    images: int


def throughput(r: Any, namespace: str, deployment: str, now: float, minutes: int = 15) -> list[Minute]:
    """Jobs that ended on a deployment and the images they made, per UTC minute: the ``minutes`` up to and with
    the one ``now`` falls in, oldest first, minutes without any included (zeros)."""
    last = datetime.fromtimestamp(now, UTC).replace(second=0, microsecond=0)
    starts = [last - timedelta(minutes=i) for i in range(minutes - 1, -1, -1)]
    pipe = r.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(keys.throughput_minute(namespace, deployment, start.strftime("%Y%m%d%H%M")))
    out = []
    for start, found in zip(starts, pipe.execute(), strict=True):
        counts = {text(k): int(text(v)) for k, v in (found or {}).items()}
        out.append(Minute(start, counts.get(keys.THROUGHPUT_JOBS, 0), counts.get(keys.THROUGHPUT_IMAGES, 0)))
    return out
