"""Variants edit and omni through the REST API on the embedded stack (what ``zimage serve --variant omni`` runs,
with the tiny offline omni build): an edit of an uploaded image with uploaded reference images succeeds,
/v1/models says what the model does, what its variant cannot do is a 400 naming the field before anything is
queued, another tenant's upload is no reference image, and OpenAI's /v1/images/edits sends the further images as
references (a mask is refused before anything is stored), as ``zimage generate --api --reference`` does."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import wait_for
from tests.api.conftest import ROOMY, png
from zimage_api import cli
from zimage_api.apikeys import entry_json, new_key
from zimage_api.local import local_api, serve_in_thread
from zimage_api.views import model_view
from zimage_queue import QueueStats

pytestmark = pytest.mark.timeout(120)
MODEL = "z-image-omni"
SMALL = {"prompt": "the fox in the hat", "width": 64, "height": 64, "steps": 2, "seed": 5}


@dataclass
class Stack:
    a: httpx.Client  # tenant team-a
    b: httpx.Client  # tenant team-b
    images: Path
    url: str
    key_a: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("variants")
    keys = {name: new_key(name) for name in ("a", "b")}
    (root / "keys").mkdir()
    for name, key in keys.items():
        (root / "keys" / name).write_text(entry_json(key, f"team-{name}", **ROOMY))
    with (
        local_api(
            model_name=MODEL,
            variant="omni",
            images_dir=root / "images",
            keys_dir=str(root / "keys"),
            rate_per_second=1000,
            rate_burst=1000,  # polling for results is not what these tests limit
        ) as la,  # fmt: skip
        serve_in_thread(la.app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['a']}"}, timeout=120) as a,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['b']}"}, timeout=120) as b,
    ):
        yield Stack(a, b, root / "images", url, keys["a"])


def upload(c: httpx.Client, color: tuple[int, int, int] = (200, 30, 30), purpose: str = "image") -> str:
    r = c.post("/v1/uploads", files={"file": ("x.png", png(64, 64, color=color))}, data={"purpose": purpose})
    assert r.status_code == 201, r.text
    return str(r.json()["uri"])


def finished(c: httpx.Client, job: str) -> dict[str, Any] | None:
    body: dict[str, Any] = c.get(f"/v1/jobs/{job}").json()
    return body if body["phase"] in ("Succeeded", "Failed", "Cancelled") else None


def job_count(c: httpx.Client) -> int:
    return len(c.get("/v1/jobs", params={"limit": 500}).json()["data"])


def uploads(stack: Stack, tenant: str = "team-a") -> int:
    area = stack.images / "tenants" / tenant / "uploads"
    return sum(1 for p in area.rglob("*") if p.is_file()) if area.exists() else 0


def test_an_omni_edit_with_two_reference_images_succeeds(stack: Stack) -> None:
    image, refs = upload(stack.a), [upload(stack.a, (30, 200, 30)), upload(stack.a, (30, 30, 200))]
    r = stack.a.post("/v1/jobs", json={**SMALL, "task": "edit", "inputImage": image, "referenceImages": refs})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["referenceImages"] == refs and r.json()["request"]["inputImage"] == image
    done = wait_for(lambda: finished(stack.a, r.json()["id"]), timeout=90, what="the omni edit")
    assert done["phase"] == "Succeeded", done
    [result] = done["images"]
    assert (result["width"], result["height"]) == (64, 64)
    picture = Image.open(io.BytesIO(httpx.get(result["url"]).raise_for_status().content))
    assert picture.size == (64, 64)


def test_models_state_the_variant_its_tasks_and_reference_images(stack: Stack) -> None:
    data = stack.a.get("/v1/models").json()["data"]
    [model] = [m for m in data if m["id"] == MODEL]
    assert model["variant"] == "omni"
    assert model["tasks"] == ["text-to-image", "edit"] and model["max_reference_images"] == 3
    [alias] = [m for m in data if m["id"] == "omni"]  # the variant's name stands for it, and says the same
    assert alias["alias_of"] == MODEL and alias["tasks"] == model["tasks"]


@pytest.mark.parametrize(
    ("change", "code", "param", "words"),
    [
        ({"task": "inpaint", "mask": True}, "unsupported_task", "task", "does text-to-image and edit, not inpaint"),
        ({"task": "image-to-image"}, "unsupported_task", "task", "not image-to-image"),
        ({"task": "edit", "refs": 4}, "invalid_value", "referenceImages", "at most 3 items"),
        ({"task": "text-to-image", "refs": 1}, "invalid_value", "referenceImages", "only allowed when task is edit"),
    ],
    ids=["inpaint", "image-to-image", "four-references", "references-without-edit"],
)
def test_what_omni_cannot_do_is_a_400_naming_the_field(
    stack: Stack, change: dict[str, Any], code: str, param: str, words: str
) -> None:
    body: dict[str, Any] = {**SMALL, "task": change["task"]}
    if change["task"] != "text-to-image":
        body["inputImage"] = upload(stack.a)
    if change.get("mask"):
        body["maskImage"] = upload(stack.a, purpose="mask")
    if change.get("refs"):
        body["referenceImages"] = [upload(stack.a) for _ in range(change["refs"])]
    before = job_count(stack.a)
    r = stack.a.post("/v1/jobs", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and words in error["message"], error
    assert job_count(stack.a) == before  # nothing created or queued


def test_another_tenants_upload_is_no_reference_image(stack: Stack) -> None:
    theirs = upload(stack.b)
    body = {**SMALL, "task": "edit", "inputImage": upload(stack.a), "referenceImages": [upload(stack.a), theirs]}
    r = stack.a.post("/v1/jobs", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "referenceImages.1", r.text
    assert "your objects" in r.json()["error"]["message"]


def test_openai_edits_send_the_further_images_as_references(stack: Stack) -> None:
    files = [("image[]", ("a.png", png(64, 64))), ("image[]", ("b.png", png(64, 64, color=(0, 0, 255))))]
    form = {"prompt": "the two as one", "model": "omni", "size": "64x64", "response_format": "b64_json"}
    r = stack.a.post("/v1/images/edits", files=files, data=form)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "64x64" and len(r.json()["data"]) == 1
    [job] = [
        j
        for j in stack.a.get("/v1/jobs", params={"limit": 500}).json()["data"]
        if j["request"]["prompt"] == form["prompt"]
    ]
    request = job["request"]
    assert request["task"] == "edit" and request["model"] == MODEL
    assert request["inputImage"].endswith("/image.png") and len(request["referenceImages"]) == 1


@pytest.mark.parametrize(
    ("images", "mask", "param", "words"),
    [
        (1, True, "mask", "without a mask"),
        (5, False, "image", "at most 3 more"),
    ],
    ids=["mask", "five-images"],
)
def test_openai_edits_refuse_what_omni_cannot_do_before_storing_anything(
    stack: Stack, images: int, mask: bool, param: str, words: str
) -> None:
    files = [("image[]", (f"{i}.png", png(64, 64))) for i in range(images)]
    if mask:
        files.append(("mask", ("mask.png", png(64, 64, "RGBA", (0, 0, 0, 0)))))
    before = uploads(stack)
    r = stack.a.post("/v1/images/edits", files=files, data={"prompt": "x", "size": "64x64"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_task", param) and words in error["message"], error
    assert uploads(stack) == before


def test_zimage_generate_through_the_api_sends_its_references(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in.png").write_bytes(png(64, 64))
    (tmp_path / "ref.png").write_bytes(png(64, 64, color=(0, 0, 255)))
    monkeypatch.setenv("ZIMAGE_API_KEY", stack.key_a)
    prompt = "the cli's two as one"
    argv = ["generate", prompt, "--api", stack.url, "--image", str(tmp_path / "in.png"), "--reference"]
    assert cli.main([*argv, str(tmp_path / "ref.png"), "-o", str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    jobs = stack.a.get("/v1/jobs", params={"limit": 500}).json()["data"]
    [request] = [j["request"] for j in jobs if j["request"]["prompt"] == prompt]
    assert request["task"] == "edit" and len(request["referenceImages"]) == 1


@pytest.mark.parametrize(
    ("spec", "tasks", "references"),
    [
        ({}, ["text-to-image", "image-to-image", "inpaint"], 0),  # turbo, the CRD's default
        ({"model": {"variant": "edit"}}, ["edit"], 0),
        ({"model": {"variant": "omni"}}, ["text-to-image", "edit"], 3),
        ({"model": {"variant": "omni-2"}}, None, None),  # newer than this API: its workers judge
        ({"backend": "remote", "remote": {}}, None, None),  # not a Z-Image variant: its backend judges
        ({"backend": "function", "function": {}}, None, None),
    ],
    ids=["turbo", "edit", "omni", "unknown-variant", "remote", "function"],
)
def test_a_models_tasks_come_from_its_variant_where_the_api_judges(
    spec: dict[str, Any], tasks: list[str] | None, references: int | None
) -> None:
    view = model_view({"metadata": {"name": "m"}, "spec": spec}, QueueStats(queued=0, in_flight=0))
    assert (view.tasks, view.max_reference_images) == (tasks, references)
