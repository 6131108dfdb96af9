"""Operator configuration, from ZIMAGE_* environment variables."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_")

    redis_url: str = "redis://localhost:6379/0"
    # Where an unknown model is re-checked, and how often timeouts and TTLs are looked at.
    model_recheck_seconds: float = 10.0
    housekeeping_seconds: float = 0.5
    progress_min_interval_seconds: float = 1.0
    events_block_ms: int = 1000
    consumer_name: str = ""  # defaults to the host name
    # What worker pods get: in a cluster the operator and the workers may reach Redis by different names.
    worker_redis_url: str = ""  # defaults to redis_url
    worker_storage_url: str = ""  # ZIMAGE_STORAGE_URL for pools whose spec has no storage
    # Worker pods get at least this long to finish the job in hand when stopped (terminationGracePeriodSeconds).
    max_job_seconds: int = 900
    pool_tick_seconds: float = 0.5
    lease_seconds: float = 5.0  # a standby replica takes over the loops this long after the leader stops
    drift_check_seconds: float = 5.0
