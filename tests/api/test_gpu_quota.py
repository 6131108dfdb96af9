"""A tenant's GPU-second budget, end to end on the embedded stack: its first job runs and is counted (the usage
counters and Prometheus), the next is refused with 429 and a Retry-After at the budget's renewal, and another
tenant is not affected."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from zimage_api.apikeys import entry_json, new_key
from zimage_api.local import DEV_KEY, local_api, serve_in_thread
from zimage_history.outbox import day_of, usage_since
from zimage_queue import keys
from zimage_worker.engine import load_engine


def gpu_seconds(tenant: str) -> float:
    return REGISTRY.get_sample_value("zimage_gpu_seconds_total", {"tenant": tenant, "model": "z-image-turbo"}) or 0.0


def test_a_tenant_over_its_gpu_seconds_gets_429_and_others_do_not(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    other = new_key("other")
    (keys_dir / "other").write_text(entry_json(other, "team-other"))
    before = gpu_seconds("dev")
    quotas = {"dev": {"gpuSecondsPerDay": 0.000001}}
    with (
        local_api(engine=load_engine("tiny-random"), images_dir=tmp_path / "images", keys_dir=str(keys_dir),
                  tenant_quotas=quotas) as la,
        serve_in_thread(la.app) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):  # fmt: skip
        body = {"prompt": "a red fox", "size": "256x256", "response_format": "url"}
        dev = {"Authorization": f"Bearer {DEV_KEY}"}
        first = client.post("/v1/images/generations", json=body, headers=dev)
        assert first.status_code == 200, first.text  # under budget when it started: it runs to the end
        r = redis.Redis.from_url(la.redis_url)
        used = usage_since(r, "dev", [day_of(datetime.now(UTC).timestamp())])
        assert used[keys.USAGE_GPU_SECONDS] > 0 and used[keys.USAGE_IMAGES] == 1
        assert gpu_seconds("dev") - before == pytest.approx(used[keys.USAGE_GPU_SECONDS])
        refused = client.post("/v1/jobs", json={"prompt": "another fox"}, headers=dev)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "gpu_quota_exceeded" and "GPU-seconds for today" in error["message"]
        assert 0 < int(refused.headers["Retry-After"]) <= 86400
        theirs = client.post("/v1/jobs", json={"prompt": "a cat"}, headers={"Authorization": f"Bearer {other}"})
        assert theirs.status_code == 202, theirs.text
