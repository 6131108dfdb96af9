"""Prometheus metrics of the operator."""

from prometheus_client import Counter, Gauge

JOBS_ENQUEUED = Counter("zimage_operator_jobs_enqueued_total", "ImageJobs put on a model queue", ["model"])
JOBS_FINISHED = Counter(
    "zimage_operator_jobs_finished_total", "ImageJobs that reached a terminal phase", ["phase", "reason"]
)
STATUS_CONFLICTS = Counter(
    "zimage_operator_status_conflicts_total", "ImageJob status writes refused on a stale resourceVersion, then redone"
)
EVENTS_DEAD_LETTERED = Counter(
    "zimage_operator_events_dead_lettered_total", "Worker events whose status write the API server refused for good"
)
RESYNCED = Counter(
    "zimage_operator_jobs_resynced_total", "Unfinished ImageJobs finished from the outcome kept in Redis", ["phase"]
)
EVENTS_RECORDED = Counter(
    "zimage_operator_kube_events_recorded_total", "Kubernetes Events recorded on ImageJobs", ["reason"]
)
EVENTS_DROPPED = Counter(
    "zimage_operator_kube_events_dropped_total", "Kubernetes Events not recorded (queue full, or refused)"
)
ADMISSIONS = Counter("zimage_operator_admissions_total", "ImageJob admission decisions", ["action"])
ADMISSION_BACKLOG = Gauge("zimage_operator_admission_backlog", "ImageJobs seen and waiting for admission")
STATUS_PATCHES = Counter("zimage_operator_status_patches_total", "ImageJob status patches from worker events", ["kind"])

QUEUE_LENGTH = Gauge("zimage_queue_length", "Jobs waiting in a model's queue", ["model"])
INFLIGHT = Gauge("zimage_inflight_jobs", "Jobs taken by a worker and not yet acknowledged", ["model"])
DESIRED_REPLICAS = Gauge("zimage_desired_replicas", "Worker replicas the scaler asks for", ["model"])
READY_REPLICAS = Gauge("zimage_ready_replicas", "Worker replicas ready", ["model"])
SCALE_DECISIONS = Counter("zimage_scale_decisions_total", "Replica changes by reason", ["model", "reason"])
STORED_OBJECTS_DELETED = Counter(
    "zimage_operator_stored_objects_deleted_total", "Images and uploads deleted past their retention", ["kind"]
)
