"""The same jobs, three ways: ``GET /v1/usage``, ``zimage usage`` and the Prometheus counters agree. Real jobs on
the embedded stack (tiny model), recorded through the outbox and the history writer into a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from conftest import BIN, wait_for
from zimage_api.local import DEV_KEY, local_api, serve_in_thread
from zimage_worker.engine import load_engine


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"tenant": "dev", "model": "z-image-turbo"}) or 0.0


def test_usage_the_cli_and_the_counters_agree(tmp_path: Path, history_url: str) -> None:
    before = counted("zimage_gpu_seconds_total"), counted("zimage_cost_total")
    with (
        local_api(engine=load_engine("tiny-random"), images_dir=tmp_path, history_url=history_url) as la,
        serve_in_thread(la.app) as url,
        httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {DEV_KEY}"}) as client,
    ):
        for prompt in ("a red fox", "a black cat", "a blue whale"):
            r = client.post("/v1/images/generations", json={"prompt": prompt, "size": "256x256", "n": 1})
            assert r.status_code == 200, r.text

        def usage() -> dict[str, object] | None:
            data = client.get("/v1/usage", params={"group_by": "model"}).json()["data"]
            return data[0] if data and data[0]["jobs"] == 3 else None

        api = wait_for(usage, timeout=30, what="3 jobs in the history store")
        env = {**os.environ, "ZIMAGE_API_URL": "", "ZIMAGE_API_KEY": ""}
        cli = subprocess.run(
            [str(BIN / "zimage"), "usage", "--group-by", "model", "-o", "json", "--api", url, "--api-key", DEV_KEY],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        [from_cli] = json.loads(cli.stdout)["data"]
    gpu = counted("zimage_gpu_seconds_total") - before[0]
    cost = counted("zimage_cost_total") - before[1]
    assert api["key"] == "z-image-turbo" and api["images"] == 3
    assert gpu > 0
    assert api["gpuSeconds"] == pytest.approx(gpu) == from_cli["gpuSeconds"]
    assert api["cost"] == pytest.approx(cost) == from_cli["cost"]
    assert from_cli == api
