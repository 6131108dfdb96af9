"""The caller's own: who it is (``GET /v1/me``) and its uploads (``POST /v1/uploads``)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from zimage_api.deps import App, Caller
from zimage_api.errors import ApiError
from zimage_api.schemas import Limits, PrincipalView, UploadPurpose, UploadView
from zimage_api.uploads import grayscale_mask, receive, store

router = APIRouter(prefix="/v1", tags=["account"])

UPLOAD_ANSWERS: dict[int | str, dict[str, Any]] = {
    413: {"description": "Over ZIMAGE_API_MAX_UPLOAD_BYTES, or the image over ZIMAGE_API_MAX_UPLOAD_PIXELS"},
    415: {"description": "Not a png, jpeg or webp image"},
}


@router.get("/me", response_model=PrincipalView)
async def me(caller: Caller, app: App) -> PrincipalView:
    """The caller: its key, tenant and the limits in force for it (its own, else the API's defaults), and which
    optional parts this API has (a history store, image storage for uploads)."""
    settings = app.settings
    return PrincipalView(
        key_id=caller.key_id,
        tenant=caller.tenant,
        admin=caller.admin,
        mode="bulk" if caller.bulk else "imagejob",
        limits=Limits(
            rate_per_second=caller.rate_per_second or settings.rate_per_second,
            burst=caller.burst or settings.rate_burst,
            max_concurrent_jobs=caller.max_concurrent_jobs or settings.max_concurrent_jobs,
        ),
        history=app.history is not None,
        uploads=app.images.takes_uploads,
    )


@router.post("/uploads", status_code=201, response_model=UploadView, responses=UPLOAD_ANSWERS)
async def upload(
    caller: Caller,
    app: App,
    file: Annotated[UploadFile, File(description="A png, jpeg or webp image.")],
    purpose: Annotated[
        UploadPurpose,
        Form(description="image (kept as sent) or mask (white = repaint, black = keep; kept as a grayscale PNG)."),
    ] = "image",
) -> UploadView:
    """Store an image in the caller's tenant's upload area, for ``inputImage`` / ``referenceImages`` /
    ``maskImage`` of ``POST /v1/jobs`` (the same tenant's keys only). Uploads are checked as ``/v1/images/edits``
    checks them and deleted after the operator's upload retention."""
    if not app.images.takes_uploads:
        raise ApiError(400, "this API takes no uploads (it has no image storage configured)", code="uploads_disabled")
    checked = await receive(file, "file", app.settings)
    if purpose == "mask":
        data, content_type, name = await asyncio.to_thread(grayscale_mask, checked), "image/png", "mask.png"
    else:
        data, content_type, name = checked.data, checked.content_type, f"image.{checked.extension}"
    uri = await store(app.images, caller.tenant, uuid.uuid4().hex, name, data, content_type)
    return UploadView(
        uri=uri,
        width=checked.width,
        height=checked.height,
        content_type=content_type,
        bytes=len(data),
        purpose=purpose,
    )
