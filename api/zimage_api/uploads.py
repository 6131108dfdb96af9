"""Checks on uploaded images before anything else touches them: size, type, pixel count (decompression bombs).

The header is parsed for the dimensions first; no pixel is decoded until the image is known to be small enough.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from zimage_api.errors import ApiError

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
