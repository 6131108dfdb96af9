"""Variants through the operator on the test bed: an omni ModelDeployment, its worker started with the environment
the operator wrote into the worker Deployment (the tiny offline omni build), and ImageJobs. An edit with an input
image and two reference images succeeds; a task the variant does not do fails at admission with reason
UnsupportedTask, before anything is queued; an edit without its image is an invalid spec."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import Kube, operator_stack, start_worker, wait_for
from zimage_queue import keys

pytestmark = pytest.mark.kube
NS = f"zimage-omni-{os.getpid()}"
MD = "z-image-omni"


def upload(images: Path, name: str, colour: tuple[int, int, int]) -> str:
    """An input in the namespace's (the tenant's) part of the store, where the worker may read it."""
    path = images / "tenants" / NS / "uploads" / "u1" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    image.paste(colour, (16, 16, 48, 40))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path.as_uri()


@pytest.fixture(scope="module")
def stack(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("omni")
    with operator_stack(crds, tmp, NS) as (ps, url):
        crds.apply(NS, {
            "apiVersion": "zimage.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": MD},
            "spec": {"model": {"variant": "omni", "source": "tiny-random"}},
        })  # fmt: skip
        env = wait_for(lambda: worker_env(crds), timeout=60, what="the worker Deployment")
        # No kubelet: the worker runs here, as the operator told the pods to (the variant picks the pipeline).
        start_worker(ps, url, keys.queue_name(NS, MD), tmp / "images", ZIMAGE_VARIANT=env["ZIMAGE_VARIANT"])
        yield {"kube": crds, "images": tmp / "images"}


def worker_env(kube: Kube) -> dict[str, str] | None:
    found = kube.kubectl("get", "deploy", "-n", NS, "-o", "json").stdout
    for d in json.loads(found)["items"]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            if "ZIMAGE_VARIANT" in env:
                return env
    return None


def imagejob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1", "kind": "ImageJob", "metadata": {"name": name},
        "spec": {"model": MD, "prompt": "the fox in blue", "width": 64, "height": 64, "steps": 3, "seed": 7, **spec},
    }  # fmt: skip


def finished(kube: Kube, name: str) -> dict[str, Any] | None:
    out = json.loads(kube.kubectl("get", "ij", name, "-n", NS, "-o", "json").stdout)
    s: dict[str, Any] = out.get("status") or {}
    return s if s.get("phase") in ("Succeeded", "Failed", "Cancelled") else None


def failed_reason(status: dict[str, Any]) -> tuple[str, str]:
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    return cond["reason"], cond["message"]


def test_an_omni_edit_with_reference_images_succeeds(stack: dict[str, Any]) -> None:
    kube, images = stack["kube"], stack["images"]
    red = upload(images, "red.png", (220, 30, 30))
    blue = upload(images, "blue.png", (20, 40, 230))
    green = upload(images, "green.png", (30, 200, 60))
    kube.apply(
        NS,
        imagejob("edit-refs", task="edit", inputImage=red, referenceImages=[blue, green]),
        imagejob("edit-one", task="edit", inputImage=red),
        imagejob("text-only"),
    )
    done = {}
    for name in ("edit-refs", "edit-one", "text-only"):
        done[name] = wait_for(lambda name=name: finished(kube, name), timeout=120, what=name)  # type: ignore[misc]
    for name, status in done.items():
        assert status["phase"] == "Succeeded", (name, status)
        [result] = status["results"]
        assert (result["width"], result["height"]) == (64, 64)
        assert status["steps"] == 3
    # the reference images conditioned the edit: same prompt, seed and size, other pixels
    shas = {n: s["results"][0]["sha256"] for n, s in done.items()}
    assert len(set(shas.values())) == 3, shas


def test_a_task_the_variant_does_not_do_fails_at_admission(stack: dict[str, Any]) -> None:
    kube, images = stack["kube"], stack["images"]
    red = upload(images, "red.png", (220, 30, 30))
    kube.apply(NS, imagejob("inpaint", task="inpaint", inputImage=red, maskImage=red))
    status = wait_for(lambda: finished(kube, "inpaint"), timeout=60, what="admission")
    reason, message = failed_reason(status)
    assert status["phase"] == "Failed" and reason == "UnsupportedTask"
    assert "the omni variant does text-to-image and edit, not inpaint" in message and MD in message
    assert "queuedAt" not in status  # refused before it was enqueued


def test_an_edit_without_its_image_is_an_invalid_spec(stack: dict[str, Any]) -> None:
    kube = stack["kube"]
    kube.apply(NS, imagejob("no-image", task="edit"))
    status = wait_for(lambda: finished(kube, "no-image"), timeout=60, what="admission")
    assert failed_reason(status)[0] == "InvalidSpec"
    assert "spec.inputImage: required when task is edit" in failed_reason(status)[1]
