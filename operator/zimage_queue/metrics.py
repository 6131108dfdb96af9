"""Prometheus metrics of the queue contract, shared by every process that reads a stream."""

from prometheus_client import Counter

POISON_ENTRIES = Counter(
    "zimage_queue_poison_entries_total",
    "Stream entries no reader could parse, moved to the dead-letter stream",
    ["stream"],  # job or events
)
LOOP_FAILURES = Counter(
    "zimage_background_loop_failures_total", "Failed passes of supervised background loops", ["loop"]
)
