"""The REST API end to end in local mode: real HTTP server, real Redis, the real worker loop on the tiny model.
The OpenAI routes through the official SDK: test_openai_sdk.py."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from tests.api.conftest import Api, decode, png, sse_events

pytestmark = pytest.mark.timeout(120)


# -- auth, tenants, limits ----------------------------------------------------------------------------------
def test_no_key_is_401(api: Api) -> None:
    for client in (api.client(None), api.client("zk_dev_wrong-secret-000000"), api.client("garbage")):
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/models")):
            r = client.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert api.client(None).get("/healthz").status_code == 200


def test_tenant_isolation(api: Api) -> None:
    a, b = api.client("a"), api.client("b")
    job = a.post("/v1/jobs", json={"prompt": "team a's secret", "width": 64, "height": 64}).json()
    jid = job["id"]
    for method, path in (
        ("GET", f"/v1/jobs/{jid}"),
        ("DELETE", f"/v1/jobs/{jid}"),
        ("GET", f"/v1/jobs/{jid}/events"),
        ("GET", f"/v1/jobs/{jid}/images/0"),
    ):
        r = b.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert "team a" not in r.text
    done = sse_events(a, f"/v1/jobs/{jid}/events")[-1][1]
    assert done["phase"] == "Succeeded"
    assert all(j["id"] != jid for j in b.get("/v1/jobs").json()["data"])
    assert any(j["id"] == jid for j in a.get("/v1/jobs").json()["data"])
    # The signed link opens the image without a key; a forged signature does not.
    url = done["images"][0]["url"]  # type: ignore[index]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url.replace("signature=", "signature=0")).status_code == 401
    assert httpx.get(url.split("?")[0]).status_code == 401


def test_rate_limit_burst_is_429_with_retry_after(api: Api) -> None:
    client = api.client("burst")  # 3 requests of burst, then 0.2/s
    codes = [client.get("/v1/models").status_code for _ in range(6)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429, 429]
    r = client.get("/v1/models")
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 5
    assert api.client("a").get("/v1/models").status_code == 200  # other keys are not affected


def test_concurrent_jobs_quota(api: Api) -> None:
    client = api.client("quota")  # one job in progress at a time
    api.engine.gate.clear()
    try:
        first = client.post("/v1/jobs", json={"prompt": "one", "width": 64, "height": 64})
        assert first.status_code == 202
        second = client.post("/v1/jobs", json={"prompt": "two", "width": 64, "height": 64})
        assert second.status_code == 429 and second.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert api.client("a").post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64}).status_code == 202
    finally:
        api.engine.gate.set()
    sse_events(client, f"/v1/jobs/{first.json()['id']}/events")
    assert client.post("/v1/jobs", json={"prompt": "three", "width": 64, "height": 64}).status_code == 202


def test_idempotency_key_returns_the_same_job(api: Api) -> None:
    client = api.client("a")
    body = {"prompt": "once only", "width": 64, "height": 64}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "req-42"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "req-42"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["seed"] == again.json()["seed"]
    other = client.post("/v1/jobs", json={**body, "prompt": "else"}, headers={"Idempotency-Key": "req-42"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per tenant: the same key from another tenant is another job.
    theirs = api.client("b").post("/v1/jobs", json=body, headers={"Idempotency-Key": "req-42"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


# -- progress, cancel ---------------------------------------------------------------------------------------
def test_sse_events_arrive_in_order_and_end_with_the_result(api: Api) -> None:
    client = api.client("a")
    api.engine.gate.clear()  # a blocker holds the one worker, so the followed job is queued when we connect
    try:
        client.post("/v1/jobs", json={"prompt": "blocker", "width": 64, "height": 64})
        assert api.engine.waiting.wait(30)
        jid = client.post("/v1/jobs", json={"prompt": "followed", "width": 64, "height": 64, "steps": 5}).json()["id"]
        events: list[tuple[str, dict[str, object]]] = []
        kind = None
        import json

        with client.stream("GET", f"/v1/jobs/{jid}/events") as resp:
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((str(kind), json.loads(line.removeprefix("data: "))))
                    api.engine.gate.set()  # subscribed: now let both jobs run
    finally:
        api.engine.gate.set()
    types = [t for t, _ in events]
    assert types == ["queued", "started", *["progress"] * 5, "succeeded"], types
    assert [d["step"] for t, d in events if t == "progress"] == [1, 2, 3, 4, 5]
    final = events[-1][1]
    assert final["phase"] == "Succeeded" and len(final["images"]) == 1  # type: ignore[arg-type]
    assert decode(client.get(f"/v1/jobs/{jid}/images/0").raise_for_status().content).size == (64, 64)
    # The job record says the same as the stream's last event.
    assert client.get(f"/v1/jobs/{jid}").json()["images"][0]["sha256"] == final["images"][0]["sha256"]  # type: ignore[index]


def test_cancel_a_queued_job(api: Api) -> None:
    client = api.client("a")
    api.engine.gate.clear()
    try:
        client.post("/v1/jobs", json={"prompt": "blocker", "width": 64, "height": 64})
        assert api.engine.waiting.wait(30)
        jid = client.post("/v1/jobs", json={"prompt": "never", "width": 64, "height": 64}).json()["id"]
        r = client.delete(f"/v1/jobs/{jid}")
        assert r.status_code == 200 and r.json()["phase"] == "Cancelled" and r.json()["reason"] == "Cancelled"
    finally:
        api.engine.gate.set()
    nxt = client.post("/v1/jobs", json={"prompt": "after", "width": 64, "height": 64}).json()["id"]
    assert sse_events(client, f"/v1/jobs/{nxt}/events")[-1][0] == "succeeded"  # the worker went past it
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["phase"] == "Cancelled" and job["images"] == [] and job["startedAt"] is None
    assert client.delete(f"/v1/jobs/{jid}").json()["phase"] == "Cancelled"  # idempotent


def test_list_filters_and_pages(api: Api) -> None:
    client = api.client("b")
    ids = {client.post("/v1/jobs", json={"prompt": f"p{i}", "width": 64, "height": 64}).json()["id"] for i in range(3)}
    for jid in ids:
        sse_events(client, f"/v1/jobs/{jid}/events")
    seen, token = set(), None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"page_token": token} if token else {})}).json()
        assert len(page["data"]) <= 2
        seen |= {j["id"] for j in page["data"]}
        token = page.get("nextPageToken")
        if not token:
            break
    assert ids <= seen
    ok = client.get("/v1/jobs", params={"phase": "Succeeded", "model": "z-image-turbo"}).json()["data"]
    assert ids <= {j["id"] for j in ok} and all(j["phase"] == "Succeeded" for j in ok)
    assert client.get("/v1/jobs", params={"phase": "Failed"}).json()["data"] == []
    assert client.get("/v1/jobs", params={"model": "other"}).json()["data"] == []


# -- bad input -------------------------------------------------------------------------------------------------
def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image; its pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "x", "width": 4096}, "width"),
        ({"prompt": "x", "height": 100}, "height"),
        ({"prompt": "x", "steps": 101}, "steps"),
        ({"prompt": "x", "numImages": 9}, "numImages"),
        ({"prompt": "x", "model": "no-such-model"}, "model"),
        ({"prompt": "x", "task": "inpaint"}, "inputImage"),
        # Workers fetch what they are given: only objects in the API's own storage are accepted.
        (
            {"prompt": "x", "task": "image-to-image", "inputImage": "http://169.254.169.254/latest/meta-data"},
            "inputImage",
        ),
        ({"prompt": "x", "task": "image-to-image", "inputImage": "file:///etc/passwd"}, "inputImage"),
        ({"prompt": "x", "task": "inpaint", "inputImage": "s3://b/k", "maskImage": "s3://b/m"}, "inputImage"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({}, "prompt"),
    ],
)
def test_bad_job_requests_are_4xx_naming_the_field(api: Api, body: dict[str, object], param: str) -> None:
    r = api.client("a").post("/v1/jobs", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_bad_uploads_are_rejected(api: Api) -> None:
    client = api.client("a")

    def edit(data: bytes, name: str = "i.png") -> httpx.Response:
        return client.post("/v1/images/edits", files={"image": (name, data, "image/png")}, data={"prompt": "x"})

    assert edit(b"not an image").status_code == 415
    assert edit(b"GIF89a" + b"\0" * 100).status_code == 415  # a real type, not an allowed one
    r = edit(bomb_png(60000, 60000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
    assert edit(b"").status_code == 400
    corrupt = bytearray(png(64, 64))
    corrupt[-20] ^= 0xFF  # inside the pixel data: the header parses, the checksum does not
    r = edit(bytes(corrupt))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    r = client.post("/v1/images/edits", data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    big = api.local.settings.max_upload_bytes + 1
    r = edit(b"\x89PNG" + b"\0" * big)
    assert r.status_code == 413


def test_models_and_metrics(api: Api) -> None:
    models = api.client("a").get("/v1/models").json()
    assert models["object"] == "list"
    (m,) = [m for m in models["data"] if m["alias_of"] is None]  # then the aliases (test_openai_sdk.py)
    assert m["id"] == "z-image-turbo" and m["ready"] and m["owned_by"] == "zimage" and m["queue_length"] >= 0
    text = httpx.get(f"{api.url}/metrics").text
    assert 'zimage_api_requests_total{code="202",method="POST",route="/v1/jobs"}' in text
    assert "zimage_api_request_duration_seconds_bucket" in text
    assert wait_for(lambda: httpx.get(f"{api.url}/readyz").status_code == 200)


def test_a_refused_edit_leaves_no_upload_behind(api: Api) -> None:
    """The image and mask of an edit the API refuses (unknown model, a bad mask) are deleted at once; an
    accepted edit's stay for its worker (and go with the store's retention)."""
    from urllib.parse import urlparse

    uploads = Path(urlparse(api.local.settings.storage_url).path) / "tenants" / "team-a" / "uploads"

    def stored() -> int:
        return sum(1 for p in uploads.rglob("*") if p.is_file()) if uploads.exists() else 0

    before = stored()
    client = api.client("a")
    image = ("i.png", png(64, 64), "image/png")
    r = client.post("/v1/images/edits", files={"image": image, "mask": ("m.png", png(64, 64, "RGBA"), "image/png")},
                    data={"prompt": "x", "model": "no-such-model"})  # fmt: skip
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/images/edits", files={"image": image, "mask": ("m.png", b"not a png", "image/png")},
                    data={"prompt": "x"})  # fmt: skip
    assert r.status_code == 415
    # several images on a turbo model: refused, not the extra ones silently dropped
    two = [("image[]", image), ("image[]", ("j.png", png(64, 64), "image/png"))]
    r = client.post("/v1/images/edits", files=two, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
    assert "need a model of variant edit or omni" in r.json()["error"]["message"]
    assert stored() == before
    r = client.post("/v1/images/edits", files={"image": image}, data={"prompt": "x", "size": "64x64"})
    assert r.status_code == 200, r.text
    assert stored() == before + 1
