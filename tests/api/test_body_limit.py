"""The request body cap against a real uvicorn server process: 500 MB sent chunked (no Content-Length) or with
an honest Content-Length gets a 413 in the API's error shape after at most a few MB, and the server's memory
stays flat. The client streams one 1 MiB buffer over and over, so it never holds the body either."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from zimage_api.local import DEV_KEY
from zimage_queue.server import RedisServer, free_port

LIMIT = 8 * 1024 * 1024
MIB = 1024 * 1024
SENT_MB = 500

SERVER = """
import sys
import uvicorn
from zimage_api.app import create_app
from zimage_api.local import DEV_KEY, LOCAL_NAMESPACE, local_model
from zimage_api.settings import ApiSettings
from zimage_api.store import MemoryJobStore

redis_url, port, limit, storage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
settings = ApiSettings(
    redis_url=redis_url, namespace=LOCAL_NAMESPACE, dev_key=DEV_KEY, default_model="z-image-turbo",
    max_request_bytes=limit, storage_url=storage,
)
store = MemoryJobStore(LOCAL_NAMESPACE, [local_model("z-image-turbo", "turbo")])
uvicorn.run(create_app(settings, store), host="127.0.0.1", port=port, log_level="warning", log_config=None)
"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    def rss(self, field: str = "VmRSS") -> int:
        """Bytes of the server's resident memory now (VmRSS) or at its peak so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} for pid {self.proc.pid}")


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    storage = tmp_path_factory.mktemp("uploads").as_uri()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, redis_server.url, str(port), str(LIMIT), storage])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"the API server exited with {proc.returncode}"
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=60, what="the API server process")
        yield Server(url, proc)
    finally:
        proc.terminate()
        proc.wait(30)


class Counted:
    """``head``, then ``SENT_MB`` MiB as an iterator of one reused buffer, counting what the client actually
    handed over."""

    def __init__(self, head: bytes = b"") -> None:
        self.head = head
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        chunk = b"x" * MIB
        for _ in range(SENT_MB):
            yield chunk
            self.sent += len(chunk)


def post(server: Server, path: str, body: Counted, headers: dict[str, str]) -> httpx.Response:
    # httpx keeps going after a failed write (the server hung up) and reads the response the server sent.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return client.post(path, content=iter(body), headers={"Authorization": f"Bearer {DEV_KEY}", **headers})


def refused(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": {
            "message": f"request body over the limit of {LIMIT} bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "too_large",
        }
    }
    assert r.headers["connection"] == "close"


# A well-formed start, so the body is refused for its size, not for its syntax: a JSON string, a file part.
JSON_HEAD = b'{"prompt": "'
MULTIPART_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na red fox\r\n'
    b'--b\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\nContent-Type: image/png\r\n\r\n'
)


@pytest.mark.parametrize(
    ("path", "content_type", "head"),
    [
        ("/v1/jobs", "application/json", JSON_HEAD),
        ("/v1/images/edits", "multipart/form-data; boundary=b", MULTIPART_HEAD),
    ],
)
def test_a_500mb_chunked_body_is_cut_off_at_the_limit(
    server: Server, path: str, content_type: str, head: bytes
) -> None:
    ok = httpx.post(f"{server.url}/v1/jobs", json={"prompt": ""}, headers={"Authorization": f"Bearer {DEV_KEY}"})
    assert ok.status_code == 400  # a body under the limit reaches the route (and its validation)
    before = server.rss()
    body = Counted(head)
    r = post(server, path, body, {"Content-Type": content_type})  # a generator: chunked, no Content-Length
    assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
    refused(r)
    # The server stopped reading: the client got rid of a few MB (socket buffers) past the limit, not 500.
    assert body.sent < LIMIT + 64 * MIB, body.sent
    grown = server.rss("VmHWM") - before
    assert grown < 100 * MIB, f"the server's peak RSS grew by {grown / MIB:.0f} MiB"
    assert server.proc.poll() is None
    # And it still serves.
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_an_over_limit_content_length_is_refused_before_the_body(server: Server) -> None:
    body = Counted()
    r = post(server, "/v1/jobs", body, {"Content-Type": "application/json", "Content-Length": str(SENT_MB * MIB)})
    refused(r)
    assert body.sent < 64 * MIB, body.sent  # not even the limit's worth was taken


def test_a_chunked_body_under_the_limit_is_read_whole(server: Server) -> None:
    payload = json.dumps({"prompt": "a red fox", "negativePrompt": " " * (LIMIT // 2), "width": 64, "height": 64})

    def chunks() -> Iterator[bytes]:
        data = payload.encode()
        for i in range(0, len(data), MIB):
            yield data[i : i + MIB]

    r = httpx.post(
        f"{server.url}/v1/jobs",
        content=chunks(),
        headers={"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.request.headers["transfer-encoding"] == "chunked"
    # The whole body arrived: the validation speaks of the field at its end, not of a cut-off JSON document.
    assert r.status_code == 400 and r.json()["error"]["param"] == "negativePrompt", r.text
