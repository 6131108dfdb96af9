"""ImageWorkflows on the test bed: the operator, and `zimage dev up`'s local processes for every pool (a forwarder
against the provider stand-in, a tiny-model GPU worker, function workers; the test bed has no kubelet). The
example pipeline (docs/examples/workflow-product.yaml) reaches Succeeded with every step's outputs in its status;
with provider A answering 503 to everything, the LLM step falls back to B and the workflow still succeeds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from bench.provider import ProviderStandIn
from conftest import REPO, Kube, dev_stack_in, product_photo_and_mask
from zimage_api.dev import DevStack

pytestmark = pytest.mark.kube
EXAMPLE = REPO / "docs" / "examples" / "workflow-product.yaml"


@pytest.fixture
def dev_stack(crds: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DevStack, str]]:
    ns = f"wf-{os.getpid()}"
    with dev_stack_in(crds, ns, tmp_path / "dev", monkeypatch, model_source="tiny-random") as stack:
        yield stack, ns


def product_inputs(images: Path, ns: str) -> dict[str, str]:
    """A product photo and its mask in the namespace's (tenant's) part of the store."""
    photo, mask = product_photo_and_mask(images / "tenants" / ns / "uploads")
    return {"product": photo.as_uri(), "mask": mask.as_uri()}


def example(base_url: str, inputs: dict[str, str]) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    for d in docs:
        if d["kind"] == "ModelDeployment" and d["spec"].get("backend") == "remote":
            d["spec"]["remote"]["baseUrl"] = base_url
        if d["kind"] == "ImageWorkflow":
            d["spec"]["inputs"].update(inputs)
    return docs


def get(kube: Kube, ns: str, what: str) -> Any:
    return json.loads(kube.kubectl("get", what, "-n", ns, "-o", "json").stdout)


def open_uri(uri: str) -> Image.Image:
    return Image.open(Path(uri.removeprefix("file://")))


def test_the_example_workflow_and_a_fallback_on_the_test_bed(crds: Kube, dev_stack: tuple[DevStack, str]) -> None:
    stack, ns = dev_stack
    with ProviderStandIn(["sk-demo-1", "sk-demo-2"]) as good, ProviderStandIn(["sk-a"], down=True) as down:
        docs = example(good.url, product_inputs(stack.images, ns))
        workflow = next(d for d in docs if d["kind"] == "ImageWorkflow")
        # The same pipeline on provider A (503 to every call), whose pool falls back to the example's LLM pool.
        crds.kubectl("create", "secret", "generic", "keys-a", "-n", ns, "--from-literal=k1=sk-a")
        llm = next(d for d in docs if d["metadata"]["name"] == "llm")
        llm_a = json.loads(json.dumps(llm))
        llm_a["metadata"]["name"] = "llm-a"
        llm_a["spec"]["remote"].update(baseUrl=down.url, keysSecret="keys-a", maxAttempts=2)
        llm_a["spec"]["fallbacks"] = {"unavailable": ["llm"]}
        moved = json.loads(json.dumps(workflow))
        moved["metadata"]["name"] = "sneaker-a"
        moved["spec"]["steps"][0]["model"] = "llm-a"
        crds.apply(ns, *docs, llm_a, moved)

        for name in ("sneaker", "sneaker-a"):
            crds.kubectl("wait", "-n", ns, "--for=condition=Succeeded", f"iw/{name}", "--timeout=240s", timeout=250)

        wf = get(crds, ns, "iw/sneaker")
        status = wf["status"]
        assert status["phase"] == "Succeeded" and status["progress"]["summary"] == "4/4"
        steps = {s["name"]: s for s in status["steps"]}
        assert all(s["phase"] == "Succeeded" for s in steps.values())
        [enhance] = steps["enhance"]["instances"]
        assert enhance["text"].startswith("Stand-in reply to: Write a vivid one-sentence image prompt for: a white")
        [background] = steps["background"]["instances"]
        [compose] = steps["compose"]["instances"]
        with open_uri(background["images"][0]) as bg, open_uri(compose["images"][0]) as composed:
            assert bg.size == composed.size == (512, 512)
            assert composed.getpixel((256, 256))[:3] == (200, 30, 30)  # the product's colour, through its mask
            assert bg.getpixel((256, 256))[:3] != (200, 30, 30)
        sizes = []
        for inst in steps["resize"]["instances"]:
            with open_uri(inst["images"][0]) as img:
                sizes.append(img.size)
        assert sizes == [(512, 512), (768, 256)]

        jobs = get(crds, ns, "ij")["items"]
        mine = {j["metadata"]["name"]: j for j in jobs if j["metadata"]["labels"]["zimage.dev/workflow"] == "sneaker"}
        assert sorted(mine) == [
            "sneaker-background",
            "sneaker-compose",
            "sneaker-enhance",
            "sneaker-resize-0",
            "sneaker-resize-1",
        ]
        for job in mine.values():
            assert job["status"]["phase"] == "Succeeded"
            assert job["metadata"]["ownerReferences"][0]["uid"] == wf["metadata"]["uid"]
        assert mine["sneaker-background"]["spec"]["prompt"] == enhance["text"]

        fell_back = get(crds, ns, "iw/sneaker-a")["status"]
        [enhance_a] = next(s for s in fell_back["steps"] if s["name"] == "enhance")["instances"]
        assert enhance_a["routedTo"] == "llm" and "its provider was unavailable" in enhance_a["message"]
        assert down.statuses()[503] >= 1
        events = crds.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=sneaker-a").stdout
        assert "StepRerouted" in events and "Completed" in events, events

        # Deleting a workflow deletes its step jobs (owner references).
        crds.kubectl("delete", "iw", "sneaker", "-n", ns, "--wait=true", timeout=60)
        crds.kubectl("wait", "-n", ns, "--for=delete", "ij/sneaker-enhance", "--timeout=60s", timeout=70)
