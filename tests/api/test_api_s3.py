"""With S3 storage the API hands out presigned URLs: a 307 from the image endpoint, straight links from the
OpenAI routes; uploads for edits go to the same bucket, under the tenant's prefix."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
from fastapi.testclient import TestClient

from tests.integration.test_storage import bucket, png, s3_endpoint
from zimage_api.app import create_app
from zimage_api.images import ImageAccess
from zimage_api.local import DEV_KEY, local_model
from zimage_api.settings import ApiSettings
from zimage_api.store import TENANT_LABEL, MemoryJobStore
from zimage_worker.storage import S3Store, open_store, upload_key

__all__ = ["bucket", "s3_endpoint"]  # fixtures


def test_image_endpoint_redirects_to_a_presigned_url(redis_url: str, bucket: str, s3_endpoint: str) -> None:
    storage = f"s3://{bucket}/images?endpoint={s3_endpoint}"
    store = open_store(storage)
    assert isinstance(store, S3Store)
    uri = store.put("ns/job/0.png", png((1, 2, 3)), "image/png")
    jobs = MemoryJobStore("ns", [local_model("m", "turbo")])
    jobs.create_job("dev-job", {"model": "m", "prompt": "x"}, {TENANT_LABEL: "dev"}, {})
    jobs.patch_job_status(
        "dev-job",
        {
            "phase": "Succeeded",
            "results": [{"uri": uri, "width": 64, "height": 64, "seed": 1, "sha256": "0", "bytes": 1}],
        },
    )
    settings = ApiSettings(redis_url=redis_url, dev_key=DEV_KEY, storage_url=storage)
    with TestClient(create_app(settings, jobs)) as client:
        r = client.get(
            "/v1/jobs/dev-job/images/0", headers={"Authorization": f"Bearer {DEV_KEY}"}, follow_redirects=False
        )
        assert r.status_code == 307
        location = r.headers["location"]
        assert location.startswith(s3_endpoint) and "Signature" in location
        assert httpx.get(location).content == png((1, 2, 3))
        view = client.get("/v1/jobs/dev-job", headers={"Authorization": f"Bearer {DEV_KEY}"}).json()
        assert view["images"][0]["url"].startswith("http://testserver/v1/jobs/dev-job/images/0?expires=")


def test_uploads_lie_under_the_tenant_prefix_and_links_are_short_lived(bucket: str, s3_endpoint: str) -> None:
    access = ImageAccess(f"s3://{bucket}/images?endpoint={s3_endpoint}")
    uri = access.put_upload(upload_key("team-a", "x", "image.png"), b"png-bytes", "image/png")
    assert uri == f"s3://{bucket}/images/tenants/team-a/uploads/x/image.png"
    assert access.read(uri) == b"png-bytes"
    url = access.presigned(uri, 60)
    assert url and httpx.get(url).content == b"png-bytes"
    expiry = parse_qs(urlparse(url).query)
    assert expiry.get("X-Amz-Expires") == ["60"] or int(expiry["Expires"][0]) - time.time() <= 61
    keys = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in keys["Contents"]] == ["images/tenants/team-a/uploads/x/image.png"]
    # Whose object it is decides whether a job may name it as input.
    assert access.owns(uri, "team-a")
    assert not access.owns(uri, "team-b")
    assert not access.owns(uri, "team")  # a prefix of the tenant name is another tenant
    assert not access.owns(f"s3://{bucket}/images/tenants/team-a/../team-b/uploads/x/image.png", "team-a")
    assert not access.owns("s3://other-bucket/images/tenants/team-a/uploads/x/image.png", "team-a")
    assert not access.owns(f"s3://{bucket}/tenants/team-a/uploads/x/image.png", "team-a")  # outside the prefix
    assert not access.owns("s3://[bucket/images/tenants/team-a/x.png", "team-a")  # urlparse refuses it: not ours
