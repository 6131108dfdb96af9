"""A finished job's images: encoded, stored, and described (URI, size, seed, sha256) for its result record."""

from __future__ import annotations

import hashlib
import io
import time
from typing import TYPE_CHECKING

from zimage_queue import JobMessage, ResultImage
from zimage_worker import metrics
from zimage_worker.storage import ImageStore, output_key

if TYPE_CHECKING:
    from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(
        buf, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"), **({"quality": 95} if fmt != "png" else {})
    )
    return buf.getvalue()


def store_images(store: ImageStore, m: JobMessage, images: list[Image.Image]) -> list[ResultImage]:
    p = m.params
    t0 = time.perf_counter()
    results = []
    for i, img in enumerate(images):
        data = encode(img, p.output_format)
        uri = store.put(output_key(m, i, p.output_format), data, CONTENT_TYPES[p.output_format])
        results.append(
            ResultImage(
                uri=uri,
                width=img.width,
                height=img.height,
                seed=(p.seed or 0) + i,
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
            )
        )
    metrics.STORE_SECONDS.observe(time.perf_counter() - t0)
    return results
