"""The custom resources' schemas, written once.

``crds/*.yaml`` is generated from these models (``python -m zimage_operator.crdgen``) and a test keeps the
committed YAML equal to the generated one; the operator and the API parse specs with the same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from zimage_queue.message import (
    DEFAULT_MAX_RETRIES,
    VARIANT_DEFAULTS,
    CamelModel,
    GenerationParams,
    Priority,
    ResultImage,
    VariantDefaults,
)

GROUP = "zimage.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
IMAGEJOB_PLURAL = "imagejobs"
MODELDEPLOYMENT_PLURAL = "modeldeployments"

Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})
Variant = Literal["turbo", "base", "edit"]


class Cond:
    """Condition types."""

    ACCEPTED = "Accepted"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class Reason:
    """Condition reasons (CamelCase, as Kubernetes conventions ask)."""

    MODEL_NOT_FOUND = "ModelNotFound"
    INVALID_SPEC = "InvalidSpec"
    ENQUEUED = "Enqueued"
    STARTED = "Started"
    COMPLETED = "Completed"
    TIMEOUT = "Timeout"
    RETRYING = "Retrying"
    WORKER_ERROR = "WorkerError"
    DELETED = "Deleted"
    CANCELLED = "Cancelled"


class ImageJobSpec(GenerationParams):
    model: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a ModelDeployment in the same namespace.",
    )
    priority: Priority = Field("normal", description="Queue priority.")
    timeout_seconds: int | None = Field(
        None, ge=1, le=86400, description="Fail the job (reason Timeout) if it has not finished by then."
    )
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0, le=20, description="Retries after a failed attempt.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the ImageJob this long after it finished."
    )


class Condition(CamelModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str
    observed_generation: int | None = None


class Progress(CamelModel):
    step: int = 0
    total_steps: int = 0
    summary: str = Field("", description="step/totalSteps, for the Progress printer column.")


class ImageJobStatus(CamelModel):
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    attempts: int | None = None
    worker: str | None = None
    progress: Progress | None = None
    seed: int | None = Field(None, description="The seed used (chosen when the spec gave none).")
    steps: int | None = Field(None, description="The steps used (the spec's, or the variant's default).")
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    queue_seconds: float | None = None
    run_seconds: float | None = None
    duration: str | None = Field(None, description="Run time of the finished job, for the Duration column.")
    results: list[ResultImage] | None = None
    message: str | None = Field(None, max_length=32768)


class ModelSource(CamelModel):
    variant: Variant = Field("turbo", description="Model variant; sets the generation defaults.")
    source: str = Field(
        "Tongyi-MAI/Z-Image-Turbo",
        min_length=1,
        max_length=1024,
        description="Hub id, a path under MODELS_DIR, or tiny-random.",
    )
    revision: str | None = Field(None, max_length=256)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class Scaling(CamelModel):
    mode: Literal["builtin", "external"] = "builtin"
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_queue_per_replica: int = Field(4, ge=1)
    activation_queue_length: int = Field(1, ge=1)
    scale_up_stabilization_seconds: int = Field(0, ge=0)
    scale_down_delay_seconds: int = Field(300, ge=0)
    poll_interval_seconds: int = Field(1, ge=1)


class Batching(CamelModel):
    max_batch_size: int = Field(1, ge=1, le=64)
    max_wait_milliseconds: int = Field(0, ge=0, le=10000)


class ModelDeploymentSpec(CamelModel):
    model: ModelSource = Field(default_factory=ModelSource)
    image: str = Field("ghcr.io/zimage-dev/zimage-worker:0.1.0", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    replicas: int | None = Field(None, ge=0, description="Used in external scaling mode (HPA/KEDA).")
    resources: dict[str, Any] | None = Field(None, description="Container resources; GPU as nvidia.com/gpu.")
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    batching: Batching | None = None
    scaling: Scaling | None = None


class ModelDeploymentStatus(CamelModel):
    replicas: int | None = None
    ready_replicas: int | None = None
    desired_replicas: int | None = None
    selector: str | None = None
    queue_length: int | None = None
    in_flight: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


def variant_defaults(variant: str | None) -> VariantDefaults:
    return VARIANT_DEFAULTS.get(variant or "turbo", VARIANT_DEFAULTS["turbo"])
