"""Prometheus metrics of usage and of the history writer."""

from prometheus_client import Counter, Gauge

GPU_SECONDS = Counter(
    "zimage_gpu_seconds", "GPU-seconds used by job attempts (a batch's time split by images)", ["tenant", "model"]
)
COST = Counter("zimage_cost", "Cost of job attempts, in the deployment's spec.cost currency", ["tenant", "model"])
ROWS_WRITTEN = Counter("zimage_history_rows_written_total", "Attempt outcomes inserted into the history store")
ROWS_DROPPED = Counter("zimage_history_rows_dropped_total", "Outbox entries that did not parse and were dropped")
OUTBOX_ROWS = Gauge("zimage_history_outbox_rows", "Rows waiting in Redis for the history store")
WRITE_LAG = Gauge(
    "zimage_history_write_lag_seconds", "Age of the newest row of the last batch written, when it was committed"
)


def count_usage(tenant: str, model: str, gpu_seconds: float, cost: float) -> None:
    GPU_SECONDS.labels(tenant, model).inc(gpu_seconds)
    COST.labels(tenant, model).inc(cost)
