"""Request and response bodies. Generation fields and their bounds come from the CRD's models (one source)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage_operator.types import ImageJobSpec, Phase
from zimage_queue.message import CamelModel, OutputFormat

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
    run_seconds: float | None = None
    images: list[ImageLink] = Field(default_factory=list)
    request: dict[str, Any]
    links: Links


class JobList(CamelModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; absent at the end.")


class ModelView(BaseModel):
    """OpenAI's model object (snake_case, as OpenAI spells it), plus the pool's state."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "zimage"
    variant: str
    ready: bool
    ready_replicas: int
    replicas: int
    queue_length: int
    in_flight: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelView]


# -- OpenAI images API -----------------------------------------------------------------------------------
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$"


class OpenAIGenerationRequest(BaseModel):
    """``POST /v1/images/generations``; fields OpenAI defines and Z-Image has no use for are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(None, max_length=253)
    n: int = Field(1, ge=1, le=8)
    size: str = Field("auto", pattern=SIZE_PATTERN, description="WIDTHxHEIGHT (multiples of 16, 64-2048) or auto.")
    response_format: Literal["url", "b64_json"] = "url"
    output_format: OutputFormat | None = None
    quality: str | None = Field(None, max_length=32)
    style: str | None = Field(None, max_length=32)
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, le=2**53 - 1, description="Extension: a fixed seed.")
    negative_prompt: str | None = Field(None, max_length=4000, description="Extension.")
    steps: int | None = Field(None, ge=1, le=100, description="Extension: denoising steps.")


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
