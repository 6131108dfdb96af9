"""Move rows from the outbox into PostgreSQL: the oldest first, a batch per transaction, deleted from the outbox
only once committed. PostgreSQL down: a pass fails (the supervised loop backs off and retries) and rows wait in
Redis; nothing else waits for them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from zimage_history import db, metrics, queries
from zimage_history.outbox import Outbox
from zimage_queue.supervise import backoff_seconds

log = logging.getLogger(__name__)


class HistoryWriter:
    def __init__(
        self,
        outbox: Outbox,
        engine: Engine,
        *,
        batch: int = 1000,
        retention_days: int | None = 90,
        usage_retention_days: int | None = 400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.engine = engine
        self.batch = batch
        self.retention_days = retention_days
        self.usage_retention_days = usage_retention_days
        self.clock = clock
        self.migrated = False
        self.next_purge = 0.0

    def write_some(self) -> int:
        """One batch: the number of outbox entries settled (0: the outbox is empty)."""
        if not self.migrated:
            db.migrate(self.engine)
            self.migrated = True
        ids, rows = self.outbox.oldest(self.batch)
        if not ids:
            metrics.OUTBOX_ROWS.set(0)
            return 0
        metrics.ROWS_DROPPED.inc(len(ids) - len(rows))
        with self.engine.begin() as conn:
            new = db.insert_rows(conn, rows)
        self.outbox.delete(ids)
        for r in new:
            metrics.count_usage(r.tenant, r.deployment, r.gpu_seconds, r.cost)
        metrics.ROWS_WRITTEN.inc(len(new))
        if rows:
            metrics.WRITE_LAG.set(max(0.0, self.clock() - max(r.finished_at for r in rows)))
        if len(ids) < self.batch:
            metrics.OUTBOX_ROWS.set(self.outbox.length())
        return len(ids)

    def purge(self) -> int:
        """Retention: rows (and hourly sums) past their days, in bounded batches, at most once an hour."""
        now = self.clock()
        if now < self.next_purge:
            return 0
        deleted = 0
        if self.retention_days is not None:
            before = datetime.fromtimestamp(now, UTC) - timedelta(days=self.retention_days)
            while True:
                with self.engine.begin() as conn:
                    n = queries.purge_some(conn, before)
                deleted += n
                if n < queries.ERASE_BATCH:
                    break
        if self.usage_retention_days is not None:
            with self.engine.begin() as conn:
                queries.purge_usage(conn, datetime.fromtimestamp(now, UTC) - timedelta(days=self.usage_retention_days))
        self.next_purge = now + 3600
        if deleted:
            log.info("history retention: deleted %d rows older than %d days", deleted, self.retention_days)
        return deleted


def run_in_thread(writer: HistoryWriter, stop: threading.Event, idle_seconds: float = 0.5) -> threading.Thread:
    """The writer's loop on a thread (the local stack; the operator runs it as a supervised task): batches back
    to back while rows wait, failures retried with backoff."""

    def loop() -> None:
        failures = 0
        while not stop.is_set():
            try:
                n = writer.write_some()
                if n < writer.batch:
                    writer.purge()
            except Exception as e:
                failures += 1
                log.warning("history writer: pass failed (%s: %s); retrying", type(e).__name__, e)
                stop.wait(backoff_seconds(failures))
                continue
            failures = 0
            if n < writer.batch:
                stop.wait(idle_seconds)

    thread = threading.Thread(target=loop, name="history-writer", daemon=True)
    thread.start()
    return thread
