"""Hypothesis against the served API where a schema-driven fuzzer does not go: arbitrary JSON documents and raw
bytes as bodies, garbage keys and headers, random files and decompression bombs as uploads.

Properties: never a 5xx; every refusal is a 4xx in the one error shape; and nothing invalid gets in: every job
the API accepted has a spec the CRD's models accept, cross-field rules included.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from zimage_api.deps import Parts
from zimage_api.local import DEV_KEY, LocalApi, local_api, serve_in_thread
from zimage_operator.types import ImageJobSpec
from zimage_worker.engine import NoopEngine

EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck), database=None)
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
    | st.sampled_from(["", "0", "64", "1024x1024", "s3://b/k.png", "file:///etc/passwd", "\x00", "\u202e", "é" * 5000])
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=12
)
FIELDS = [
    "prompt", "negativePrompt", "model", "task", "width", "height", "steps", "guidanceScale", "seed", "numImages",
    "inputImage", "maskImage", "strength", "outputFormat", "priority", "timeoutSeconds", "maxRetries",
    "ttlSecondsAfterFinished",
]  # fmt: skip
job_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=80), json_values)},
    optional={f: st.one_of(json_values, st.integers(-20, 5000), st.text(max_size=30)) for f in FIELDS[1:]},
) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=6)


@pytest.fixture(scope="module")
def fuzz_api() -> Iterator[tuple[str, LocalApi]]:
    with (
        local_api(engine=NoopEngine(), rate_per_second=1e6, rate_burst=1_000_000, max_concurrent_jobs=100_000) as la,
        serve_in_thread(la.app) as url,
    ):
        yield url, la


def refused_properly(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and isinstance(error["message"], str), r.text


@pytest.mark.timeout(300)
def test_job_bodies_never_5xx_and_never_admit_an_invalid_spec(fuzz_api: tuple[str, LocalApi]) -> None:
    url, la = fuzz_api
    parts: Parts = la.app.state.parts
    store = parts.service.store
    accepted: list[str] = []

    @FUZZ
    @given(body=job_bodies)
    def run(body: dict[str, Any]) -> None:
        r = httpx.post(f"{url}/v1/jobs", headers=AUTH, json=body, timeout=30)
        refused_properly(r)
        if r.status_code in (200, 202):
            job = store.get_job(r.json()["id"])
            assert job is not None
            spec = ImageJobSpec.model_validate(job["spec"])  # the stored CR spec, as the operator reads it
            assert spec.cross_field_errors() == [], job["spec"]
            accepted.append(r.json()["id"])

    run()
    assert accepted, "the generator never produced a valid job: the property above was never exercised"


@pytest.mark.timeout(300)
@FUZZ
@given(
    path=st.sampled_from(["/v1/jobs", "/v1/images/generations", "/v1/images/edits"]),
    body=st.binary(max_size=2000),
    content_type=st.sampled_from(
        ["application/json", "multipart/form-data; boundary=x", "multipart/form-data", "text/plain", "", "image/png"]
    ),
)
def test_raw_bodies_never_5xx(fuzz_api: tuple[str, LocalApi], path: str, body: bytes, content_type: str) -> None:
    url, _ = fuzz_api
    r = httpx.post(f"{url}{path}", headers={**AUTH, "Content-Type": content_type}, content=body, timeout=30)
    refused_properly(r)
    assert r.status_code != 200 or path != "/v1/jobs"


@pytest.mark.timeout(300)
@FUZZ
@given(
    # What an HTTP client can send at all: printable ASCII, no surrounding blanks (h11 refuses the rest itself).
    key=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200).filter(lambda k: k == k.strip()),
    header=st.sampled_from(["Authorization", "X-API-Key", "Idempotency-Key"]),
)
def test_garbage_keys_and_headers_never_5xx(fuzz_api: tuple[str, LocalApi], key: str, header: str) -> None:
    url, _ = fuzz_api
    value = f"Bearer {key}".strip() if header == "Authorization" else key
    headers = {header: value} if header != "Idempotency-Key" else {**AUTH, header: value}
    r = httpx.post(f"{url}/v1/jobs", headers=headers, json={"prompt": "a fox", "width": 64, "height": 64}, timeout=30)
    refused_properly(r)
    if header != "Idempotency-Key":
        assert r.status_code == 401  # no garbage is a key


def png_bomb(side: int) -> bytes:
    """A real, valid PNG: a few hundred KB on the wire, ``side``² pixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.timeout(300)
@FUZZ
@given(image=st.binary(max_size=4000), mask=st.none() | st.binary(max_size=500), size=st.text(max_size=12))
def test_random_uploads_never_5xx(fuzz_api: tuple[str, LocalApi], image: bytes, mask: bytes | None, size: str) -> None:
    url, _ = fuzz_api
    files = {"image": ("x.png", image, "image/png"), **({"mask": ("m.png", mask, "image/png")} if mask else {})}
    r = httpx.post(f"{url}/v1/images/edits", headers=AUTH, data={"prompt": "x", "size": size}, files=files, timeout=30)
    refused_properly(r)
    assert r.status_code >= 400  # random bytes are never an image


def test_decompression_bomb_is_refused_before_decoding(fuzz_api: tuple[str, LocalApi]) -> None:
    url, la = fuzz_api
    bomb = png_bomb(20_000)  # 400 megapixels
    assert len(bomb) < la.settings.max_upload_bytes
    files = {"image": ("bomb.png", bomb, "image/png")}
    r = httpx.post(f"{url}/v1/images/edits", headers=AUTH, data={"prompt": "x"}, files=files, timeout=60)
    assert r.status_code == 413 and json.loads(r.text)["error"]["code"] == "too_many_pixels", r.text
