"""Remote ModelDeployments on the test bed: the operator, and `zimage dev up`'s forwarders (the test bed has no
kubelet) calling provider stand-ins on loopback. An ImageJob on a remote pool succeeds with the provider's image;
when provider A is down, its jobs move to the fallback B and succeed there, and the ImageJob says why."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench.provider import ProviderStandIn
from conftest import Kube, dev_stack_in
from zimage_api.dev import DevStack

pytestmark = pytest.mark.kube


def remote_pool(name: str, url: str, secret: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "backend": "remote",
            "remote": {"api": "images", "baseUrl": url, "model": "gpt-image-1", "keysSecret": secret,
                       "limits": {"requestsPerWindow": 10, "windowSeconds": 1}, "maxAttempts": 2},
            "scaling": {"minReplicas": 0, "maxReplicas": 2},
            **spec,
        },
    }  # fmt: skip


def image_job(name: str, model: str) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": name},
        "spec": {"model": model, "prompt": "a red fox", "width": 256, "height": 256},
    }


@pytest.fixture
def dev_stack(crds: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DevStack, str]]:
    ns = f"remote-{os.getpid()}"
    with dev_stack_in(crds, ns, tmp_path / "dev", monkeypatch) as stack:
        yield stack, ns


def test_imagejobs_on_remote_pools_and_their_fallback(crds: Kube, dev_stack: tuple[DevStack, str]) -> None:
    stack, ns = dev_stack
    with ProviderStandIn(["sk-a"], down=True) as a, ProviderStandIn(["sk-b"]) as b:
        for secret, key in (("keys-a", "sk-a"), ("keys-b", "sk-b")):
            crds.kubectl("create", "secret", "generic", secret, "-n", ns, f"--from-literal=k1={key}")
        crds.apply(
            ns,
            remote_pool("provider-b", b.url, "keys-b"),
            remote_pool("provider-a", a.url, "keys-a", fallbacks={"unavailable": ["provider-b"]}),
        )
        crds.apply(ns, image_job("direct", "provider-b"), image_job("moved", "provider-a"))
        for name in ("direct", "moved"):
            crds.kubectl("wait", "-n", ns, "--for=condition=Succeeded", f"ij/{name}", "--timeout=120s", timeout=130)
        jobs = {
            j["metadata"]["name"]: j
            for j in json.loads(crds.kubectl("get", "ij", "-n", ns, "-o", "json").stdout)["items"]
        }
        for job in jobs.values():
            [result] = job["status"]["results"]
            with Image.open(Path(result["uri"].removeprefix("file://"))) as img:
                assert img.size == (256, 256)
        moved = jobs["moved"]["status"]
        assert moved["routedTo"] == "provider-b"
        assert a.statuses()[503] >= 1 and b.statuses()[200] == 2
        events = crds.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=moved").stdout
        assert "its provider was unavailable" in events, events
        forwarders = [n for n in stack.children if n.startswith("worker/")]
        assert sorted(forwarders) == [f"worker/{ns}/provider-a/0", f"worker/{ns}/provider-b/0"]
