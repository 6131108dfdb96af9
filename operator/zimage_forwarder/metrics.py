"""The forwarder's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

CALLS = Counter("zimage_forwarder_calls_total", "Provider calls by outcome", ["outcome"])
JOBS = Counter("zimage_forwarder_jobs_total", "Jobs by outcome", ["outcome"])
IN_FLIGHT = Gauge("zimage_forwarder_jobs_in_flight", "Jobs this replica is serving")
CALL_SECONDS = Histogram(
    "zimage_forwarder_call_duration_seconds",
    "Provider call latency",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120),
)
LOOP_LAG = Gauge("zimage_forwarder_event_loop_lag_seconds", "Worst event-loop lag over the last probe interval")
