"""One storage interface, two backends: a local directory (or mounted volume) and S3-compatible stores.

Every object lies under its tenant's prefix (``tenants/<tenant>/``), so a bucket policy or lifecycle rule can
be written per tenant and a job can only read inputs of its own tenant. Output keys are deterministic per job
(``tenants/<tenant>/jobs/<namespace>/<name>/<uid>/<index>.<ext>``) so a redelivered job overwrites its own
objects instead of adding a second set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import ParseResult, parse_qs, urlparse

from zimage_queue import JobMessage


def tenant_root(tenant: str) -> str:
    return f"tenants/{tenant}"


def job_prefix(tenant: str, namespace: str, name: str) -> str:
    """Where the results of every run of the ImageJob ``namespace/name`` go, one folder per uid."""
    return f"{tenant_root(tenant)}/jobs/{namespace}/{name}"


def output_key(m: JobMessage, index: int, fmt: str) -> str:
    return f"{job_prefix(m.tenant or m.namespace, m.namespace, m.name)}/{m.uid}/{index}.{fmt}"


def upload_key(tenant: str, upload_id: str, filename: str) -> str:
    return f"{tenant_root(tenant)}/uploads/{upload_id}/{filename}"


class ImageStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store durably and return the object's URI."""
        ...

    def get(self, uri: str) -> bytes: ...

    def holds(self, uri: str, prefix: str) -> bool:
        """Whether ``uri`` names an object of this store under the key prefix ``prefix``."""
        ...


def _parse(uri: str) -> ParseResult | None:
    """``urlparse``, or None for what it refuses (``s3://[`` is an "invalid IPv6 URL")."""
    try:
        return urlparse(uri)
    except ValueError:
        return None


class LocalStore:
    """A directory: a volume in a pod, a folder in local mode. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key escapes the store: {key!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        return Path(urlparse(uri).path).read_bytes()

    def holds(self, uri: str, prefix: str) -> bool:
        u = _parse(uri)
        return u is not None and u.scheme == "file" and Path(u.path).resolve().is_relative_to(self.root / prefix)


class S3Store:
    """S3 or any S3-compatible store (MinIO, Ceph, moto in tests) through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.s3 = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> str:
        full = self._key(key)
        self.s3.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        return f"s3://{self.bucket}/{full}"

    def get(self, uri: str) -> bytes:
        u = urlparse(uri)
        body: bytes = self.s3.get_object(Bucket=u.netloc, Key=u.path.lstrip("/"))["Body"].read()
        return body

    def holds(self, uri: str, prefix: str) -> bool:
        u = _parse(uri)
        if u is None:
            return False
        key = u.path.lstrip("/")
        # S3 keys are not paths, but some proxies and SDKs collapse dot segments: never let one climb out.
        return (
            u.scheme == "s3"
            and u.netloc == self.bucket
            and key.startswith(self._key(prefix).rstrip("/") + "/")
            and not {".", ".."} & set(key.split("/"))
        )

    def presign(self, uri: str, expires: int = 300) -> str:
        u = urlparse(uri)
        url: str = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": u.netloc, "Key": u.path.lstrip("/")}, ExpiresIn=expires
        )
        return url


def open_store(url: str) -> ImageStore:
    """``file:///data/images``, a plain path, or ``s3://bucket/prefix?endpoint=http://host:9000&region=...``."""
    u = urlparse(url)
    if u.scheme == "s3":
        q = parse_qs(u.query)
        return S3Store(u.netloc, u.path, endpoint_url=q.get("endpoint", [None])[0], region=q.get("region", [None])[0])
    if u.scheme in ("file", ""):
        return LocalStore(u.path if u.scheme else url)
    raise ValueError(f"unsupported storage URL {url!r}: use file:// or s3://")


def read_uri(uri: str, store: ImageStore, tenant: str) -> bytes:
    """Fetch an input image: from the tenant's part of the store, or over http(s)."""
    u = urlparse(uri)
    if u.scheme in ("http", "https"):
        import urllib.request

        with urllib.request.urlopen(uri, timeout=30) as resp:
            data: bytes = resp.read(64 * 1024 * 1024 + 1)
        if len(data) > 64 * 1024 * 1024:
            raise ValueError("input image larger than 64 MiB")
        return data
    if not store.holds(uri, tenant_root(tenant)):
        raise PermissionError(f"not in tenant {tenant}'s storage ({tenant_root(tenant)}/ in the worker's store)")
    return store.get(uri)
