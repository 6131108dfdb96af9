"""OpenAI's images API, so the official SDKs work with ``base_url`` pointed here. Each call is an ImageJob;
the response waits for its images (up to ZIMAGE_API_SYNC_TIMEOUT_SECONDS)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from zimage_api.apikeys import Principal
from zimage_api.deps import App, BaseUrl, Caller
from zimage_api.errors import ApiError
from zimage_api.schemas import SIZE_PATTERN, OpenAIGenerationRequest, OpenAIImage, OpenAIImagesResponse
from zimage_api.uploads import CheckedImage, check_image, openai_mask_to_white
from zimage_api.views import image_path
from zimage_worker.storage import upload_key

router = APIRouter(prefix="/v1/images", tags=["openai"])
DEFAULT_SIZE = (1024, 1024)
MAX_SIDE = 2048


def parse_size(size: str, fallback: tuple[int, int]) -> tuple[int, int]:
    if size == "auto":
        return fallback
    w, h = (int(x) for x in size.split("x"))
    return w, h


def fit(width: int, height: int) -> tuple[int, int]:
    """An input image's size, scaled into the model's bounds and rounded down to multiples of 16."""
    scale = min(1.0, MAX_SIDE / max(width, height))
    return (max(64, int(width * scale) // 16 * 16), max(64, int(height * scale) // 16 * 16))


async def _run(
    app: App, caller: Principal, fields: dict[str, Any], response_format: str, base: str
) -> OpenAIImagesResponse:
    job, _ = await app.service.submit(caller, fields)
    status = await app.service.wait(job, app.settings.sync_timeout_seconds)
    if status.get("phase") != "Succeeded":
        reason = next(
            (c.get("reason") for c in status.get("conditions") or [] if c.get("type") == status.get("phase")), None
        )
        code = "job_cancelled" if status.get("phase") == "Cancelled" else "job_failed"
        status_code = 400 if reason in ("InvalidInput", "InvalidSpec") else 500
        raise ApiError(
            status_code,
            f"job {job['metadata']['name']} {str(status.get('phase')).lower()}: {status.get('message')}",
            code=code,
        )
    name = job["metadata"]["name"]
    data = []
    for i, r in enumerate(status.get("results") or []):
        if response_format == "b64_json":
            data.append(OpenAIImage(b64_json=await asyncio.to_thread(app.images.b64, r["uri"])))
        else:
            url = await asyncio.to_thread(app.images.presigned, r["uri"], app.settings.url_ttl_seconds)
            data.append(OpenAIImage(url=url or base + app.signer.sign(image_path(name, i))))
    return OpenAIImagesResponse(created=int(time.time()), data=data)


@router.post("/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True)
async def generations(body: OpenAIGenerationRequest, caller: Caller, app: App, base: BaseUrl) -> OpenAIImagesResponse:
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
    }
    return await _run(app, caller, fields, body.response_format, base)


async def _upload(app: App, f: UploadFile, field: str) -> CheckedImage:
    limit = app.settings.max_upload_bytes
    data = await f.read(limit + 1)
    return check_image(data, field, max_bytes=limit, max_pixels=app.settings.max_upload_pixels)


@router.post("/edits", response_model=OpenAIImagesResponse, response_model_exclude_none=True)
async def edits(
    caller: Caller,
    app: App,
    base: BaseUrl,
    prompt: Annotated[str, Form(min_length=1, max_length=4000)],
    image: Annotated[UploadFile | None, File(description="The image to edit (png, jpeg or webp).")] = None,
    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="As sent for a list.")] = None,
    mask: Annotated[UploadFile | None, File(description="Transparent (or white) where to repaint.")] = None,
    model: Annotated[str | None, Form(max_length=253)] = None,
    n: Annotated[int, Form(ge=1, le=8)] = 1,
    size: Annotated[str, Form(pattern=SIZE_PATTERN)] = "auto",
    response_format: Annotated[str, Form(pattern=r"^(url|b64_json)$")] = "url",
    strength: Annotated[float | None, Form(ge=0, le=1, description="Extension.")] = None,
    seed: Annotated[int | None, Form(ge=0, le=2**53 - 1, description="Extension.")] = None,
) -> OpenAIImagesResponse:
    source = image or (images[0] if images else None)
    if source is None:
        raise ApiError(400, "image: required", param="image", code="missing_image")
    checked = await _upload(app, source, "image")
    upload_id = uuid.uuid4().hex
    fields: dict[str, Any] = {
        "task": "image-to-image",
        "prompt": prompt,
        "model": model,
        "numImages": n,
        "strength": strength,
        "seed": seed,
    }
    fields["width"], fields["height"] = parse_size(size, fit(checked.width, checked.height))
    fields["inputImage"] = await asyncio.to_thread(
        app.images.put_upload,
        upload_key(caller.tenant, upload_id, f"image.{checked.extension}"),
        checked.data,
        checked.content_type,
    )
    if mask is not None:
        m = await _upload(app, mask, "mask")
        fields["task"] = "inpaint"
        fields["maskImage"] = await asyncio.to_thread(
            app.images.put_upload,
            upload_key(caller.tenant, upload_id, "mask.png"),
            openai_mask_to_white(m),
            "image/png",
        )
    return await _run(app, caller, fields, response_format, base)
