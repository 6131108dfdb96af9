"""OpenAI's images API, so the official SDKs work with ``base_url`` pointed here. Each call is an ImageJob; the
response waits for its images (up to ZIMAGE_API_SYNC_TIMEOUT_SECONDS), or, with ``stream``, is OpenAI's image
stream: Server-Sent Events, one ``image_generation.completed`` (``image_edit.completed``) per image.

Streams carry no ``partial_image`` events: workers report steps, not pictures, so there is no preview to send
(what OpenAI does for ``partial_images=0``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import StreamingResponse

from zimage_api.aliases import variant_of
from zimage_api.apikeys import Principal
from zimage_api.deps import App, BaseUrl, Caller
from zimage_api.errors import ApiError, error_body
from zimage_api.events import TERMINAL_EVENTS
from zimage_api.schemas import (
    BACKGROUND_DOC,
    PARTIAL_IMAGES_DOC,
    RESPONSE_FORMAT_DOC,
    SIZE_PATTERN,
    Background,
    InputFidelity,
    Moderation,
    OpenAIGenerationRequest,
    OpenAIImage,
    OpenAIImagesResponse,
    Quality,
    ResponseFormat,
)
from zimage_api.uploads import openai_mask_to_white, receive, store
from zimage_api.views import image_path
from zimage_queue.message import OMNI_VARIANTS, VARIANT_DEFAULTS, OutputFormat

router = APIRouter(prefix="/v1/images", tags=["openai"])
DEFAULT_SIZE = (1024, 1024)
MAX_SIDE = 2048
KEEPALIVE_SECONDS = 15.0
# OpenAI's GPT image models answer with base64 unless asked otherwise; DALL-E's (and ours) with URLs.
B64_MODELS = ("gpt-image", "chatgpt-image")
# The completed event's usage: OpenAI counts tokens; an image here costs none.
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The images, or (stream) their events"}
}


def parse_size(size: str, fallback: tuple[int, int]) -> tuple[int, int]:
    if size == "auto":
        return fallback
    w, h = (int(x) for x in size.split("x"))
    return w, h


def omni_variant(app: App, model: str | None) -> str | None:
    """The variant of the model an edit asks for when it is one that runs ZImageOmniPipeline (edit, omni: the
    first image is edited as the prompt says, the others are references); else None (sync: call from a thread).
    An unknown model is left to the submission to refuse."""
    name = app.service.resolve_model(model) if model else app.service.default_model()
    md = app.service.store.get_model(name)
    if md is None or ((md.get("spec") or {}).get("backend") or "diffusers") != "diffusers":
        return None
    variant = variant_of(md)
    return variant if variant in OMNI_VARIANTS else None


def fit(width: int, height: int) -> tuple[int, int]:
    """An input image's size, scaled into the model's bounds and rounded down to multiples of 16."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    return (max(64, int(width * scale) // 16 * 16), max(64, int(height * scale) // 16 * 16))


@dataclass(frozen=True)
class Answer:
    """How the caller wants the images back."""

    response_format: str
    output_format: str
    stream: str | None  # the stream's event prefix (image_generation, image_edit); None: one JSON answer
    quality: str | None = None
    background: str | None = None


def answer(
    kind: str,
    model: str | None,
    response_format: str | None,
    output_format: str | None,
    stream: bool,
    quality: str | None,
    background: str | None,
) -> Answer:
    b64 = stream or response_format == "b64_json" or (response_format is None and (model or "").startswith(B64_MODELS))
    return Answer("b64_json" if b64 else "url", output_format or "png", kind if stream else None, quality, background)


def failure(job: dict[str, Any], status: dict[str, Any]) -> ApiError | None:
    """What a finished job's answer is when it did not succeed (None when it did)."""
    if status.get("phase") == "Succeeded":
        return None
    reason = next(
        (c.get("reason") for c in status.get("conditions") or [] if c.get("type") == status.get("phase")), None
    )
    code = "job_cancelled" if status.get("phase") == "Cancelled" else "job_failed"
    return ApiError(
        400 if reason in ("InvalidInput", "InvalidSpec") else 500,
        f"job {job['metadata']['name']} {str(status.get('phase')).lower()}: {status.get('message')}",
        code=code,
    )


async def _images(app: App, name: str, status: dict[str, Any], how: Answer, base: str) -> list[OpenAIImage]:
    data = []
    for i, r in enumerate(status.get("results") or []):
        if how.response_format == "b64_json":
            data.append(OpenAIImage(b64_json=await asyncio.to_thread(app.images.b64, r["uri"])))
        else:
            url = await asyncio.to_thread(app.images.presigned, r["uri"], app.settings.url_ttl_seconds)
            data.append(OpenAIImage(url=url or base + app.signer.sign(image_path(name, i))))
    return data


def _size(status: dict[str, Any]) -> str | None:
    results = status.get("results") or []
    return f"{results[0]['width']}x{results[0]['height']}" if results else None


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(app: App, job: dict[str, Any], how: Answer) -> AsyncIterator[str]:
    """OpenAI's image stream: keepalive comments while the job runs, then one completed event per image, or one
    ``error`` event (``{"error": {...}}``, which the SDKs raise as an APIError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app.settings.sync_timeout_seconds
    name = job["metadata"]["name"]
    status: dict[str, Any] | None = None
    async with aclosing(app.service.track(job, keepalive=KEEPALIVE_SECONDS)) as steps:
        async for step in steps:
            if step.type in TERMINAL_EVENTS:
                status = step.status
                break
            if loop.time() >= deadline:
                break
            if step.type == "keepalive":
                yield ": keepalive\n\n"
    if status is None:
        timeout = app.settings.sync_timeout_seconds
        message = f"job {name} not finished within {timeout:g}s; it keeps running: GET /v1/jobs/{name}"
        yield _sse("error", error_body(504, message, code="timeout"))
        return
    error = failure(job, status)
    if error is not None:
        yield _sse("error", error_body(error.status, error.message, error.param, error.code))
        return
    for image, r in zip(await _images(app, name, status, how, ""), status.get("results") or [], strict=True):
        event = {
            "type": f"{how.stream}.completed",
            "b64_json": image.b64_json,
            "created_at": int(time.time()),
            "size": f"{r['width']}x{r['height']}",
            "quality": how.quality if how.quality in ("low", "medium", "high", "xhigh", "max") else "auto",
            "background": how.background or "auto",
            "output_format": how.output_format,
            "usage": NO_USAGE,
        }
        yield _sse(str(event["type"]), event)


async def _run(
    app: App, caller: Principal, fields: dict[str, Any], how: Answer, base: str, uploads: list[str] | None = None
) -> OpenAIImagesResponse | StreamingResponse:
    try:
        job, _ = await app.service.submit(caller, fields)
    except BaseException:  # refused (unknown model, quota, ...): its uploads will never be read
        if uploads:
            await asyncio.to_thread(app.images.discard, uploads)
        raise
    if how.stream:
        return StreamingResponse(
            _events(app, job, how), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    status = await app.service.wait(job, app.settings.sync_timeout_seconds)
    error = failure(job, status)
    if error is not None:
        raise error
    return OpenAIImagesResponse(
        created=int(time.time()),
        data=await _images(app, job["metadata"]["name"], status, how, base),
        output_format=how.output_format,
        size=_size(status),
    )


@router.post("/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True, responses=STREAMED)
async def generations(
    body: OpenAIGenerationRequest, caller: Caller, app: App, base: BaseUrl
) -> OpenAIImagesResponse | StreamingResponse:
    width, height = parse_size(body.size, DEFAULT_SIZE)
    fields = {
        "prompt": body.prompt,
        "negativePrompt": body.negative_prompt,
        "model": body.model,
        "numImages": body.n,
        "width": width,
        "height": height,
        "seed": body.seed,
        "steps": body.steps,
        "outputFormat": body.output_format,
        "loras": [lora.wire() for lora in body.loras] if body.loras else None,
    }
    how = answer(
        "image_generation",
        body.model,
        body.response_format,
        body.output_format,
        body.stream,
        body.quality,
        body.background,
    )
    return await _run(app, caller, fields, how, base)


@router.post("/edits", response_model=OpenAIImagesResponse, response_model_exclude_none=True, responses=STREAMED)
async def edits(
    caller: Caller,
    app: App,
    base: BaseUrl,
    prompt: Annotated[str, Form(min_length=1, max_length=4000)],
    image: Annotated[UploadFile | None, File(description="The image to edit (png, jpeg or webp).")] = None,
    images: Annotated[
        list[UploadFile] | None,
        File(
            alias="image[]",
            description="As sent for a list. An edit or omni model edits the first as the prompt says, with the others "
            "as reference images (GET /v1/models: max_reference_images); other models take the first.",
        ),
    ] = None,
    mask: Annotated[
        UploadFile | None,
        File(description="Transparent (or white) where to repaint (inpaint; not for edit and omni models)."),
    ] = None,
    model: Annotated[str | None, Form(max_length=253, description="A ModelDeployment or an alias.")] = None,
    n: Annotated[int, Form(ge=1, le=8)] = 1,
    size: Annotated[str, Form(pattern=SIZE_PATTERN, description="WIDTHxHEIGHT or auto (the input's).")] = "auto",
    response_format: Annotated[ResponseFormat | None, Form(description=RESPONSE_FORMAT_DOC)] = None,
    output_format: Annotated[OutputFormat | None, Form(description="png (default), jpeg or webp.")] = None,
    output_compression: Annotated[int | None, Form(ge=0, le=100, description="Ignored.")] = None,
    quality: Annotated[Quality | None, Form(description="Ignored.")] = None,
    background: Annotated[Background | None, Form(description=BACKGROUND_DOC)] = None,
    moderation: Annotated[Moderation | None, Form(description="Ignored.")] = None,
    input_fidelity: Annotated[InputFidelity | None, Form(description="Ignored (see strength).")] = None,
    stream: Annotated[bool, Form(description="Server-Sent Events: image_edit.completed per image.")] = False,
    partial_images: Annotated[int | None, Form(ge=0, le=3, description=PARTIAL_IMAGES_DOC)] = None,
    user: Annotated[str | None, Form(max_length=256, description="Ignored.")] = None,
    safety_identifier: Annotated[str | None, Form(max_length=256, description="Ignored.")] = None,
    strength: Annotated[float | None, Form(ge=0, le=1, description="Extension.")] = None,
    seed: Annotated[int | None, Form(ge=0, le=2**53 - 1, description="Extension.")] = None,
) -> OpenAIImagesResponse | StreamingResponse:
    given = [*([image] if image else []), *(images or [])]
    if not given:
        raise ApiError(400, "image: required", param="image", code="missing_image")
    # Edit and omni models edit from the prompt, with the further images as references; the others start from
    # the first image (image-to-image), or repaint its mask (inpaint).
    variant = await asyncio.to_thread(omni_variant, app, model)
    references = given[1:] if variant else []
    if variant:
        allowed = VARIANT_DEFAULTS[variant].references
        if len(references) > allowed:
            takes = f"one image and at most {allowed} more (references)" if allowed else "one image"
            raise ApiError(
                400,
                f"image: the {variant} variant takes {takes}, got {len(given)}",
                param="image",
                code="unsupported_task",
            )
        if mask is not None:
            raise ApiError(
                400,
                f"mask: the {variant} variant edits as the prompt says, without a mask",
                param="mask",
                code="unsupported_task",
            )
    elif len(given) > 1:  # not dropped without a word: the caller meant them to count
        raise ApiError(
            400,
            f"image: this model starts from one image, got {len(given)}; several images (references) need a model "
            "of variant edit or omni (GET /v1/models lists each model's tasks)",
            param="image",
            code="unsupported_task",
        )
    checked = await receive(given[0], "image", app.settings)
    checked_refs = [await receive(ref, "image", app.settings) for ref in references]
    upload_id = uuid.uuid4().hex
    fields: dict[str, Any] = {
        "task": "edit" if variant else "image-to-image",
        "prompt": prompt,
        "model": model,
        "numImages": n,
        "strength": strength,
        "seed": seed,
        "outputFormat": output_format,
    }
    fields["width"], fields["height"] = parse_size(size, fit(checked.width, checked.height))
    # Everything is checked before anything is stored: a refused request leaves no upload behind.
    checked_mask = await receive(mask, "mask", app.settings) if mask is not None else None
    how = answer("image_edit", model, response_format, output_format, stream, quality, background)
    stored: list[str] = []
    fields["inputImage"] = await store(
        app.images, caller.tenant, upload_id, f"image.{checked.extension}", checked.data, checked.content_type
    )
    stored.append(fields["inputImage"])
    try:
        for i, ref in enumerate(checked_refs, 1):
            name = f"reference-{i}.{ref.extension}"
            stored.append(await store(app.images, caller.tenant, upload_id, name, ref.data, ref.content_type))
        if checked_refs:
            fields["referenceImages"] = stored[1:]
        if checked_mask is not None:
            fields["task"] = "inpaint"
            fields["maskImage"] = await store(
                app.images, caller.tenant, upload_id, "mask.png", openai_mask_to_white(checked_mask), "image/png"
            )
            stored.append(fields["maskImage"])
    except BaseException:
        await asyncio.to_thread(app.images.discard, stored)
        raise
    return await _run(app, caller, fields, how, base, uploads=stored)
