"""What the web console asks the API: who the caller is (GET /v1/me), uploads for jobs (POST /v1/uploads), and the
deployments' state for admin keys (GET /v1/deployments); on the local stack (real Redis, the tiny model)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import wait_for
from tests.api.conftest import KEY_SPECS, Api, png, sse_events
from zimage_api.app import create_app
from zimage_api.local import DEV_KEY
from zimage_api.settings import ApiSettings
from zimage_api.store import MemoryJobStore

pytestmark = pytest.mark.timeout(120)


def upload(api: Api, key: str, data: bytes, purpose: str | None = None, name: str = "x.png") -> dict[str, object]:
    form = {"purpose": purpose} if purpose else None
    r = api.client(key).post("/v1/uploads", files={"file": (name, data)}, data=form)
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def stored(uri: object) -> Image.Image:
    img = Image.open(Path(urlparse(str(uri)).path))
    img.load()
    return img


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# -- GET /v1/me ---------------------------------------------------------------------------------------------
def test_me_for_a_key_without_limits_of_its_own_has_the_api_defaults(api: Api) -> None:
    settings = api.local.settings
    assert api.client("dev").get("/v1/me").json() == {
        "object": "principal",
        "keyId": "dev",
        "tenant": settings.dev_tenant,
        "admin": False,
        "mode": "imagejob",
        "limits": {
            "ratePerSecond": settings.rate_per_second,
            "burst": settings.rate_burst,
            "maxConcurrentJobs": settings.max_concurrent_jobs,
        },
        "history": False,  # no ZIMAGE_API_HISTORY_URL
        "uploads": True,
    }


def test_me_for_an_admin_key_has_its_own_limits(api: Api) -> None:
    me = api.client("admin").get("/v1/me").json()
    spec = KEY_SPECS["admin"]
    assert (me["keyId"], me["tenant"], me["admin"], me["mode"]) == ("admin", "ops", True, "imagejob")
    assert me["limits"] == {
        "ratePerSecond": spec["ratePerSecond"],
        "burst": spec["burst"],
        "maxConcurrentJobs": api.local.settings.max_concurrent_jobs,
    }
    assert api.client("quota").get("/v1/me").json()["limits"]["maxConcurrentJobs"] == 1


def test_me_needs_a_key(api: Api) -> None:
    r = api.client(None).get("/v1/me")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- POST /v1/uploads ---------------------------------------------------------------------------------------
def test_uploads_feed_an_inpaint_job(api: Api) -> None:
    image = upload(api, "a", png(64, 64))
    assert {k: v for k, v in image.items() if k != "uri"} == {
        "object": "upload",
        "width": 64,
        "height": 64,
        "contentType": "image/png",
        "bytes": len(png(64, 64)),
        "purpose": "image",
    }
    assert "/tenants/team-a/uploads/" in str(image["uri"])
    rgba = png(64, 64, "RGBA", (255, 255, 255, 0))  # a native mask: white = repaint (alpha plays no part)
    mask = upload(api, "a", rgba, "mask")
    assert (mask["purpose"], mask["contentType"], mask["width"], mask["height"]) == ("mask", "image/png", 64, 64)
    kept = stored(mask["uri"])
    assert kept.format == "PNG" and kept.mode == "L" and kept.getextrema() == (255, 255)
    assert mask["bytes"] == Path(urlparse(str(mask["uri"])).path).stat().st_size

    client = api.client("a")
    r = client.post(
        "/v1/jobs",
        json={
            "prompt": "a red square, repainted",
            "task": "inpaint",
            "inputImage": image["uri"],
            "maskImage": mask["uri"],
            "width": 64,
            "height": 64,
        },
    )
    assert r.status_code == 202, r.text
    done = sse_events(client, f"/v1/jobs/{r.json()['id']}/events")[-1][1]
    assert done["phase"] == "Succeeded", done
    assert done["request"]["task"] == "inpaint"  # type: ignore[index]


def test_an_upload_keeps_its_format(api: Api) -> None:
    data = jpeg(80, 48)
    up = upload(api, "a", data, name="photo.jpg")
    assert (up["contentType"], up["width"], up["height"], up["bytes"]) == ("image/jpeg", 80, 48, len(data))
    assert str(up["uri"]).endswith(".jpg") and stored(up["uri"]).format == "JPEG"


def test_another_tenants_upload_is_refused(api: Api) -> None:
    image = upload(api, "a", png())
    body = {"prompt": "x", "task": "image-to-image", "inputImage": image["uri"], "width": 64, "height": 64}
    r = api.client("b").post("/v1/jobs", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "inputImage", r.text


@pytest.mark.parametrize(
    ("files", "form", "status", "code"),
    [
        ({"file": ("x.png", b"definitely not an image")}, None, 415, "invalid_image_format"),
        ({"file": ("x.png", b"")}, None, 400, "invalid_image"),
        ({"file": ("x.png", png()[:60])}, None, 400, "invalid_image"),  # truncated
        ({"file": ("x.png", png(5000, 5000, "1", 0))}, None, 413, "too_many_pixels"),
        ({"file": ("x.png", png())}, {"purpose": "thumbnail"}, 400, "invalid_value"),
        ({"image": ("x.png", png())}, None, 400, "invalid_value"),  # no `file`
    ],
    ids=["garbage", "empty", "truncated", "too-many-pixels", "bad-purpose", "no-file"],
)
def test_bad_uploads_are_refused(
    api: Api, files: dict[str, tuple[str, bytes]], form: dict[str, str] | None, status: int, code: str
) -> None:
    r = api.client("a").post("/v1/uploads", files=files, data=form)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.fixture
def no_storage(redis_url: str) -> Iterator[TestClient]:
    settings = ApiSettings(redis_url=redis_url, dev_key=DEV_KEY, storage_url="")
    with TestClient(create_app(settings, MemoryJobStore("x", []))) as client:
        client.headers["Authorization"] = f"Bearer {DEV_KEY}"
        yield client


def test_an_api_without_storage_takes_no_uploads(no_storage: TestClient) -> None:
    assert no_storage.get("/v1/me").json()["uploads"] is False
    r = no_storage.post("/v1/uploads", files={"file": ("x.png", png())})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "uploads_disabled"


# -- GET /v1/deployments ------------------------------------------------------------------------------------
def test_deployments_are_for_admin_keys_only(api: Api) -> None:
    for key in ("dev", "a"):
        r = api.client(key).get("/v1/deployments")
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "admin_only"
        assert r.json()["error"]["type"] == "permission_error"
    assert api.client(None).get("/v1/deployments").status_code == 401


def test_deployments_show_the_model_its_workers_and_throughput(api: Api) -> None:
    client = api.client("a")
    r = client.post("/v1/jobs", json={"prompt": "counted", "width": 64, "height": 64, "numImages": 2})
    done = sse_events(client, f"/v1/jobs/{r.json()['id']}/events")[-1][1]
    assert done["phase"] == "Succeeded"
    minute = str(done["finishedAt"])[:17] + "00Z"  # 2025-01-01T12:34:56Z -> 2025-01-01T12:34:00Z
    admin = api.client("admin")

    def counted() -> dict[str, object] | None:
        [view] = admin.get("/v1/deployments").json()["data"]
        at = [m for m in view["throughput"] if m["minute"] == minute]
        return view if at and at[0]["jobs"] >= 1 and at[0]["images"] >= 2 else None

    view = wait_for(counted, timeout=10, what=f"the job counted in {minute}")
    assert view["id"] == api.local.settings.default_model
    assert view["variant"] == "turbo"
    assert (view["replicas"], view["readyReplicas"]) == (1, 1)
    assert view["desiredReplicas"] is None  # no scaler in local mode
    assert view["queueLength"] >= 0 and view["inFlight"] >= 0
    assert view["workers"]["busy"] + view["workers"]["idle"] >= 1  # the local worker's heartbeat
    assert len(view["throughput"]) == 15
    minutes = [m["minute"] for m in view["throughput"]]
    assert minutes == sorted(minutes) and len(set(minutes)) == 15
    assert all(m["minute"].endswith(":00Z") for m in view["throughput"])
    assert view["conditions"] == [] and view["scalingHistory"] == []
