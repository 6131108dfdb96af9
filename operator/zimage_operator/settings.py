"""Operator configuration, from ZIMAGE_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from zimage_history.quotas import TenantQuota
from zimage_operator.types import DEFAULT_FORWARDER_IMAGE
from zimage_queue.clients import RedisAuthSettings


class OperatorSettings(BaseSettings, RedisAuthSettings):  # ZIMAGE_REDIS_PASSWORD, ... (clients.py)
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_parse_none_str="null")

    redis_url: str = "redis://localhost:6379/0"
    # Where an unknown model is re-checked, and how often timeouts and TTLs are looked at.
    model_recheck_seconds: float = 10.0
    housekeeping_seconds: float = 0.5
    progress_min_interval_seconds: float = 1.0
    events_block_ms: int = 1000
    # Events a replica read but never acked (it died) move to another replica after this long.
    events_reclaim_seconds: float = Field(30.0, ge=1)
    consumer_name: str = ""  # defaults to the host name
    # What worker pods get: in a cluster the operator and the workers may reach Redis by different names.
    worker_redis_url: str = ""  # defaults to redis_url
    # Worker pods get the operator's Redis password (and CA) from a Secret, never as a value: in the operator's
    # namespace from these (the chart's); elsewhere from a copy the operator keeps in the pool's namespace.
    worker_redis_secret: str = ""
    worker_redis_secret_key: str = "redis-password"
    worker_redis_ca_secret: str = ""
    worker_redis_ca_secret_key: str = "ca.crt"
    worker_storage_url: str = ""  # ZIMAGE_STORAGE_URL for pools whose spec has no storage
    # The chart's image volume (storage.mode=volume): a PersistentVolumeClaim in the operator's namespace that
    # workers of pools there mount at worker_storage_mount_path (their ZIMAGE_STORAGE_URL points into it).
    worker_storage_claim: str = ""
    operator_namespace: str = ""  # where the claim lives (the chart sets it from the pod's namespace)
    worker_storage_mount_path: str = "/var/lib/zimage/images"
    # A Secret (in each pool's namespace) whose keys become the workers' environment: the store's credentials
    # (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...). Optional in the pod: a pool without it uses its identity.
    worker_storage_secret: str = ""
    # The image of remote pools' forwarder pods (zimage-forwarder): the operator's own, which the chart sets here.
    forwarder_image: str = DEFAULT_FORWARDER_IMAGE
    # Image retention: the store the operator sweeps (default: worker_storage_url), how long job images and
    # uploads are kept (None: forever), and how often it looks. Only the replica holding the lease sweeps.
    storage_url: str = ""
    image_retention_seconds: int | None = Field(7 * 24 * 3600, ge=3600)
    upload_retention_seconds: int | None = Field(7 * 24 * 3600, ge=3600)
    retention_interval_seconds: float = Field(3600.0, gt=0)
    # Worker pods get at least this long to finish the job in hand when stopped (terminationGracePeriodSeconds).
    max_job_seconds: int = 900
    pool_tick_seconds: float = 0.5
    peering_lifetime_seconds: int = Field(15, ge=5)  # kopf peering (--peering): how long a replica's claim lasts
    lease_seconds: float = 5.0  # a standby replica takes over the loops this long after the leader stops
    drift_check_seconds: float = 5.0
    # Unfinished ImageJobs are compared with the outcomes Redis keeps: this long after becoming leader, then
    # every resync_seconds.
    resync_first_seconds: float = 3.0
    resync_seconds: float = 30.0
    # Retention. Finished (and cancelled, timed-out, deleted) jobs' Redis records live this long; events are
    # trimmed this long after every reader has acked them; a finished ImageJob without its own
    # ttlSecondsAfterFinished is deleted this long after it finished (None: kept until deleted).
    job_retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    events_retention_seconds: float = Field(600.0, ge=0)
    events_trim_seconds: float = 10.0
    default_ttl_seconds_after_finished: int | None = Field(86400, ge=0)
    # Liveness turns red when a background loop fails this many passes in a row, or finishes none for this long.
    loop_max_failures: int = Field(5, ge=1)
    loop_stall_seconds: float = Field(300.0, gt=0)
    # Sharded operators (docs/scaling.md): this process's shard, which names its events consumer group, its
    # Redis lease and its peering object; and the label selector of the ImageJobs and ModelDeployments it owns
    # within its namespaces. Both empty: one operator (with its replicas) for everything.
    shard: str = Field("", pattern=r"^([a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?)?$")
    shard_selector: str = ""
    # Throughput: ImageJobs admitted at once, and jobs whose worker events are applied at once (one status write
    # each); Normal Kubernetes Events (Enqueued, Started, Completed) besides the Warnings.
    admission_concurrency: int = Field(32, ge=1, le=512)
    events_concurrency: int = Field(32, ge=1, le=512)
    normal_events: bool = False
    # Job history, usage and cost (zimage_history, docs/history.md): a PostgreSQL URL (no password in it; the
    # password from its own Secret key), how long rows and hourly usage sums are kept (None: forever), and the
    # writer's batch. Empty URL: no history store (usage counters and GPU-second quotas still work, from Redis).
    history_url: str = ""
    history_password: str = ""
    history_retention_days: int | None = Field(90, ge=1)
    history_usage_retention_days: int | None = Field(400, ge=1)
    history_batch: int = Field(1000, ge=1, le=10_000)
    history_flush_seconds: float = Field(0.5, gt=0)
    # GPU-second budgets per tenant, JSON: {"team-a": {"gpuSecondsPerDay": 3600, "gpuSecondsPerMonth": 60000}}
    # ("*": every tenant not named). An ImageJob made with kubectl over its tenant's budget fails
    # (GPUQuotaExceeded); the API refuses its requests with 429 (ZIMAGE_API_TENANT_QUOTAS, the same JSON).
    tenant_quotas: dict[str, TenantQuota] = Field(default_factory=dict)
