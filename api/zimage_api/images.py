"""Reading stored images for clients: bytes, or a short-lived URL that bypasses the API."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import urlparse

from zimage_api.errors import ApiError
from zimage_worker.storage import ImageStore, LocalStore, S3Store, open_store, tenant_root


class ImageAccess:
    def __init__(self, storage_url: str) -> None:
        self.store: ImageStore | None = open_store(storage_url) if storage_url else None

    def local_path(self, uri: str) -> Path | None:
        """The file behind a file:// result, if it lies in the store this API serves."""
        if not isinstance(self.store, LocalStore) or not self.store.holds(uri, ""):
            return None
        path = Path(urlparse(uri).path).resolve()
        return path if path.is_file() else None

    def owns(self, uri: str, tenant: str) -> bool:
        """Whether ``uri`` lies in ``tenant``'s part of this API's own storage."""
        return self.store is not None and self.store.holds(uri, tenant_root(tenant))

    def presigned(self, uri: str, expires: int) -> str | None:
        if urlparse(uri).scheme == "s3" and isinstance(self.store, S3Store):
            return self.store.presign(uri, expires)
        return None

    def read(self, uri: str) -> bytes:
        path = self.local_path(uri)
        if path is not None:
            return path.read_bytes()
        if urlparse(uri).scheme == "s3" and self.store is not None:
            return self.store.get(uri)
        raise ApiError(404, "the image is not reachable from this API (no matching ZIMAGE_API_STORAGE_URL)")

    def b64(self, uri: str) -> str:
        return base64.b64encode(self.read(uri)).decode()

    def discard(self, uris: list[str]) -> None:
        """Delete uploads whose job was never accepted (retention would collect them only days later)."""
        if self.store is None:
            return
        keys = [k for k in map(self.store.key_of, uris) if k is not None]
        if keys:
            self.store.delete(keys)

    def delete(self, uris: list[str]) -> int:
        """Delete the objects of this API's storage among ``uris`` (one already gone is no error); how many that
        were. URIs elsewhere are left (this API cannot reach them)."""
        if self.store is None:
            return 0
        keys = sorted({k for k in map(self.store.key_of, uris) if k is not None})
        if keys:
            self.store.delete(keys)
        return len(keys)

    @property
    def takes_uploads(self) -> bool:
        """Whether this API has image storage to keep uploads in."""
        return self.store is not None

    def put_upload(self, key: str, data: bytes, content_type: str) -> str:
        if self.store is None:
            raise ApiError(400, "image: this API takes no uploads (it has no image storage configured)", param="image")
        return self.store.put(key, data, content_type)
