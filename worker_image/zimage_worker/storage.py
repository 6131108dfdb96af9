"""One storage interface, two backends: a local directory (or mounted volume) and S3-compatible stores.

Every object lies under its tenant's prefix (``tenants/<tenant>/``), so a bucket policy or lifecycle rule can
be written per tenant and a job can only read inputs of its own tenant. Output keys are deterministic per job
(``tenants/<tenant>/jobs/<namespace>/<name>/<uid>/<index>.<ext>``) so a redelivered job overwrites its own
objects instead of adding a second set.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import ParseResult, parse_qs, urljoin, urlparse

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

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


@dataclass(frozen=True)
class StoredObject:
    key: str  # as given to put (relative to the store's root or prefix)
    modified: float  # seconds since the epoch


class ImageStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store durably and return the object's URI."""
        ...

    def get(self, uri: str) -> bytes: ...

    def holds(self, uri: str, prefix: str) -> bool:
        """Whether ``uri`` names an object of this store under the key prefix ``prefix``."""
        ...

    def scan(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in no particular order (for retention)."""
        ...

    def delete(self, keys: list[str]) -> None:
        """Remove these objects; one already gone is not an error."""
        ...

    def key_of(self, uri: str) -> str | None:
        """The key ``put`` stored ``uri`` under, if it names an object of this store."""
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

    def scan(self, prefix: str) -> Iterator[StoredObject]:
        start = self.root / prefix
        if not start.is_relative_to(self.root) or not start.is_dir():
            return
        stack = [start]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        key = Path(e.path).relative_to(self.root).as_posix()
                        yield StoredObject(key, e.stat(follow_symlinks=False).st_mtime)

    def key_of(self, uri: str) -> str | None:
        if not self.holds(uri, ""):
            return None
        return Path(urlparse(uri).path).resolve().relative_to(self.root).as_posix()

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = (self.root / key).resolve()
            if not path.is_relative_to(self.root) or path == self.root:
                raise ValueError(f"key escapes the store: {key!r}")
            path.unlink(missing_ok=True)
            # Empty folders go with their last file (a job's uid folder, an upload's id), up to the root.
            parent = path.parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:  # not empty (or already gone): stop climbing
                    break
                parent = parent.parent


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

    def scan(self, prefix: str) -> Iterator[StoredObject]:
        full = self._key(prefix)
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for o in page.get("Contents", []):
                yield StoredObject(o["Key"][cut:], o["LastModified"].timestamp())

    def key_of(self, uri: str) -> str | None:
        if not self.holds(uri, ""):
            return None
        key = urlparse(uri).path.lstrip("/")
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            chunk = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

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


# -- inputs ------------------------------------------------------------------------------------------------
# An ImageJob created with kubectl names its own inputImage/maskImage, and the worker fetches it from inside
# the cluster: without limits that is a server-side request forgery (the cloud metadata endpoint, the Redis
# service, another tenant's objects). So an input is read only from the tenant's part of the worker's own
# store, or over http(s) from a host on the worker's allowlist (ZIMAGE_FETCH_ALLOWED_HOSTS; empty by default)
# that resolves to public addresses only. The worker connects to the address it vetted (a second DNS answer
# cannot swap it), vets every redirect the same way, and caps the size and the time of the whole fetch.
MAX_INPUT_BYTES = 64 * 1024 * 1024
FETCH_TIMEOUT_SECONDS = 30.0
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class FetchRefused(PermissionError):
    """The input is not one the worker may read: refused before (or instead of) reading it."""


def _host_entry(entry: str) -> str:
    host = entry.strip().lower().rstrip(".")
    name = host.removeprefix("*.")
    if not name or (any(c in name for c in "/:@?#[]* ") and not _is_ip(name)):
        raise ValueError(f"fetch allowlist entry {entry!r}: give a host name, *.domain or an IP address")
    return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def allowed_hosts_list(value: Any) -> list[str]:
    """ZIMAGE_FETCH_ALLOWED_HOSTS: comma-separated (``a.example,*.cdn.example``) or a JSON list; normalised."""
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else text.split(",")
    else:
        items = list(value or [])
    return [_host_entry(str(item)) for item in items if str(item).strip()]


# The worker setting's type: pydantic-settings would JSON-decode a list from the environment; this takes both.
HostList = Annotated[list[str], NoDecode, BeforeValidator(allowed_hosts_list)]


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    """Exact names (or IP addresses), and ``*.domain`` for the names under domain (not domain itself)."""
    host = host.lower().rstrip(".")
    return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowed)


def public_address(ip: Address) -> bool:
    """Whether a worker may connect to ``ip``: never private, loopback, link-local, multicast, reserved,
    unspecified or otherwise non-global, also not when wrapped in IPv6 (IPv4-mapped, NAT64, 6to4, Teredo)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[Address] = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
        if ip.teredo:
            embedded += list(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if embedded and not all(public_address(a) for a in embedded):
            return False
        if ip.ipv4_mapped is not None:
            return True
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def vetted_addresses(
    host: str, port: int, resolve: Resolver = socket.getaddrinfo, address_ok: Callable[[Address], bool] = public_address
) -> list[str]:
    """Every address ``host`` resolves to, if every one of them may be connected to; else FetchRefused."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise FetchRefused(f"input host {host} does not resolve: {e}") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchRefused(f"input host {host} does not resolve")
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not address_ok(ip):
            raise FetchRefused(f"input host {host} resolves to a private or otherwise non-public address ({ip})")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Sends ``Host: <name>`` but connects to the address that was vetted, never to a fresh DNS answer."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS verified against the host name (SNI and certificate), not the address."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)


def fetch_http(
    url: str,
    allowed_hosts: Collection[str],
    *,
    max_bytes: int = MAX_INPUT_BYTES,
    timeout: float = FETCH_TIMEOUT_SECONDS,
    max_redirects: int = MAX_REDIRECTS,
    resolve: Resolver = socket.getaddrinfo,
    address_ok: Callable[[Address], bool] = public_address,
    tls: ssl.SSLContext | None = None,
) -> bytes:
    """GET an http(s) input under the rules above. ``resolve``/``address_ok``/``tls`` are for tests."""
    deadline = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        u = _parse(url)
        if u is None or u.scheme not in ("http", "https") or not u.hostname:
            raise FetchRefused(f"input URL {url!r} is not an http(s) URL with a host")
        if u.username is not None or u.password is not None:
            raise FetchRefused("input URL carries credentials: not allowed")
        host = u.hostname.rstrip(".")
        if not host_allowed(host, allowed_hosts):
            raise FetchRefused(f"input host {host} not allowed (not in the worker's ZIMAGE_FETCH_ALLOWED_HOSTS)")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
        except ValueError as e:
            raise FetchRefused(f"input URL {url!r}: {e}") from e
        addresses = vetted_addresses(host, port, resolve, address_ok)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        status, location, data = _get(u.scheme, host, port, addresses, target, deadline, max_bytes, tls)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise ValueError(f"HTTP {status} without a Location from {host}")
            nxt = urljoin(url, location)
            if u.scheme == "https" and urlparse(nxt).scheme != "https":
                raise FetchRefused(f"input redirect from https to {urlparse(nxt).scheme or 'nothing'}: not followed")
            url = nxt
            continue
        if status != 200:
            raise ValueError(f"HTTP {status} from {host}")
        return data
    raise FetchRefused(f"input URL redirects more than {max_redirects} times")


def _get(
    scheme: str,
    host: str,
    port: int,
    addresses: list[str],
    target: str,
    deadline: float,
    max_bytes: int,
    tls: ssl.SSLContext | None,
) -> tuple[int, str | None, bytes]:
    """One GET, to the first vetted address that answers. Returns (status, Location, body of a 200)."""
    last: Exception | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = _PinnedHTTPSConnection(host, port, address, remaining, tls or ssl.create_default_context())
        else:
            conn = _PinnedHTTPConnection(host, port, address, remaining)
        try:
            conn.request("GET", target, headers={"User-Agent": "zimage-worker", "Accept": "image/*"})
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            last = e
            continue
        try:
            if resp.status != 200:
                return resp.status, resp.getheader("Location"), b""
            length = resp.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise FetchRefused(f"input image larger than {max_bytes} bytes ({int(length)})")
            return 200, None, _read_capped(conn, resp, deadline, max_bytes)
        finally:
            conn.close()
    if last is not None:
        raise ValueError(f"cannot connect to {host}: {last}") from last
    raise TimeoutError(f"input fetch from {host} took longer than allowed")


def _read_capped(
    conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, deadline: float, max_bytes: int
) -> bytes:
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("input fetch took longer than allowed")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        try:
            chunk = resp.read1(_CHUNK)
        except TimeoutError as e:
            raise TimeoutError("input fetch took longer than allowed") from e
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise FetchRefused(f"input image larger than {max_bytes} bytes")


def read_uri(uri: str, store: ImageStore, tenant: str, allowed_hosts: Collection[str] = ()) -> bytes:
    """Fetch an input image: from the tenant's part of the worker's store, or over http(s) from an allowed host.

    ``allowed_hosts`` is the worker's ``fetch_allowed_hosts`` setting; empty (the default): no http(s) inputs.
    """
    u = _parse(uri)
    if u is not None and u.scheme in ("http", "https"):
        return fetch_http(uri, allowed_hosts)
    if not tenant:  # "tenants/" would hold every tenant's objects
        raise FetchRefused("no tenant: inputs from the store need one")
    if not store.holds(uri, tenant_root(tenant)):
        raise FetchRefused(f"not in tenant {tenant}'s storage ({tenant_root(tenant)}/ in the worker's store)")
    return store.get(uri)
