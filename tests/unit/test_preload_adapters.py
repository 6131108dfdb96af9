"""The preload Job's adapters: objects land in the volume's adapter cache, where a worker with the operator's
environment (ZIMAGE_ADAPTER_CACHE_DIR) finds them without fetching again; paths already on the volume stay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zimage_operator.types import ModelDeploymentSpec
from zimage_operator.workload import _worker_env
from zimage_queue.message import ADAPTER_CACHE
from zimage_worker.adapters import resolve_adapter_source
from zimage_worker.preload import preload
from zimage_worker.settings import WorkerSettings


def test_objects_are_fetched_into_the_cache_workers_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = tmp_path / "bucket"
    (bucket / "ink").mkdir(parents=True)
    (bucket / "ink" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    models = tmp_path / "models"
    (models / "loras" / "felt").mkdir(parents=True)
    adapters = [
        {"name": "ink", "source": (bucket / "ink").as_uri(), "weightName": "pytorch_lora_weights.safetensors"},
        {"name": "felt", "source": "loras/felt"},
    ]
    md = ModelDeploymentSpec.model_validate({"model": {"source": "tiny-random"}, "adapters": adapters})
    env = {e["name"]: e["value"] for e in _worker_env(md, [], []) if "value" in e}
    env["MODELS_DIR"] = str(models)  # the volume's mount, here
    env["ZIMAGE_ADAPTER_CACHE_DIR"] = str(models / ADAPTER_CACHE)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = WorkerSettings()
    assert [a.name for a in cfg.adapters] == ["ink", "felt"]
    preload(cfg)
    [fetched] = list((models / ADAPTER_CACHE).rglob("*.safetensors"))
    assert fetched.read_bytes() == b"weights"

    def no_fetch(uri: str) -> bytes:
        raise AssertionError(f"fetched {uri} again")

    # a worker (read-only volume) finds it there, and the path adapter under MODELS_DIR
    where, name = resolve_adapter_source(
        cfg.adapters[0], models_dir=str(models), cache_dir=str(models / ADAPTER_CACHE), fetch=no_fetch
    )
    assert Path(where) / str(name) == fetched
    where, _ = resolve_adapter_source(cfg.adapters[1], models_dir=str(models), cache_dir="/nonexistent", fetch=no_fetch)
    assert Path(where) == models / "loras" / "felt"
    assert json.loads(env["ZIMAGE_ADAPTERS"])[1]["source"] == "loras/felt"
