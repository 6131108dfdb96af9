"""Request and response bodies. Generation fields and their bounds come from the CRD's models (one source)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage_operator.types import Condition, ImageJobSpec, Phase, ScalingDecision
from zimage_queue.message import MAX_LORAS_PER_JOB, CamelModel, LoraRef, OutputFormat, Task

JobMode = Literal["imagejob", "bulk"]


class JobRequest(ImageJobSpec):
    """``POST /v1/jobs``: an ImageJob spec. ``model`` may be left out when the API has a default."""

    model: str = Field("", max_length=253, description="A ModelDeployment name (GET /v1/models).")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=30 * 86400)
    mode: JobMode | None = Field(
        None,
        description="imagejob: an ImageJob (kubectl sees it); bulk: no ImageJob, its state in Redis for the job "
        "retention. Default: the API key's (imagejob unless the key is a bulk key).",
    )


class Progress(CamelModel):
    step: int = 0
    total_steps: int = 0


class ImageLink(CamelModel):
    index: int
    url: str = Field(description="Signed, short-lived URL of the image; works without the API key.")
    width: int
    height: int
    seed: int
    sha256: str
    bytes: int


class Links(CamelModel):
    self_: str = Field(alias="self")
    events: str


class JobView(CamelModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    object: Literal["image.job"] = "image.job"
    mode: JobMode = Field("imagejob", description="imagejob: an ImageJob stands behind it; bulk: none does.")
    model: str
    phase: Phase
    reason: str | None = None
    message: str | None = None
    progress: Progress
    attempts: int | None = None
    seed: int | None = None
    created_at: str | None = None
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    queue_seconds: float | None = Field(None, description="From queued to the start of its last attempt.")
    run_seconds: float | None = None
    worker: str | None = Field(None, description="The worker (pod) that ran its last attempt.")
    gpu_seconds: float | None = Field(
        None, description="A job from the history: the GPU-seconds its last attempt used (its share of a batch)."
    )
    cost: float | None = Field(None, description="A job from the history: what its last attempt cost, in currency.")
    currency: str | None = Field(None, description="ISO 4217 code of cost (the ModelDeployment's spec.cost).")
    images: list[ImageLink] = Field(default_factory=list)
    adapters: list[LoraRef] | None = Field(
        None, description="The LoRA adapters it runs with, each scale resolved (the adapter's default where not given)."
    )
    request: dict[str, Any]
    links: Links


class JobList(CamelModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; absent at the end.")


UsageGroupBy = Literal["tenant", "model", "day"]


class UsageRow(CamelModel):
    key: str = Field(description="The tenant, the model (the ModelDeployment that ran the attempts) or the UTC day.")
    attempts: int = Field(description="Attempts that ended: retried, succeeded, failed or cancelled.")
    jobs: int = Field(description="Jobs that ended (succeeded, failed or cancelled).")
    succeeded: int
    images: int
    gpu_seconds: float
    cost: float


class UsageReport(CamelModel):
    """``GET /v1/usage``: sums of whole UTC hours (the hour ``from`` falls in is counted, ``to``'s is not)."""

    object: Literal["list"] = "list"
    from_: str = Field(alias="from")
    to: str
    group_by: UsageGroupBy
    data: list[UsageRow]
    currency: str | None = Field(None, description="ISO 4217 code of cost; absent while the history is empty.")


class HistoryErased(CamelModel):
    """``DELETE /v1/history``: what was deleted. The hourly usage sums (billing) stay: they hold no prompt or image."""

    tenant: str
    deleted_jobs: int = Field(description="Rows deleted: one per attempt outcome.")
    deleted_images: int = Field(description="Images the rows named in this API's storage, deleted.")
    complete: bool = Field(description="False: the request ran out of time first; send it again for the rest.")


class Limits(CamelModel):
    """The limits in force for a key: its own (its entry), else the API's defaults (ZIMAGE_API_RATE_PER_SECOND,
    ..._RATE_BURST, ..._MAX_CONCURRENT_JOBS)."""

    rate_per_second: float = Field(description="Requests per second (token bucket, per key).")
    burst: int = Field(description="Requests the bucket holds.")
    max_concurrent_jobs: int = Field(description="Jobs queued or running at once, per tenant.")


class PrincipalView(CamelModel):
    """``GET /v1/me``: the caller, as its API key makes it."""

    object: Literal["principal"] = "principal"
    key_id: str
    tenant: str
    admin: bool = Field(description="Sees every tenant's usage and history, and GET /v1/deployments.")
    mode: JobMode = Field(description="The key's default job mode (POST /v1/jobs without mode).")
    limits: Limits
    history: bool = Field(description="The API has a history store: GET /v1/usage, GET /v1/jobs?source=history.")
    uploads: bool = Field(description="The API has image storage: POST /v1/uploads, POST /v1/images/edits.")


UploadPurpose = Literal["image", "mask"]


class UploadView(CamelModel):
    """``POST /v1/uploads``: a stored image, for ``inputImage``, ``referenceImages`` (or ``maskImage``) of the
    caller's tenant's jobs."""

    object: Literal["upload"] = "upload"
    uri: str = Field(
        description="Pass as inputImage, one of referenceImages or maskImage to POST /v1/jobs (the same tenant's keys "
        "only)."
    )
    width: int
    height: int
    content_type: str = Field(description="image/png, image/jpeg or image/webp; a mask is always image/png.")
    bytes: int = Field(description="Size of the stored object.")
    purpose: UploadPurpose


class WorkerCounts(CamelModel):
    busy: int = Field(description="Workers holding a job.")
    idle: int = Field(description="Workers waiting for one.")


class ThroughputMinute(CamelModel):
    minute: str = Field(description="Start of the UTC minute (ISO 8601).")
    jobs: int = Field(description="Jobs that ended in it (succeeded, failed or cancelled).")
    images: int = Field(description="Images those jobs made.")


class DeploymentView(CamelModel):
    """A ModelDeployment's state for operators: its status, its queue and workers now, its recent throughput."""

    id: str
    variant: str
    replicas: int
    ready_replicas: int
    desired_replicas: int | None = Field(description="The scaler's latest decision (null before its first).")
    queue_length: int = Field(description="Jobs queued and not yet delivered to a worker (now).")
    in_flight: int = Field(description="Jobs delivered to a worker and not yet finished (now).")
    workers: WorkerCounts = Field(description="Workers whose heartbeat is fresh.")
    throughput: list[ThroughputMinute] = Field(description="The last 15 UTC minutes, oldest first (this one last).")
    conditions: list[Condition]
    scaling_history: list[ScalingDecision] = Field(description="The latest replica changes, oldest first.")


class DeploymentList(CamelModel):
    object: Literal["list"] = "list"
    data: list[DeploymentView]


class ModelView(BaseModel):
    """OpenAI's model object (snake_case, as OpenAI spells it), plus the pool's state. An alias (``dall-e-3``,
    ``turbo``, ...) is listed as the ModelDeployment it stands for, under its own id."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "zimage"
    alias_of: str | None = Field(None, description="For an alias: the ModelDeployment it stands for.")
    variant: str
    ready: bool
    ready_replicas: int
    replicas: int
    queue_length: int
    in_flight: int
    adapters: list[str] = Field(
        default_factory=list, description="The LoRA adapters jobs may name in loras (spec.adapters of the deployment)."
    )
    tasks: list[Task] | None = Field(
        None,
        description="The tasks its variant does (a job's task must be one of them). Null where the API does not "
        "judge: a remote or function pool, or a variant newer than this API (its workers judge).",
    )
    max_reference_images: int | None = Field(
        None,
        description="How many referenceImages a job with task edit may give it besides inputImage (0: none); null "
        "as for tasks.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelView]


# -- OpenAI images API -----------------------------------------------------------------------------------
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$"
# What current openai SDKs send. Honoured: output_format, size, response_format, stream. Accepted and ignored
# (docs/api.md says why): quality, style, moderation, output_compression, partial_images, input_fidelity, user,
# safety_identifier. Values outside these sets are a 400, as OpenAI answers them.
ResponseFormat = Literal["url", "b64_json"]
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
Style = Literal["vivid", "natural"]
# A Z-Image picture is opaque: "transparent" is refused rather than quietly not done.
Background = Literal["auto", "opaque"]
Moderation = Literal["auto", "low"]
InputFidelity = Literal["high", "low"]
BACKGROUND_DOC = "auto or opaque (ignored: images are opaque); transparent is refused."
PARTIAL_IMAGES_DOC = "0-3; no previews are sent: a stream carries the completed images only."
RESPONSE_FORMAT_DOC = "Default: b64_json for gpt-image-* model names (as OpenAI's), else url. Streams send b64_json."


class OpenAIGenerationRequest(BaseModel):
    """``POST /v1/images/generations``; fields OpenAI defines and Z-Image has no use for are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(None, max_length=253, description="A ModelDeployment or an alias (GET /v1/models).")
    n: int = Field(1, ge=1, le=8)
    size: str = Field("auto", pattern=SIZE_PATTERN, description="WIDTHxHEIGHT (multiples of 16, 64-2048) or auto.")
    response_format: ResponseFormat | None = Field(None, description=RESPONSE_FORMAT_DOC)
    output_format: OutputFormat | None = Field(None, description="png (default), jpeg or webp: the images' format.")
    output_compression: int | None = Field(None, ge=0, le=100, description="Ignored (jpeg/webp at quality 95).")
    quality: Quality | None = Field(None, description="Ignored: the model variant sets the steps.")
    style: Style | None = Field(None, description="Ignored.")
    background: Background | None = Field(None, description=BACKGROUND_DOC)
    moderation: Moderation | None = Field(None, description="Ignored.")
    stream: bool = Field(False, description="Server-Sent Events: image_generation.completed per image.")
    partial_images: int | None = Field(None, ge=0, le=3, description=PARTIAL_IMAGES_DOC)
    user: str | None = Field(None, max_length=256, description="Ignored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Ignored.")
    seed: int | None = Field(None, ge=0, le=2**53 - 1, description="Extension: a fixed seed.")
    negative_prompt: str | None = Field(None, max_length=4000, description="Extension.")
    steps: int | None = Field(None, ge=1, le=100, description="Extension: denoising steps.")
    loras: list[LoraRef] | None = Field(
        None,
        max_length=MAX_LORAS_PER_JOB,
        description="Extension: LoRA adapters of the model, [{name, scale}] (GET /v1/models lists them).",
    )


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT of the images.")
