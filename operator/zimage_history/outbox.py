"""The operator's rows wait in Redis (``keys.HISTORY_OUTBOX``) until the writer has them in PostgreSQL.

Appending is one pipelined round trip with the tenant's daily usage counters (``keys.usage_day``), which the
GPU-second quotas read at admission without asking PostgreSQL, and the deployment's per-minute throughput
(``keys.throughput``, a ring of the last minutes: jobs that ended, images made; ``throughput`` reads it). The
writer reads the oldest rows, inserts them (idempotent per uid and attempt) and only then deletes them, so a
writer that dies, or two during a lease handover, repeat rows and lose none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from zimage_history import metrics
from zimage_history.rows import HistoryRow
from zimage_queue import keys
from zimage_queue.entries import text

log = logging.getLogger(__name__)


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")


# One job that ended, into its minute's slot of the deployment's ring (keys.throughput): a slot holding an older
# minute starts over, one holding a newer minute keeps it (the row came too late to be shown).
# ARGV: the slot's three field names (keys.THROUGHPUT_*, prefixed by the slot), the minute, the images, the TTL.
COUNT_MINUTE = """
local f_minute, f_jobs, f_images, minute = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local held = tonumber(redis.call('HGET', KEYS[1], f_minute) or '-1')
if minute < held then return 0 end
if minute > held then
  redis.call('HSET', KEYS[1], f_minute, minute, f_jobs, 0, f_images, 0)
end
redis.call('HINCRBY', KEYS[1], f_jobs, 1)
redis.call('HINCRBY', KEYS[1], f_images, ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""


def slot_fields(minute: int) -> tuple[str, str, str]:
    """The ring's fields of ``minute`` (since the epoch): its slot's minute, jobs and images."""
    slot = minute % keys.THROUGHPUT_SLOTS
    return f"{slot}:{keys.THROUGHPUT_MINUTE}", f"{slot}:{keys.THROUGHPUT_JOBS}", f"{slot}:{keys.THROUGHPUT_IMAGES}"


class Outbox:
    def __init__(self, r: Any, maxlen: int = keys.HISTORY_OUTBOX_MAXLEN, store: bool = True) -> None:
        self.r = r
        self.maxlen = maxlen
        self.store = store  # False: no history store; only the usage counters are kept
        self._count_minute: Any = None  # registered at the first put

    def put(self, rows: Iterable[HistoryRow]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        if self._count_minute is None:
            self._count_minute = self.r.register_script(COUNT_MINUTE)
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
                minute = int(row.finished_at // 60)
                self._count_minute(
                    keys=[keys.throughput(row.namespace, row.deployment)],
                    args=[*slot_fields(minute), minute, row.images, keys.THROUGHPUT_TTL_SECONDS],
                    client=pipe,
                )
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
    minutes = min(minutes, keys.THROUGHPUT_SLOTS)  # the ring holds no more
    ring = {text(k): int(text(v)) for k, v in r.hgetall(keys.throughput(namespace, deployment)).items()}
    last = int(now // 60)
    out = []
    for m in range(last - minutes + 1, last + 1):
        f_minute, f_jobs, f_images = slot_fields(m)
        here = ring.get(f_minute) == m
        jobs = ring.get(f_jobs, 0) if here else 0
        images = ring.get(f_images, 0) if here else 0
        out.append(Minute(datetime.fromtimestamp(m * 60, UTC), jobs, images))
    return out
