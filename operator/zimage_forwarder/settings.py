"""Forwarder configuration, from ZIMAGE_* environment variables (the operator renders them; docs/architecture.md).

| Variable | Meaning |
|---|---|
| ``ZIMAGE_REDIS_URL``, ``ZIMAGE_REDIS_PASSWORD`` ... | the queue's Redis, as for workers |
| ``ZIMAGE_QUEUE`` | ``<namespace>/<ModelDeployment>``: the queue served, also the key pool's name |
| ``ZIMAGE_WORKER_NAME`` | this replica's consumer name (the pod's name) |
| ``ZIMAGE_STORAGE_URL`` | where returned images are stored (the workers' store) |
| ``ZIMAGE_REMOTE_API`` | ``chat`` (chat completions: text) or ``images`` (generations and edits) |
| ``ZIMAGE_REMOTE_BASE_URL`` | the provider's base URL, as the OpenAI SDK takes it (``https://api.openai.com/v1``) |
| ``ZIMAGE_REMOTE_MODEL`` | the provider's model name |
| ``ZIMAGE_REMOTE_KEYS_DIR`` | the keys Secret mounted as files: one file per key, its name the key's id |
| ``ZIMAGE_REMOTE_KEY_POOL`` | the key pool's name, ``<namespace>/<Secret>``: deployments sharing keys share limits |
| ``ZIMAGE_REMOTE_REQUESTS_PER_WINDOW``, ``ZIMAGE_REMOTE_WINDOW_SECONDS`` | per key: requests in any window |
| ``ZIMAGE_REMOTE_TOKENS_PER_WINDOW`` | per key: tokens in the same window (chat; empty: not counted) |
| ``ZIMAGE_REMOTE_CONCURRENCY`` | per key: requests in flight at once (empty: no limit) |
| ``ZIMAGE_REMOTE_TIMEOUT_SECONDS``, ``ZIMAGE_REMOTE_MAX_ATTEMPTS`` | per call; provider attempts per job |
| ``ZIMAGE_CONCURRENCY_PER_REPLICA`` | jobs this replica runs at once |
| ``ZIMAGE_FALLBACKS`` | JSON: ModelDeployments (same namespace) a failed job moves to, by failure class |

``ZIMAGE_FALLBACKS`` looks like ``{"unavailable": ["b", "local"], "rateLimited": ["b"], "failed": []}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from zimage_queue.clients import RedisAuthSettings


class ForwarderSettings(BaseSettings, RedisAuthSettings):
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_", env_parse_none_str="null", populate_by_name=True)

    redis_url: str = "redis://localhost:6379/0"
    queue: str = "default/remote"
    worker_name: str = "forwarder-0"
    storage_url: str = "file:///tmp/zimage-images"
    http_port: int = 8080
    visibility_ms: int = 30_000
    heartbeat_seconds: float = 5.0
    job_retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    concurrency_per_replica: int = Field(32, ge=1, le=1024)

    remote_api: Literal["chat", "images"] = "images"
    remote_base_url: str = "http://127.0.0.1:8000/v1"
    remote_model: str = ""
    remote_keys_dir: str = "/etc/zimage/provider-keys"
    remote_key_pool: str = ""  # default: the queue's name
    remote_requests_per_window: int | None = Field(None, ge=1)
    remote_window_seconds: float = Field(60.0, gt=0)
    # Added to the window the pool keeps: a call reaches the provider a moment after its key was granted, and
    # not always the same moment, so an exact window would now and then look one request too full over there.
    remote_window_margin_seconds: float = Field(0.25, ge=0)
    remote_tokens_per_window: int | None = Field(None, ge=1)
    remote_concurrency: int | None = Field(None, ge=1)
    remote_timeout_seconds: float = Field(120.0, gt=0)
    remote_max_attempts: int = Field(5, ge=1, le=50)
    # A key failing this many calls in a row (5xx, timeouts) rests this long (the circuit breaker).
    remote_bench_after_failures: int = Field(3, ge=1)
    remote_bench_seconds: float = Field(30.0, gt=0)
    fallbacks: dict[Literal["unavailable", "rateLimited", "failed"], list[str]] = Field(default_factory=dict)
