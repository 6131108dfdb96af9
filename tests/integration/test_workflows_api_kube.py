"""/v1/workflows in cluster mode against the real test-bed API server (no operator: the API only creates, reads and
cancels ImageWorkflows; the operator's run of them is tests/integration/test_workflow_kube.py). What is checked: the
object the API creates (tenant label, spec as sent, in the API's namespace), tenant-scoped reads and lists, cancel as
a merge patch the CRD's CEL accepts, and the event stream following status written by someone else."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from conftest import REPO, Kube
from zimage_api.apikeys import entry_json, new_key
from zimage_api.app import create_app
from zimage_api.kube_store import KubeJobStore
from zimage_api.settings import ApiSettings
from zimage_api.store import TENANT_LABEL
from zimage_operator.types import GROUP, VERSION
from zimage_operator.workflow_types import IMAGEWORKFLOW_PLURAL
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.kube
MODEL = "z-image-turbo"


def step(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "model": MODEL, "params": {"prompt": f"a {name}", "width": 64, "height": 64}, **kw}


class As:
    """Requests of one tenant (its key) through the shared client."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}

    def get(self, url: str) -> Any:
        return self.client.get(url, headers=self.headers)

    def post(self, url: str, json: Any = None) -> Any:
        return self.client.post(url, json=json, headers=self.headers)

    def stream(self, method: str, url: str) -> Any:
        return self.client.stream(method, url, headers=self.headers)


def wf_cr(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kube.kubectl("get", "imageworkflow", name, "-n", ns, "-o", "json").stdout)
    return out


@pytest.fixture
def clients(crds: Kube, namespace: str, tmp_path: Path) -> Iterator[tuple[As, As, Any]]:
    """Clients of tenants team-a and team-b on an API of ``namespace``; and the CustomObjectsApi."""
    crds.kubectl("apply", "-n", namespace, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys = {}
    for tenant in ("team-a", "team-b"):
        key_id = tenant.replace("-", "")
        keys[tenant] = new_key(key_id)
        (keys_dir / key_id).write_text(entry_json(keys[tenant], tenant, ratePerSecond=1000, burst=1000))
    api_client = kube_config.new_client_from_config(config_file=crds.env["KUBECONFIG"])
    with RedisServer() as srv:
        settings = ApiSettings(redis_url=srv.url, namespace=namespace, keys_dir=str(keys_dir))
        app = create_app(settings, KubeJobStore(namespace, api_client))
        try:
            with TestClient(app) as client:  # one client: the app's lifespan runs once
                a, b = (As(client, keys[t]) for t in ("team-a", "team-b"))
                yield a, b, kube_client.CustomObjectsApi(api_client)
        finally:
            api_client.close()


def test_workflows_api_on_the_cluster(crds: Kube, namespace: str, clients: tuple[As, As, Any]) -> None:
    a, b, custom = clients
    body = {
        "inputs": {"animals": ["fox", "owl"]},
        "steps": [
            step("bg"),
            step("each", forEach="{{ inputs.animals }}", dependsOn=["bg"], params={"prompt": "a {{ item }}"}),
        ],
    }

    # -- validation happens before anything is created ------------------------------------------------------------
    cycle = {"steps": [step("x", dependsOn=["y"]), step("y", dependsOn=["x"])]}
    resp = a.post("/v1/workflows", json=cycle)
    assert resp.status_code == 400 and "dependency cycle" in resp.json()["error"]["message"], resp.text
    resp = a.post("/v1/workflows", json={"steps": [{**step("x"), "model": "nope"}]})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", resp.text
    assert json.loads(crds.kubectl("get", "imageworkflows", "-n", namespace, "-o", "json").stdout)["items"] == []

    # -- create: an ImageWorkflow in the API's namespace, labelled with the tenant ----------------------------------
    resp = a.post("/v1/workflows", json={**body, "name": "pipeline"})
    assert resp.status_code == 201, resp.text
    wid = resp.json()["id"]
    assert wid == "team-a-pipeline" and resp.json()["phase"] == "Pending"
    obj = wf_cr(crds, namespace, wid)
    assert obj["metadata"]["labels"][TENANT_LABEL] == "team-a"
    assert obj["spec"]["steps"][1]["forEach"] == "{{ inputs.animals }}" and obj["spec"]["inputs"] == body["inputs"]
    assert obj["spec"]["cancel"] is False
    again = a.post("/v1/workflows", json={**body, "name": "pipeline"})
    assert again.status_code == 200 and again.json()["id"] == wid
    other = b.post("/v1/workflows", json={"steps": [step("solo")]}).json()["id"]

    # -- tenant-scoped reads -----------------------------------------------------------------------------------------
    view = a.get(f"/v1/workflows/{wid}").json()
    assert [s["name"] for s in view["steps"]] == ["bg", "each"] and view["request"] == obj["spec"]
    assert view["createdAt"] == obj["metadata"]["creationTimestamp"]
    assert b.get(f"/v1/workflows/{wid}").status_code == 404
    assert a.get(f"/v1/workflows/{other}").status_code == 404
    assert [w["id"] for w in a.get("/v1/workflows").json()["data"]] == [wid]
    assert [w["id"] for w in b.get("/v1/workflows").json()["data"]] == [other]
    assert b.post(f"/v1/workflows/{wid}/cancel").status_code == 404

    # -- events follow the status whoever writes it (here: the test, as the operator would) ------------------------
    def operator_writes() -> None:
        for phase in ("Running", "Succeeded"):
            time.sleep(1.0)
            status = {"phase": phase, "progress": {"stepsDone": 2 if phase == "Succeeded" else 0, "stepsTotal": 2}}
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, IMAGEWORKFLOW_PLURAL, other, {"status": status}
            )

    writer = threading.Thread(target=operator_writes)
    writer.start()
    kinds = []
    with b.stream("GET", f"/v1/workflows/{other}/events") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
    writer.join()
    assert kinds == ["pending", "running", "succeeded"]

    # -- cancel: a merge patch of spec.cancel, which the CRD's CEL allows -------------------------------------------
    resp = a.post(f"/v1/workflows/{wid}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["cancelRequested"] is True
    assert wf_cr(crds, namespace, wid)["spec"]["cancel"] is True
    assert wf_cr(crds, namespace, wid)["spec"]["steps"] == obj["spec"]["steps"]
    # A finished workflow is left as it is.
    assert b.post(f"/v1/workflows/{other}/cancel").json()["cancelRequested"] is False
