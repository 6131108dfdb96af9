"""API configuration, from ZIMAGE_API_* environment variables (ZIMAGE_REDIS_URL is shared with the operator)."""

from __future__ import annotations

import re

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from zimage_history.quotas import TenantQuota
from zimage_queue.clients import RedisAuthSettings

_MODEL_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


class ApiSettings(BaseSettings, RedisAuthSettings):  # ZIMAGE_REDIS_PASSWORD, ... as the operator's
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_API_", populate_by_name=True)

    redis_url: str = Field(
        "redis://localhost:6379/0", validation_alias=AliasChoices("ZIMAGE_API_REDIS_URL", "ZIMAGE_REDIS_URL")
    )
    # The namespace whose ImageJobs and ModelDeployments the API serves; tenants are labels inside it.
    namespace: str = "default"
    # A directory with one file per key id (a Secret mounted as a volume; see zimage_api.apikeys).
    keys_dir: str = ""
    # Accepted in addition to keys_dir; `zimage serve` sets it so local mode works without a Secret.
    dev_key: str = ""
    dev_tenant: str = "dev"
    dev_admin: bool = False  # `zimage serve`: the dev key may see the console's Operate page and all usage
    storage_url: str = Field(
        "", validation_alias=AliasChoices("ZIMAGE_API_STORAGE_URL", "ZIMAGE_STORAGE_URL")
    )  # uploads go here; workers read them back
    default_model: str = ""  # for OpenAI requests without `model` (else: the only ModelDeployment there is)
    # Model names clients send -> ModelDeployment names, as JSON: {"dall-e-3": "z-image-base"}; over the built-in
    # ones (OpenAI's names -> the default model, turbo/base/edit -> a ModelDeployment of that variant); "" drops
    # one (zimage_api.aliases).
    model_aliases: dict[str, str] = Field(default_factory=dict)
    sync_timeout_seconds: float = 300.0  # how long /v1/images/* wait for the images
    max_upload_bytes: int = 20 * 1024 * 1024
    # The whole request body, however it is sent (Content-Length or chunked); 0: three uploads' worth (an edit
    # carries at most an image and a mask, and the form around them).
    max_request_bytes: int = Field(0, ge=0)
    max_upload_pixels: int = 4096 * 4096  # decompression-bomb guard, checked before any pixel is decoded
    rate_per_second: float = 10.0  # per API key, token bucket in Redis
    rate_burst: int = 20
    max_concurrent_jobs: int = 32  # per tenant: queued + running
    # Threads for the blocking calls (Redis, the Kubernetes client) of requests in flight at once.
    blocking_threads: int = Field(64, ge=4, le=512)
    job_ttl_seconds: int = 86400  # ttlSecondsAfterFinished of the ImageJobs the API creates
    # Bulk jobs (no ImageJob; see zimage_api.redis_store) live in Redis this long from their creation: the
    # operator's retention of job records (ZIMAGE_JOB_RETENTION_SECONDS, shared with the operator and workers).
    job_retention_seconds: int = Field(
        7 * 24 * 3600,
        ge=1,
        validation_alias=AliasChoices("ZIMAGE_API_JOB_RETENTION_SECONDS", "ZIMAGE_JOB_RETENTION_SECONDS"),
    )
    bulk_list_max: int = Field(10_000, ge=1)  # per tenant: the newest bulk jobs GET /v1/jobs can list
    url_signing_key: str = ""  # HMAC key of image URLs handed out (random per process when empty)
    url_ttl_seconds: int = 900
    public_url: str = ""  # base of absolute URLs in responses (default: the request's)
    page_size: int = 50
    # The web console at /ui/ (zimage_api.console); origins its pages may load images from besides this API's
    # (an object store's, when image links redirect to presigned URLs), e.g. ["https://s3.example.com"].
    console: bool = True
    console_image_origins: list[str] = Field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8080
    # The job history store (zimage_history; the operator writes it): GET /v1/usage, history in GET /v1/jobs.
    history_url: str = ""
    history_password: str = ""
    # GPU-second budgets per tenant, the operator's ZIMAGE_TENANT_QUOTAS: a tenant over one gets 429.
    tenant_quotas: dict[str, TenantQuota] = Field(default_factory=dict)

    @field_validator("model_aliases")
    @classmethod
    def _alias_targets(cls, v: dict[str, str]) -> dict[str, str]:
        for alias, target in v.items():
            if not alias or len(alias) > 253:
                raise ValueError(f"alias {alias!r}: 1 to 253 characters")
            if target and not _MODEL_NAME.fullmatch(target):
                raise ValueError(f"alias {alias!r}: {target!r} is not a ModelDeployment name (or '' to drop it)")
        return v

    @property
    def request_limit(self) -> int:
        return self.max_request_bytes or 3 * self.max_upload_bytes
