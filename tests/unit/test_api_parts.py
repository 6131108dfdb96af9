"""The API's pure parts: key parsing and hashing, signed links, upload checks, size parsing."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from zimage_api.apikeys import KeyRing, entry_json, key_id, new_key, parse_entry
from zimage_api.errors import ApiError
from zimage_api.routes_openai import fit, parse_size
from zimage_api.signing import UrlSigner
from zimage_api.uploads import check_image, openai_mask_to_white


def test_keys_are_looked_up_by_id_and_checked_by_hash(tmp_path: Path) -> None:
    key = new_key("k1")
    assert key_id(key) == "k1" and key_id("zk_k1_short") is None and key_id("Bearer x") is None
    (tmp_path / "k1").write_text(entry_json(key, "team-a", burst=5))
    (tmp_path / "broken").write_text("{not json")  # skipped, never fatal
    ring = KeyRing(directory=str(tmp_path))
    who = ring.authenticate(key)
    assert who is not None and (who.tenant, who.burst, who.rate_per_second) == ("team-a", 5, None)
    assert ring.authenticate(new_key("k1")) is None  # right id, wrong secret
    assert ring.authenticate(new_key("k2")) is None  # unknown id
    with pytest.raises(ValueError):
        entry_json(key, "Team_A")
    with pytest.raises(ValueError):
        parse_entry("x", '{"tenant": "../etc", "sha256": "00"}')


def test_dev_key_must_be_well_formed() -> None:
    with pytest.raises(ValueError):
        KeyRing.with_dev_key("letmein", "dev")
    assert KeyRing.with_dev_key("zk_dev_0123456789abcdef", "dev").authenticate("zk_dev_0123456789abcdef") is not None


def test_signed_links_expire_and_bind_the_path() -> None:
    signer = UrlSigner("k", ttl_seconds=60)
    url = signer.sign("/v1/jobs/a/images/0", now=1000)
    query = dict(p.split("=") for p in url.split("?")[1].split("&"))
    exp, sig = int(query["expires"]), query["signature"]
    assert signer.verify("/v1/jobs/a/images/0", exp, sig, now=1059)
    assert not signer.verify("/v1/jobs/a/images/0", exp, sig, now=1061)
    assert not signer.verify("/v1/jobs/a/images/1", exp, sig, now=1000)
    assert not signer.verify("/v1/jobs/a/images/0", exp + 100, sig, now=1000)
    assert not UrlSigner("other", 60).verify("/v1/jobs/a/images/0", exp, sig, now=1000)


def _png(mode: str, size: tuple[int, int], color: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def test_upload_checks() -> None:
    ok = check_image(_png("RGB", (40, 30), "red"), "image", max_bytes=10_000, max_pixels=10_000)
    assert (ok.format, ok.width, ok.height, ok.extension) == ("PNG", 40, 30, "png")
    with pytest.raises(ApiError) as e:
        check_image(_png("RGB", (200, 200), "red"), "mask", max_bytes=10_000, max_pixels=10_000)
    assert (e.value.status, e.value.param) == (413, "mask")
    with pytest.raises(ApiError) as e:
        check_image(b"x" * 20_000, "image", max_bytes=10_000, max_pixels=10_000)
    assert e.value.status == 413


def test_openai_mask_transparent_becomes_white() -> None:
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((0, 0), (0, 0, 0, 0))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    checked = check_image(buf.getvalue(), "mask", max_bytes=10_000, max_pixels=100)
    out = Image.open(io.BytesIO(openai_mask_to_white(checked)))
    assert out.mode == "L" and out.getpixel((0, 0)) == 255 and out.getpixel((1, 0)) == 0


def test_sizes() -> None:
    assert parse_size("auto", (1024, 1024)) == (1024, 1024)
    assert parse_size("1536x1024", (0, 0)) == (1536, 1024)
    assert fit(4000, 3000) == (2048, 1536)
    assert fit(100, 30) == (96, 64)


def test_a_model_read_serves_a_burst_of_submits_and_a_missing_one_is_asked_again() -> None:
    from kubernetes.client import ApiClient, Configuration

    from zimage_api import kube_store

    now = [0.0]
    store = kube_store.KubeJobStore("ns", ApiClient(Configuration()), clock=lambda: now[0])
    answers: dict[str, dict[str, Any] | None] = {"pool": {"metadata": {"name": "pool"}}, "gone": None}
    reads: list[str] = []

    def read(plural: str, name: str) -> dict[str, Any] | None:
        reads.append(name)
        return answers[name]

    store._get = read  # type: ignore[method-assign]  # the API server's answer, injected
    assert all(store.get_model("pool") for _ in range(100)) and reads == ["pool"]
    now[0] += kube_store.MODEL_CACHE_SECONDS  # the cached answer expires: read again
    assert store.get_model("pool") and reads == ["pool", "pool"]
    assert store.get_model("gone") is None and store.get_model("gone") is None
    assert reads.count("gone") == 2  # a missing model is never remembered
