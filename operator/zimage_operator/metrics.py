"""Prometheus metrics of the operator."""

from prometheus_client import Counter

JOBS_ENQUEUED = Counter("zimage_operator_jobs_enqueued_total", "ImageJobs put on a model queue", ["model"])
JOBS_FINISHED = Counter(
    "zimage_operator_jobs_finished_total", "ImageJobs that reached a terminal phase", ["phase", "reason"]
)
STATUS_PATCHES = Counter("zimage_operator_status_patches_total", "ImageJob status patches from worker events", ["kind"])
