"""Checks on uploaded images before anything else touches them: size, type, pixel count (decompression bombs);
then where they are kept: the caller's tenant's upload area, which workers read and the operator's upload
retention clears (``POST /v1/images/edits`` and ``POST /v1/uploads`` both store through ``store``).

The header is parsed for the dimensions first; no pixel is decoded until the image is known to be small enough.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zimage_api.errors import ApiError
from zimage_worker.storage import upload_key

if TYPE_CHECKING:  # the CLI checks images with this module too, without the server's imports
    from fastapi import UploadFile

    from zimage_api.images import ImageAccess
    from zimage_api.settings import ApiSettings

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    format: str
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return ALLOWED_FORMATS[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def check_image(data: bytes, field: str, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{field}: the file is empty", param=field, code="invalid_image")
    if len(data) > max_bytes:
        raise ApiError(413, f"{field}: larger than {max_bytes} bytes", param=field, code="file_too_large")
    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            fmt, (w, h) = str(img.format), img.size
            if w * h > max_pixels:
                raise ApiError(
                    413,
                    f"{field}: {w}x{h} pixels is over the limit of {max_pixels}",
                    param=field,
                    code="too_many_pixels",
                )
            img.verify()  # structure and checksums, without keeping the decoded pixels
    except ApiError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, for headers far beyond ours
        raise ApiError(413, f"{field}: too many pixels ({e})", param=field, code="too_many_pixels") from e
    except UnidentifiedImageError as e:
        allowed = ", ".join(f.lower() for f in ALLOWED_FORMATS)
        raise ApiError(
            415, f"{field}: not an image of an allowed type ({allowed})", param=field, code="invalid_image_format"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(
            400, f"{field}: unreadable image ({e.__class__.__name__})", param=field, code="invalid_image"
        ) from e
    return CheckedImage(data, fmt, w, h)


async def receive(f: UploadFile, field: str, settings: ApiSettings) -> CheckedImage:
    """An uploaded file, read up to the limit and checked."""
    limit = settings.max_upload_bytes
    data = await f.read(limit + 1)
    return check_image(data, field, max_bytes=limit, max_pixels=settings.max_upload_pixels)


async def store(images: ImageAccess, tenant: str, upload_id: str, name: str, data: bytes, content_type: str) -> str:
    """Keep ``data`` as ``name`` of upload ``upload_id`` in the tenant's upload area; its URI (which POST /v1/jobs
    takes as inputImage or maskImage from that tenant)."""
    return await asyncio.to_thread(images.put_upload, upload_key(tenant, upload_id, name), data, content_type)


def grayscale_mask(mask: CheckedImage) -> bytes:
    """A native mask (white = repaint, black = keep) as the PNG of its grayscale ("L") image."""
    from PIL import Image

    with Image.open(io.BytesIO(mask.data)) as img:
        out = io.BytesIO()
        img.convert("L").save(out, format="PNG")
        return out.getvalue()


def openai_mask_to_white(mask: CheckedImage) -> bytes:
    """OpenAI masks mark the area to edit as transparent; Z-Image inpainting repaints where the mask is white."""
    from PIL import Image

    with Image.open(io.BytesIO(mask.data)) as img:
        if "A" not in img.getbands():
            return mask.data  # already a black/white mask
        alpha = img.getchannel("A")
        white = alpha.point(lambda a: 255 if a < 128 else 0).convert("L")
        out = io.BytesIO()
        white.save(out, format="PNG")
        return out.getvalue()
