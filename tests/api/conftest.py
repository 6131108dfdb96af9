"""A running API in local mode (real Redis, real worker loop, in-memory job store) for the API tests."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from zimage_api.apikeys import entry_json, new_key
from zimage_api.local import DEV_KEY, LocalApi, local_api, serve_in_thread
from zimage_queue import GenerationParams
from zimage_worker.engine import Engine, load_engine


class GatedEngine:
    """Any engine, held at the start of each job while the gate is closed (to look at a job mid-flight)."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.variant = inner.variant
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def generate(self, params: GenerationParams, **kw: Callable[..., object]) -> list[Image.Image]:
        self.waiting.set()
        self.gate.wait(60)
        self.waiting.clear()
        return self.inner.generate(params, **kw)  # type: ignore[arg-type]


@dataclass
class Api:
    url: str
    local: LocalApi
    engine: GatedEngine
    keys: dict[str, str]  # name -> key

    def client(self, key: str | None = "dev", **kw: object) -> httpx.Client:
        headers = {} if key is None else {"Authorization": f"Bearer {self.keys.get(key, key)}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


# Tenants for the isolation and limit tests; their keys live in a Secret-like directory, one file per key id.
# "a" and "b" carry many tests' requests on one session-scoped key, so their rate is far above what the tests send
# (the default 10/s, burst 20 answered 429 to a test that ran right after a busy one); "burst" tests the limit.
ROOMY = {"ratePerSecond": 1000, "burst": 1000}
KEY_SPECS = {
    "a": {"tenant": "team-a", **ROOMY},
    "b": {"tenant": "team-b", **ROOMY},
    "burst": {"tenant": "team-burst", "ratePerSecond": 0.2, "burst": 3},
    "quota": {"tenant": "team-quota", "maxConcurrentJobs": 1},
    "admin": {"tenant": "ops", "admin": True, **ROOMY},
}


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    keys_dir = tmp_path_factory.mktemp("api-keys")
    keys = {"dev": DEV_KEY}
    for name, spec in KEY_SPECS.items():
        key = new_key(name)
        keys[name] = key
        tenant = str(spec.pop("tenant"))
        (keys_dir / name).write_text(entry_json(key, tenant, **spec))
        spec["tenant"] = tenant
    engine = GatedEngine(load_engine("tiny-random"))
    with (
        local_api(engine=engine, images_dir=tmp_path_factory.mktemp("images"), keys_dir=str(keys_dir)) as la,
        serve_in_thread(la.app) as url,
    ):
        yield Api(url, la, engine, keys)


def png(width: int = 64, height: int = 64, mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def sse_events(client: httpx.Client, path: str) -> list[tuple[str, dict[str, object]]]:
    """Read a Server-Sent Events stream to its end."""
    events, kind = [], None
    with client.stream("GET", path) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((str(kind), json.loads(line.removeprefix("data: "))))
    return events


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
