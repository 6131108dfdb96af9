"""Job history, usage and cost in PostgreSQL: one row per attempt outcome, kept beyond the life of its ImageJob.

- :mod:`zimage_history.schema`: the tables (the one source of truth; the Alembic migrations must agree, a test
  compares them).
- :mod:`zimage_history.rows`: a row from an ImageJob and a worker event, and its GPU-seconds and cost (pure).
- :mod:`zimage_history.outbox`: where the operator puts rows (a Redis stream), so a PostgreSQL outage never
  blocks a job and loses no row.
- :mod:`zimage_history.writer`: the loop that moves rows from the outbox into PostgreSQL in batches.
- :mod:`zimage_history.queries`: usage, job listing, erasure and retention.
- :mod:`zimage_history.db`: engines (timeouts) and migrations.
"""

from zimage_history.rows import HistoryRow

__all__ = ["HistoryRow"]
