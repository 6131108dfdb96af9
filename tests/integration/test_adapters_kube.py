"""LoRA adapters through the operator on the test bed: a ModelDeployment serving two tiny random-weight adapters
(built offline), its worker started with the environment the operator wrote into the worker Deployment, and
ImageJobs that name them. A job with two adapters at given scales succeeds and its status records them (the
default scale resolved); the ModelDeployment's status lists which workers hold each adapter; an unknown adapter
fails at admission with a reason; the API server refuses two adapters of one name (a CEL rule)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Kube, operator_stack, start_worker, wait_for
from zimage_queue import keys
from zimage_worker.tiny import build_tiny_lora

pytestmark = pytest.mark.kube
NS = f"zimage-lora-{os.getpid()}"
MD = "z-image-turbo"


@pytest.fixture(scope="module")
def stack(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("adapters")
    models = tmp / "models"
    build_tiny_lora(models / "loras" / "ink", seed=1)
    build_tiny_lora(models / "loras" / "felt", seed=2)
    with operator_stack(crds, tmp, NS) as (ps, url):
        crds.apply(NS, {
            "apiVersion": "zimage.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": MD},
            "spec": {
                "model": {"variant": "turbo"},
                "adapters": [
                    {"name": "ink", "source": "loras/ink"},  # under MODELS_DIR
                    {"name": "felt", "source": str(models / "loras" / "felt"), "defaultScale": 0.5},
                ],
                "maxResidentAdapters": 2,
            },
        })  # fmt: skip
        env = wait_for(lambda: worker_env(crds), timeout=60, what="the worker Deployment")
        # No kubelet: the worker runs here, with what the operator told the pods about the adapters.
        start_worker(
            ps, url, keys.queue_name(NS, MD), tmp / "images",
            MODELS_DIR=str(models),
            ZIMAGE_ADAPTERS=env["ZIMAGE_ADAPTERS"],
            ZIMAGE_MAX_RESIDENT_ADAPTERS=env["ZIMAGE_MAX_RESIDENT_ADAPTERS"],
        )  # fmt: skip
        yield {"kube": crds, "tmp": tmp}


def worker_env(kube: Kube) -> dict[str, str] | None:
    found = kube.kubectl("get", "deploy", "-n", NS, "-o", "json").stdout
    for d in json.loads(found)["items"]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            if "ZIMAGE_ADAPTERS" in env:
                return env
    return None


def imagejob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1", "kind": "ImageJob", "metadata": {"name": name},
        "spec": {"model": MD, "prompt": "a red fox", "width": 64, "height": 64, "seed": 7, **spec},
    }  # fmt: skip


def status(kube: Kube, name: str) -> dict[str, Any]:
    out = json.loads(kube.kubectl("get", "ij", name, "-n", NS, "-o", "json").stdout)
    return out.get("status") or {}


def finished(kube: Kube, name: str) -> dict[str, Any] | None:
    s = status(kube, name)
    return s if s.get("phase") in ("Succeeded", "Failed", "Cancelled") else None


def test_a_job_with_two_adapters_succeeds_and_records_them(stack: dict[str, Any]) -> None:
    kube = stack["kube"]
    kube.apply(
        NS,
        imagejob("two-loras", loras=[{"name": "ink", "scale": 0.8}, {"name": "felt"}]),
        imagejob("plain"),
    )
    done = wait_for(lambda: finished(kube, "two-loras"), timeout=120, what="the adapter job")
    assert done["phase"] == "Succeeded", done
    assert done["adapters"] == [{"name": "ink", "scale": 0.8}, {"name": "felt", "scale": 0.5}]
    plain = wait_for(lambda: finished(kube, "plain"), timeout=120, what="the plain job")
    assert plain["phase"] == "Succeeded" and "adapters" not in plain
    # the adapters changed the picture: same prompt, seed and size, other pixels
    assert done["results"][0]["sha256"] != plain["results"][0]["sha256"]

    def loaded() -> list[dict[str, Any]] | None:
        md = json.loads(kube.kubectl("get", "md", MD, "-n", NS, "-o", "json").stdout)
        found = (md.get("status") or {}).get("adapters") or []
        return found if found and all(a["workers"] for a in found) else None

    # the ModelDeployment lists its adapters and the worker holding each (from the worker's heartbeat)
    listed = wait_for(loaded, timeout=60, what="status.adapters with the worker")
    assert [a["name"] for a in listed] == ["ink", "felt"]
    assert all(len(a["workers"]) == 1 for a in listed)


def test_an_unknown_adapter_fails_at_admission(stack: dict[str, Any]) -> None:
    kube = stack["kube"]
    kube.apply(NS, imagejob("unknown-lora", loras=[{"name": "sepia"}]))
    done = wait_for(lambda: finished(kube, "unknown-lora"), timeout=60, what="admission")
    failed = next(c for c in done["conditions"] if c["type"] == "Failed")
    assert done["phase"] == "Failed" and failed["reason"] == "UnknownAdapter"
    assert "'sepia'" in failed["message"] and "felt, ink" in failed["message"]


def test_two_adapters_of_one_name_are_refused_by_the_api_server(stack: dict[str, Any], tmp_path: Path) -> None:
    kube = stack["kube"]
    twice = {
        "apiVersion": "zimage.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "twice"},
        "spec": {"model": {"variant": "turbo"}, "adapters": [{"name": "a", "source": s} for s in ("x", "y")]},
    }  # fmt: skip
    proc = kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(twice), check=False)
    assert proc.returncode != 0 and "spec.adapters: each name at most once" in proc.stderr, proc.stderr
