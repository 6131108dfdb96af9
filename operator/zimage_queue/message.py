"""The job message and the worker events: the wire format between operator, API and worker.

Field constraints here are the single source of truth for generation parameters: the ImageJob CRD schema is
generated from these models (see zimage_operator.crdgen) and the API validates requests with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticKnownError

Task = Literal["text-to-image", "image-to-image", "inpaint", "edit"]
Priority = Literal["high", "normal", "low"]
OutputFormat = Literal["png", "jpeg", "webp"]
EventType = Literal["started", "progress", "succeeded", "failed", "retrying", "cancelled", "rerouted"]

DEFAULT_MAX_RETRIES = 3

# Reference images (issue 19): an `edit` job conditions on its inputImage and, on an omni model, on up to this many
# further images besides it.
MAX_REFERENCE_IMAGES = 3


@dataclass(frozen=True)
class VariantDefaults:
    """What a model variant does: its generation defaults, the tasks it accepts and how many reference images
    (``referenceImages``, besides ``inputImage``) an edit may give it. The single source of truth for the
    operator's admission, the API, the CRD's descriptions and the worker."""

    steps: int
    guidance_scale: float
    tasks: tuple[str, ...] = ("text-to-image", "image-to-image", "inpaint")
    references: int = 0
    summary: str = ""


# Turbo is distilled for 8 transformer evaluations without classifier-free guidance. The undistilled models use
# 50 steps with the guidance Z-Image's model card recommends (the pipeline's own default is 5.0). The operator
# resolves these into the job message; the worker falls back to them for messages that leave them open.
# Edit and omni run diffusers' ZImageOmniPipeline (reference images in, image out: the images condition the
# transformer through their VAE latents and SigLIP features, instead of starting the denoising from one as
# image-to-image does). Edit is an instruction edit of one image; omni also makes images from text alone and
# takes further reference images.
VARIANT_DEFAULTS = {
    "turbo": VariantDefaults(steps=8, guidance_scale=0.0, summary="Z-Image-Turbo: 8 steps, no guidance"),
    "base": VariantDefaults(steps=50, guidance_scale=4.0, summary="Z-Image: 50 steps with guidance"),
    "edit": VariantDefaults(
        steps=50, guidance_scale=4.0, tasks=("edit",), summary="Z-Image-Edit: inputImage edited as the prompt says"
    ),
    "omni": VariantDefaults(
        steps=50,
        guidance_scale=4.0,
        tasks=("text-to-image", "edit"),
        references=MAX_REFERENCE_IMAGES,
        summary=f"Z-Image-Omni: text to image, or an edit of inputImage with up to {MAX_REFERENCE_IMAGES} "
        "referenceImages",
    ),
}
# The variants that run ZImageOmniPipeline (reference images in, image out).
OMNI_VARIANTS = frozenset(v for v, d in VARIANT_DEFAULTS.items() if "edit" in d.tasks)


def variant_help() -> str:
    """What each variant accepts, in one line: for the CRD's and the API's descriptions."""
    return "; ".join(f"{v}: {', '.join(d.tasks)} ({d.summary})" for v, d in VARIANT_DEFAULTS.items())


# An object-store URI: s3://bucket/key, file:///path, or http(s)://...
URI_PATTERN = r"^(s3|file|https?)://.+$"

# A function step's argument (GenerationParams.args): a scalar or a list of scalars. The CRD states it as an object
# of any fields (a structural schema has no unions); the operator and the API validate the values with pydantic.
StepScalar = Annotated[str, Field(max_length=2048)] | bool | int | float
StepArgs = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=63)],
        StepScalar | Annotated[list[StepScalar], Field(max_length=64)],
    ],
    Field(max_length=32),
    WithJsonSchema({"type": "object", "additionalProperties": True}),
]


# LoRA adapters (issue 19): a job names up to MAX_LORAS_PER_JOB of its ModelDeployment's adapters, each with a
# scale. Their names are the keys of the deployment's spec.adapters; workers get that list as ZIMAGE_ADAPTERS.
ADAPTER_NAME = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
MAX_LORAS_PER_JOB = 8  # the schema's bound; a deployment may allow fewer (spec.maxAdaptersPerJob, default 3)
LORA_SCALE_BOUND = 8.0
# Where fetched adapters (file://, s3://) lie on the model cache volume, under MODELS_DIR: the preload Job puts
# them there and the operator points the workers' ZIMAGE_ADAPTER_CACHE_DIR at it. Hidden, so it never shadows a
# model directory name.
ADAPTER_CACHE = ".adapters"


class CamelModel(BaseModel):
    """Kubernetes objects are camelCase; Python code uses snake_case. Both spellings are accepted."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, object]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class WireModel(CamelModel):
    """What travels through Redis between processes of different releases: unknown fields are ignored, so
    operator N reads what workers N+1 write (and the reverse) during a rolling upgrade."""

    model_config = ConfigDict(extra="ignore")


class LoraRef(WireModel):
    """One adapter a job asks for, by the name its ModelDeployment gives it, at a scale."""

    name: str = Field(min_length=1, max_length=63, pattern=ADAPTER_NAME, description="An adapter of the model.")
    scale: float | None = Field(
        None,
        ge=-LORA_SCALE_BOUND,
        le=LORA_SCALE_BOUND,
        description="How strongly it applies (0: not at all); default: the adapter's defaultScale, else 1.",
    )


class AdapterSpec(WireModel):
    """One LoRA adapter a ModelDeployment serves (its spec.adapters[]); workers get the list as ZIMAGE_ADAPTERS."""

    name: str = Field(min_length=1, max_length=63, pattern=ADAPTER_NAME, description="What jobs call it.")
    source: str = Field(
        min_length=1,
        max_length=2048,
        description="A path (absolute, or under the model cache MODELS_DIR), an object-store URI (s3://, file://) "
        "or a Hugging Face hub id (owner/name, loaded at run time), holding LoRA weights in the diffusers format.",
    )
    weight_name: str | None = Field(
        None, max_length=253, description="The weights file inside source, when it holds several."
    )
    default_scale: float = Field(
        1.0, ge=-LORA_SCALE_BOUND, le=LORA_SCALE_BOUND, description="The scale of a job that gives none."
    )


class GenerationParams(WireModel):
    task: Task = Field(
        "text-to-image",
        description=f"What to generate; the model's variant says which tasks it does ({variant_help()}).",
    )
    prompt: str = Field(min_length=1, max_length=4000, description="Text prompt.")
    negative_prompt: str | None = Field(None, max_length=4000, description="What the image should not show.")
    width: int = Field(1024, ge=64, le=2048, multiple_of=16, description="Image width in pixels.")
    height: int = Field(1024, ge=64, le=2048, multiple_of=16, description="Image height in pixels.")
    steps: int | None = Field(
        None, ge=1, le=100, description="Denoising steps; default from the model variant (Turbo: 8)."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=20, description="Classifier-free guidance; default from the model variant (Turbo: 0)."
    )
    seed: int | None = Field(None, ge=0, le=2**53 - 1, description="Random seed; chosen and recorded when omitted.")
    num_images: int = Field(1, ge=1, le=8, description="Images to generate.")
    input_image: str | None = Field(
        None, max_length=2048, pattern=URI_PATTERN, description="Source image URI (image-to-image, inpaint, edit)."
    )
    mask_image: str | None = Field(
        None, max_length=2048, pattern=URI_PATTERN, description="Mask image URI (inpaint; white = repaint)."
    )
    reference_images: list[Annotated[str, Field(max_length=2048, pattern=URI_PATTERN)]] | None = Field(
        None,
        max_length=MAX_REFERENCE_IMAGES,
        description="Further images an edit conditions on besides inputImage (task edit on an omni model).",
    )
    strength: float | None = Field(None, ge=0, le=1, description="How far to move from the input image.")
    output_format: OutputFormat = Field("png", description="Encoding of the stored images.")
    # Newer than the rest: written only when set, so a release before it still reads every other job's message.
    args: StepArgs | None = Field(
        None,
        description="Arguments of a function step (backend function), by name: a string, number, boolean or list "
        "of them; a string that is an image URI is read as an input.",
    )

    loras: list[LoraRef] | None = Field(
        None,
        max_length=MAX_LORAS_PER_JOB,
        description="LoRA adapters of the ModelDeployment to apply, each at a scale (spec.adapters there).",
    )

    # Optional fields written only when set (their wire names), as in BulkMarked.
    only_when_set: ClassVar[tuple[str, ...]] = ("args", "loras", "referenceImages")

    @model_serializer(mode="wrap")
    def _only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        for name in self.only_when_set:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @field_validator("width", "height", mode="before")
    @classmethod
    def _bounds_before_multiple(cls, v: object, info: ValidationInfo) -> object:
        """The field's own bounds, checked first: pydantic tries multiple_of before ge/le, and "a multiple of 16"
        is no answer to a width of 99999."""
        if isinstance(v, int | float) and not isinstance(v, bool) and info.field_name:
            for bound in cls.model_fields[info.field_name].metadata:
                if isinstance(bound, annotated_types.Ge) and v < bound.ge:  # type: ignore[operator]
                    raise PydanticKnownError("greater_than_equal", {"ge": bound.ge})
                if isinstance(bound, annotated_types.Le) and v > bound.le:  # type: ignore[operator]
                    raise PydanticKnownError("less_than_equal", {"le": bound.le})
        return v

    def steps_and_guidance(self, defaults: VariantDefaults) -> tuple[int, float]:
        """The steps and guidance scale this job runs with: its own, or its model variant's defaults."""
        steps = self.steps if self.steps is not None else defaults.steps
        guidance = self.guidance_scale if self.guidance_scale is not None else defaults.guidance_scale
        return steps, guidance

    def cross_field_errors(self) -> list[str]:
        """Rules a structural schema cannot express; checked by the operator (Failed condition) and the API."""
        errors = []
        if self.task in ("image-to-image", "inpaint") and not self.input_image:
            errors.append(f"spec.inputImage: required when task is {self.task}")
        if self.task == "inpaint" and not self.mask_image:
            errors.append("spec.maskImage: required when task is inpaint")
        if self.task == "edit" and not self.input_image:
            errors.append("spec.inputImage: required when task is edit (the image to edit)")
        if self.task == "text-to-image" and (self.input_image or self.mask_image):
            errors.append("spec.inputImage/maskImage: only allowed for image-to-image, inpaint and edit")
        if self.task == "edit" and self.mask_image:
            errors.append("spec.maskImage: only allowed for inpaint (an edit says in its prompt what to change)")
        if self.task == "edit" and self.strength is not None:
            errors.append("spec.strength: only for image-to-image and inpaint (an edit is not a partial re-noising)")
        if self.reference_images and self.task != "edit":
            errors.append("spec.referenceImages: only allowed when task is edit")
        names = [lora.name for lora in self.loras or []]
        if len(set(names)) != len(names):
            errors.append("spec.loras: each adapter at most once")
        return errors

    def variant_errors(self, variant: str | None) -> list[str]:
        """What a model of ``variant`` cannot do of this job (its task, its reference images): the operator fails
        the ImageJob with reason UnsupportedTask, the API answers 400 unsupported_task."""
        name = variant or "turbo"
        defaults = VARIANT_DEFAULTS.get(name)
        if defaults is None:
            return []  # a variant newer than this release: its workers judge
        errors = []
        if self.task not in defaults.tasks:
            tasks = " and ".join(filter(None, [", ".join(defaults.tasks[:-1]), defaults.tasks[-1]]))
            errors.append(f"spec.task: the {name} variant does {tasks}, not {self.task}")
        refs = len(self.reference_images or [])
        if refs > defaults.references:
            allowed = f"at most {defaults.references}" if defaults.references else "none"
            errors.append(f"spec.referenceImages: the {name} variant takes {allowed}, got {refs}")
        return errors

    def adapter_set(self) -> tuple[tuple[str, float | None], ...]:
        """The adapters and scales as one comparable value (order does not change the result): jobs batch only
        with jobs of the same set."""
        return tuple(sorted((lora.name, lora.scale) for lora in self.loras or []))


class BulkMarked(WireModel):
    """Carries ``bulk`` only when it is set: a release before the marker refuses unknown fields, so what every
    non-bulk job writes stays readable by it during a rolling upgrade."""

    bulk: bool = False
    # Newer optional fields, written only when set for the same reason (their wire names).
    only_when_set: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _bulk_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        if not self.bulk:
            data.pop("bulk", None)
        for name in self.only_when_set:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class JobMessage(BulkMarked):
    """What goes on a model's stream. Everything a worker needs; nothing it must look up elsewhere."""

    only_when_set: ClassVar[tuple[str, ...]] = ("fallbackChain",)

    uid: str = Field(min_length=1)
    namespace: str
    name: str
    # Whose storage prefix the job writes to and reads inputs from; empty: the namespace is the tenant.
    tenant: str = Field("", max_length=63, pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
    queue: str
    params: GenerationParams
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0, le=20)
    timeout_seconds: int | None = Field(None, ge=1)
    enqueued_at: float = Field(default_factory=time.time)
    # Where a job goes next when its deployment fails it (fallbacks by failure class): set when it first moves to
    # a fallback, the rest of the first deployment's list; [] when none is left. Written only when set.
    fallback_chain: list[str] | None = Field(None, max_length=5)
    # bulk (BulkMarked): a job of the API's bulk mode, with no ImageJob behind it, its state in Redis only.
    # Workers copy it into their events, so the operator skips them without asking the API server for a job
    # that is not there.

    @model_validator(mode="after")
    def _resolved(self) -> JobMessage:
        # The operator resolves defaults before enqueueing, so a redelivery replays exactly the same job.
        if self.params.seed is None:
            raise ValueError("params.seed must be resolved before enqueueing")
        return self


class ResultImage(WireModel):
    uri: str
    width: int
    height: int
    seed: int
    sha256: str
    bytes: int


class JobEvent(BulkMarked):
    """A worker's report about one job, read by the operator from the events stream."""

    only_when_set: ClassVar[tuple[str, ...]] = ("text",)

    type: EventType
    uid: str
    namespace: str
    name: str
    worker: str = ""
    attempt: int = 0
    step: int | None = None
    total_steps: int | None = None
    results: list[ResultImage] | None = None
    # What a text step answered (a remote backend's chat completion); None for image jobs.
    text: str | None = Field(None, max_length=100_000)
    reason: str | None = None
    message: str | None = None
    run_seconds: float | None = None
    ts: float = Field(default_factory=time.time)
