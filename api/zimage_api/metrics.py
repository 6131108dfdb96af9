"""The API's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("zimage_api_requests_total", "HTTP requests by route and status code.", ["method", "route", "code"])
REQUEST_SECONDS = Histogram(
    "zimage_api_request_duration_seconds",
    "Time to answer an HTTP request (waiting /v1/images/* calls included).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
JOBS_SUBMITTED = Counter("zimage_api_jobs_submitted_total", "Jobs created through the API.", ["model"])
REJECTED = Counter("zimage_api_rejected_total", "Requests refused by a limit.", ["reason"])
