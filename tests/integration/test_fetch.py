"""Where a worker may read inputImage/maskImage from, against real servers: an HTTP server on loopback, the local
store on disk and S3 through a moto server.

The HTTP server can only listen on loopback here, which the worker always refuses. To see the fetch path work,
some tests stand in for DNS (``resolve``: a public name answering with the server's address) and let loopback
count as public (``address_ok``); everything else (the connection, Host, redirects, limits) is real.
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
from PIL import Image

from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.server import free_port
from zimage_worker.engine import NoopEngine
from zimage_worker.loop import Worker
from zimage_worker.storage import FetchRefused, LocalStore, S3Store, fetch_http, read_uri, upload_key


def png(colour: tuple[int, int, int] = (200, 50, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()


class Server:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Host", "")))
                u = urlparse(self.path)
                if u.path == "/img.png":
                    self._send(200, PNG, {"Content-Type": "image/png", "Content-Length": str(len(PNG))})
                elif u.path == "/redirect":
                    self._send(302, b"", {"Location": parse_qs(u.query)["to"][0], "Content-Length": "0"})
                elif u.path == "/big":  # says how big it is
                    self._send(200, b"x" * 5000, {"Content-Length": "5000"})
                elif u.path == "/stream":  # does not: HTTP/1.0, read until the connection closes
                    self._send(200, b"x" * 5000, {})
                elif u.path == "/stall":  # a header, a little, then nothing
                    self._send(200, b"x" * 10, {"Content-Length": "1000"})
                    self.wfile.flush()
                    outer.release.wait(30)
                else:
                    self._send(404, b"no", {"Content-Length": "2"})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

        self.scheme = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@contextmanager
def serving(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    srv = Server()
    if tls is not None:
        srv.httpd.socket = tls.wrap_socket(srv.httpd.socket, server_side=True)
        srv.scheme = "https"
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for images.example (key and certificate in one file)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate")
    pem = tmp_path / "images.example.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=images.example",
         "-addext", "subjectAltName=DNS:images.example", "-keyout", str(pem), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_text(pem.read_text() + (tmp_path / "cert.pem").read_text())
    return pem


class Dns:
    """A stand-in resolver: names to addresses, counting the lookups."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.answers[host]]


def loopback_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_loopback


def no_dns(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    raise AssertionError("no lookup expected")


# -- http(s) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_loopback_is_refused_even_when_allowlisted_by_name(server: Server, tmp_path: Path, host: str) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(FetchRefused, match=f"input host {host} resolves to a private"):
        read_uri(server.url("/img.png", host), store, "ns", allowed_hosts=[host])
    assert server.requests == []  # refused before connecting


def test_http_inputs_are_refused_without_an_allowlist_and_from_unlisted_hosts(server: Server, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(FetchRefused, match=r"input host 127\.0\.0\.1 not allowed"):
        read_uri(server.url("/img.png"), store, "ns")  # the default: no http(s) inputs at all
    with pytest.raises(FetchRefused, match=r"input host images\.example not allowed"):
        fetch_http("http://images.example/img.png", ["other.example", "*.images.example"], resolve=no_dns)
    with pytest.raises(FetchRefused, match=r"input host 169\.254\.169\.254 not allowed"):
        read_uri("http://169.254.169.254/latest/meta-data/", store, "ns", allowed_hosts=["images.example"])
    with pytest.raises(FetchRefused, match="credentials"):
        fetch_http("http://user:pw@images.example/img.png", ["images.example"], resolve=no_dns)
    assert server.requests == []


def test_an_allowlisted_name_is_fetched_from_the_address_that_was_vetted(server: Server) -> None:
    dns = Dns({"images.example": ["127.0.0.1"]})
    url = server.url("/img.png", "images.example")
    assert fetch_http(url, ["images.example"], resolve=dns, address_ok=loopback_is_public) == PNG
    # one lookup; the request went to that address and still named the host
    assert dns.lookups == ["images.example"]
    assert server.requests == [("/img.png", f"images.example:{server.port}")]


def test_every_address_of_a_name_is_checked(server: Server) -> None:
    dns = Dns({"images.example": ["127.0.0.1", "10.0.0.7"]})
    with pytest.raises(FetchRefused, match=r"resolves to a private .*\(10\.0\.0\.7\)"):
        fetch_http(server.url("/img.png", "images.example"), ["images.example"], resolve=dns,
                   address_ok=loopback_is_public)  # fmt: skip
    assert server.requests == []


def test_a_second_dns_answer_cannot_swap_the_address(server: Server) -> None:
    """DNS rebinding: the name turns private right after the check. The worker never asks again for this hop."""

    class Rebinding(Dns):
        def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
            answer = super().__call__(host, port)
            self.answers[host] = ["10.0.0.7"]
            return answer

    dns = Rebinding({"images.example": ["127.0.0.1"]})
    url = server.url("/img.png", "images.example")
    assert fetch_http(url, ["images.example"], resolve=dns, address_ok=loopback_is_public) == PNG
    assert dns.lookups == ["images.example"] and len(server.requests) == 1


def test_redirects_are_vetted_like_the_first_url(server: Server) -> None:
    dns = Dns({"images.example": ["127.0.0.1"], "internal.example": ["10.0.0.7"], "other.example": ["127.0.0.1"]})
    allowed = ["images.example", "internal.example"]

    def fetch(to: str, **kw: Any) -> bytes:
        url = server.url(f"/redirect?to={to}", "images.example")
        return fetch_http(url, allowed, resolve=dns, address_ok=loopback_is_public, **kw)

    assert fetch(server.url("/img.png", "images.example")) == PNG
    assert fetch("/img.png") == PNG  # relative
    with pytest.raises(FetchRefused, match=r"input host other\.example not allowed"):
        fetch(server.url("/img.png", "other.example"))
    with pytest.raises(FetchRefused, match=r"input host internal\.example resolves to a private"):
        fetch(server.url("/img.png", "internal.example"))
    with pytest.raises(FetchRefused, match=r"input host 127\.0\.0\.1 not allowed"):
        fetch(server.url("/img.png"))
    loop = server.url("/redirect?to=/redirect%3Fto%3D/img.png", "images.example")
    with pytest.raises(FetchRefused, match="redirects more than 0 times"):
        fetch(loop, max_redirects=0)
    # only the allowed, public-by-the-test's-rules host was ever asked for anything
    assert {host for _, host in server.requests} == {f"images.example:{server.port}"}
    assert "other.example" not in dns.lookups


def test_size_and_time_are_capped(server: Server) -> None:
    dns = Dns({"images.example": ["127.0.0.1"]})

    def fetch(path: str, **kw: Any) -> bytes:
        url = server.url(path, "images.example")
        return fetch_http(url, ["images.example"], resolve=dns, address_ok=loopback_is_public, **kw)

    with pytest.raises(FetchRefused, match="larger than 1000 bytes"):
        fetch("/big", max_bytes=1000)
    with pytest.raises(FetchRefused, match="larger than 1000 bytes"):
        fetch("/stream", max_bytes=1000)
    assert len(fetch("/stream", max_bytes=5000)) == 5000
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="longer than allowed"):
        fetch("/stall", timeout=0.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch("/missing")


def test_https_is_verified_against_the_name_while_connecting_to_the_vetted_address(
    certificate: Path, server: Server
) -> None:
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(certificate)
    trusting = ssl.create_default_context(cafile=str(certificate))
    dns = Dns({"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    allowed = ["images.example", "other.example"]
    with serving(served) as tls_server:

        def fetch(url: str) -> bytes:
            return fetch_http(url, allowed, resolve=dns, address_ok=loopback_is_public, tls=trusting)

        assert fetch(tls_server.url("/img.png", "images.example")) == PNG
        with pytest.raises(ValueError, match=r"cannot connect to other\.example: .*certificate verify failed"):
            fetch(tls_server.url("/img.png", "other.example"))  # same address, a name the certificate is not for
        with pytest.raises(ValueError, match="certificate verify failed"):  # the system's trust store: unknown
            fetch_http(tls_server.url("/img.png", "images.example"), allowed, resolve=dns,
                       address_ok=loopback_is_public)  # fmt: skip
        downgrade = tls_server.url(f"/redirect?to={server.url('/img.png', 'images.example')}", "images.example")
        with pytest.raises(FetchRefused, match="redirect from https to http"):
            fetch(downgrade)
        assert [path for path, _ in tls_server.requests] == ["/img.png", "/redirect?to=" + server.url(
            "/img.png", "images.example")]  # fmt: skip
    assert server.requests == []


# -- the worker's own store -----------------------------------------------------------------------------------
def test_local_store_inputs_only_from_the_tenants_prefix(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    own = store.put(upload_key("team-a", "u1", "in.png"), PNG, "image/png")
    theirs = store.put(upload_key("team-b", "u1", "in.png"), png((1, 2, 3)), "image/png")
    assert read_uri(own, store, "team-a") == PNG
    link = store.root / "tenants" / "team-a" / "uploads" / "link.png"
    link.symlink_to(Path(urlparse(theirs).path))
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    refused = [
        theirs,
        f"file://{store.root}/tenants/team-a/../team-b/uploads/u1/in.png",
        f"file://{store.root}/tenants/team-a-evil/x.png",
        link.as_uri(),  # inside by name, another tenant's by target
        outside.as_uri(),
        "file:///etc/hostname",
        "s3://bucket/tenants/team-a/uploads/u1/in.png",  # not this store
    ]
    for uri in refused:
        with pytest.raises(FetchRefused, match="not in tenant team-a's storage"):
            read_uri(uri, store, "team-a", allowed_hosts=["images.example"])
    with pytest.raises(FetchRefused, match="no tenant"):
        read_uri(own, store, "")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_inputs_only_from_the_tenants_prefix_of_the_workers_bucket(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket, other = f"images-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.create_bucket(Bucket=other)
    store = S3Store(bucket, "zimage", client=s3)
    own = store.put(upload_key("team-a", "u1", "in.png"), PNG, "image/png")
    theirs = store.put(upload_key("team-b", "u1", "in.png"), png((1, 2, 3)), "image/png")
    s3.put_object(Bucket=other, Key="zimage/tenants/team-a/uploads/u1/in.png", Body=b"x")
    s3.put_object(Bucket=bucket, Key="tenants/team-a/uploads/u1/in.png", Body=b"x")  # outside the store's prefix
    assert own == f"s3://{bucket}/zimage/tenants/team-a/uploads/u1/in.png"
    assert read_uri(own, store, "team-a") == PNG
    refused = [
        theirs,
        f"s3://{other}/zimage/tenants/team-a/uploads/u1/in.png",
        f"s3://{bucket}/tenants/team-a/uploads/u1/in.png",
        f"s3://{bucket}/zimage/tenants/team-a/../team-b/uploads/u1/in.png",
        f"s3://{bucket}/zimage/tenants/team-a-evil/x.png",
        f"s3://x@{bucket}/zimage/tenants/team-a/uploads/u1/in.png",
        (tmp_path / "in.png").as_uri(),  # not this store
    ]
    for uri in refused:
        with pytest.raises(FetchRefused, match="not in tenant team-a's storage"):
            read_uri(uri, store, "team-a")


def test_a_worker_fails_a_job_whose_input_is_refused_without_fetching_it(
    server: Server, redis_url: str, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    q = JobQueue.from_url(redis_url)
    params = GenerationParams(
        prompt="x", task="image-to-image", input_image=server.url("/img.png"), width=64, height=64, steps=1, seed=1
    )
    m = JobMessage(uid=str(uuid.uuid4()), namespace="ns", name="ssrf", queue="ns/m", params=params, max_retries=3)
    q.enqueue(m)
    Worker(q, NoopEngine(), store, "ns/m", "w").run(max_jobs=1, block_ms=0)
    [(dead, error)] = q.dead_letters()
    assert dead.uid == m.uid and "InvalidInput" in error and "input host 127.0.0.1 not allowed" in error, error
    assert server.requests == []


def test_the_worker_applies_its_allowlist_and_still_refuses_a_private_address(
    server: Server, redis_url: str, tmp_path: Path
) -> None:
    """Allowlisted by the worker's setting, the host passes the name check; loopback is refused after DNS."""
    store = LocalStore(tmp_path / "store")
    q = JobQueue.from_url(redis_url)
    params = GenerationParams(
        prompt="x", task="image-to-image", input_image=server.url("/img.png"), width=64, height=64, steps=1, seed=1
    )
    m = JobMessage(uid=str(uuid.uuid4()), namespace="ns", name="ssrf2", queue="ns/m", params=params, max_retries=3)
    q.enqueue(m)
    Worker(q, NoopEngine(), store, "ns/m", "w", fetch_allowed_hosts=["127.0.0.1"]).run(max_jobs=1, block_ms=0)
    [(dead, error)] = q.dead_letters()
    assert dead.uid == m.uid and "not allowed" not in error and "non-public address" in error, error
    assert server.requests == []
