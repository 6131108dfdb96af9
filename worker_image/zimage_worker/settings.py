"""Worker configuration, from ZIMAGE_* environment variables (the Deployment sets them)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from zimage_queue.clients import RedisAuthSettings
from zimage_queue.message import AdapterSpec
from zimage_worker.storage import HostList


def _default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings, RedisAuthSettings):  # ZIMAGE_REDIS_PASSWORD, ... (clients.py)
    model_config = SettingsConfigDict(env_prefix="ZIMAGE_")

    redis_url: str = "redis://localhost:6379/0"
    queue: str = Field("default/z-image-turbo", description="namespace/ModelDeployment whose jobs to serve")
    # diffusers: a model from model_source (tiny-random and noop included). function: a CPU step, no model.
    engine: Literal["diffusers", "function"] = "diffusers"
    function: str = Field("", description="The function engine's entry point: module:function or builtin:<name>")
    model_source: str = Field("tiny-random", description="MODELS_DIR name, local path, hub id, tiny-random, noop")
    models_dir: str | None = Field(None, validation_alias="MODELS_DIR")
    variant: str = "turbo"
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    storage_url: str = "file:///tmp/zimage-images"
    fetch_allowed_hosts: HostList = Field(
        default_factory=list,
        description="Hosts http(s) inputs may come from: comma-separated or JSON, *.domain for its subdomains. "
        "Empty: http(s) inputs are refused. Private, loopback and link-local addresses are refused regardless.",
    )
    http_port: int = 8080
    visibility_ms: int = 30_000
    # How long the Redis record of a job this worker finishes is kept (the operator sets its own retention here).
    job_retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    heartbeat_seconds: float = 5.0
    worker_name: str = Field(default_factory=_default_name)
    max_batch_size: int = Field(1, ge=1, le=64, description="Compatible jobs run as one pipeline call")
    max_wait_milliseconds: int = Field(0, ge=0, le=10_000, description="How long to wait to fill a batch")
    # Liveness fails when a pipeline call runs longer than base + step * (its steps over all images).
    stuck_base_seconds: float = Field(300.0, gt=0, description="Time budget of any pipeline call")
    # Liveness also fails after this many failed passes in a row of a loop (Redis gone for about a minute: a
    # restart reloads the model, so a blip must not cause one).
    loop_max_failures: int = Field(10, ge=1, description="Failed passes in a row before /healthz fails")
    stuck_step_seconds: float = Field(30.0, gt=0, description="Extra budget per denoising step of a call")
    warmup: bool = Field(True, description="Run a throwaway generation before /readyz turns true")
    warmup_size: int = Field(0, ge=0, le=2048, description="Warm-up image side; 0: 1024, or 64 for tiny-random")
    compile: bool = Field(False, description="torch.compile the transformer's repeated blocks (regional)")
    attention_backend: str | None = Field(None, description="diffusers attention backend, e.g. flash, _native_cudnn")
    # LoRA adapters (issue 19): the ModelDeployment's spec.adapters, as a JSON list (camelCase, as in the spec).
    adapters: list[AdapterSpec] = Field(
        default_factory=list, description="LoRA adapters jobs may name: [{name, source, weightName, defaultScale}]"
    )
    max_resident_adapters: int = Field(4, ge=1, le=64, description="Adapters kept loaded; least recently used go")
    adapter_cache_dir: str | None = Field(None, description="Where file:// and s3:// adapters are fetched to")
    # Among the jobs it holds, a worker runs those of the adapter set already active first, but defers none of
    # them longer than this or past ADAPTER_AFFINITY_MAX_PASSES other calls (0: no reordering, no read-ahead).
    adapter_affinity_max_wait_ms: int = Field(2000, ge=0, le=60_000, description="Longest deferral of a job")
    adapter_affinity_max_passes: int = Field(4, ge=1, le=64, description="Most calls that may run before a job")

    @model_validator(mode="after")
    def _function_named(self) -> WorkerSettings:
        if self.engine == "function" and not self.function:
            raise ValueError(
                "ZIMAGE_FUNCTION (module:function or builtin:<name>) is required with ZIMAGE_ENGINE=function"
            )
        return self
