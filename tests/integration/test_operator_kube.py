"""The running kopf operator against a real Kubernetes API server, with a tiny-model worker process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from PIL import Image

from conftest import REPO, Kube, operator_stack, start_worker, wait_for
from zimage_queue import JobQueue, keys

pytestmark = pytest.mark.kube
EXAMPLES = REPO / "docs" / "examples"
NS = f"zimage-it-{os.getpid()}"


@pytest.fixture(scope="module")
def stack(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("stack")
    with operator_stack(crds, tmp, NS, ZIMAGE_NORMAL_EVENTS="true") as (ps, url):
        start_worker(ps, url, keys.queue_name(NS, "z-image-turbo"), tmp / "images")
        yield {"kube": crds, "redis": url, "images": tmp / "images", "ps": ps}


def get(kube: Kube, kind: str, name: str) -> dict[str, Any] | None:
    proc = kube.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def status(kube: Kube, name: str) -> dict[str, Any]:
    obj = get(kube, "ij", name)
    return (obj or {}).get("status") or {}


def apply(kube: Kube, doc: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(doc))


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": name},
        "spec": {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, **spec},
    }


def condition(st: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def test_example_job_waits_for_its_model_then_succeeds(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    kube.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / "imagejob.yaml"))
    pending = wait_for(lambda: (s := status(kube, "red-fox")).get("phase") == "Pending" and s, what="Pending")
    assert condition(pending, "Queued") == {
        **condition(pending, "Queued"),
        "status": "False",  # type: ignore[dict-item]
        "reason": "ModelNotFound",
    }

    kube.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / "modeldeployment.yaml"))
    kube.kubectl("wait", "-n", NS, "--for=condition=Succeeded", "ij/red-fox", "--timeout=240s", timeout=250)

    st = status(kube, "red-fox")
    assert st["phase"] == "Succeeded" and st["seed"] == 42 and st["steps"] == 8
    assert st["attempts"] == 1 and st["worker"] and st["queueSeconds"] >= 0 and st["runSeconds"] > 0
    [result] = st["results"]
    path = Path(result["uri"].removeprefix("file://"))
    with Image.open(path) as img:
        img.load()
        assert img.size == (1024, 1024) == (result["width"], result["height"])
    assert path.stat().st_size == result["bytes"]
    assert st["progress"] == {"step": 8, "totalSteps": 8, "summary": "8/8"}

    table = kube.kubectl("get", "ij", "red-fox", "-n", NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "PHASE", "PROGRESS", "DURATION", "AGE"]
    row = table[1].split()
    assert row[:4] == ["red-fox", "z-image-turbo", "Succeeded", "8/8"] and row[4].endswith("s")

    def reasons() -> set[str]:
        out = kube.kubectl("get", "events", "-n", NS, "-o", "json", "--field-selector", "involvedObject.name=red-fox")
        return {e["reason"] for e in json.loads(out.stdout)["items"]}

    # Events are recorded off the status path, so the last one may follow the status by a moment.
    wanted = {"ModelNotFound", "Enqueued", "Started", "Completed"}
    wait_for(lambda: wanted <= reasons(), 10, 0.2, what=f"Events {wanted}")


def test_every_printer_column_resolves_in_a_real_status(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    apply(kube, job("columns"))
    kube.kubectl("wait", "-n", NS, "--for=condition=Succeeded", "ij/columns", "--timeout=240s", timeout=250)
    obj = get(kube, "ij", "columns")
    crd = yaml.safe_load((REPO / "crds" / "imagejob.yaml").read_text())
    for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        value: Any = obj
        for part in col["jsonPath"].strip(".").split("."):
            value = value[part]
        assert value not in (None, ""), col


def test_invalid_spec_rejected_by_kubectl_apply_naming_fields(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    proc = kube.kubectl("apply", "-n", NS, "-f", str(EXAMPLES / "imagejob-invalid.yaml"), check=False)
    assert proc.returncode != 0
    for field in ("spec.width", "spec.task", "spec.prompt"):
        assert field in proc.stderr, proc.stderr
    assert get(kube, "ij", "invalid") is None


def test_cross_field_rule_fails_with_reason(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    apply(kube, job("no-input", task="image-to-image"))
    st = wait_for(lambda: (s := status(kube, "no-input")).get("phase") == "Failed" and s, what="Failed")
    cond = condition(st, "Failed")
    assert cond and cond["status"] == "True" and cond["reason"] == "InvalidSpec"
    assert "spec.inputImage" in cond["message"]


def test_timeout_fails_job_cancels_it_and_ttl_deletes_it(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    model = yaml.safe_load((EXAMPLES / "modeldeployment.yaml").read_text())
    model["metadata"]["name"] = "no-workers"
    apply(kube, model)
    apply(kube, job("too-slow", model="no-workers", timeoutSeconds=2, ttlSecondsAfterFinished=3))
    st = wait_for(lambda: (s := status(kube, "too-slow")).get("phase") == "Failed" and s, timeout=30, what="Timeout")
    assert condition(st, "Failed")["reason"] == "Timeout"  # type: ignore[index]
    uid = get(kube, "ij", "too-slow")["metadata"]["uid"]  # type: ignore[index]
    assert JobQueue.from_url(stack["redis"]).is_cancelled(uid)
    wait_for(lambda: get(kube, "ij", "too-slow") is None, timeout=30, what="ttl deletion")


def test_deleting_a_queued_job_cancels_it(stack: dict[str, Any]) -> None:
    kube: Kube = stack["kube"]
    model = yaml.safe_load((EXAMPLES / "modeldeployment.yaml").read_text())
    model["metadata"]["name"] = "idle-pool"
    apply(kube, model)
    apply(kube, job("doomed", model="idle-pool"))
    wait_for(lambda: status(kube, "doomed").get("phase") == "Queued", what="Queued")
    uid = get(kube, "ij", "doomed")["metadata"]["uid"]  # type: ignore[index]
    q = JobQueue.from_url(stack["redis"])
    # Status says Queued just before the XADD (so a fast worker's Running is never overwritten): wait for it.
    wait_for(lambda: q.stats(keys.queue_name(NS, "idle-pool")).queued == 1, what="the job on its queue")
    kube.kubectl("delete", "ij", "doomed", "-n", NS, "--timeout=30s")
    # No finalizer: the operator sees the deletion on its watch, a moment after kubectl returns.
    wait_for(lambda: q.is_cancelled(uid), what="cancel flag")
    assert redis.Redis.from_url(stack["redis"]).hget(keys.job(uid), keys.F_CANCEL) == b"1"
