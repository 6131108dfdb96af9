"""GitOps support (docs/gitops.md): the Argo CD health checks, the doc that shows them, the example kustomization.

The Lua health scripts run for real (lupa, Lua 5.1 like Argo CD's gopher-lua) against the statuses the operator
itself writes: ImageJob statuses from the pure decisions in ``reconcile``, ModelDeployment statuses from a pass of
``pools.sync`` over fake Kubernetes and queue clients. A change in what the operator writes that the scripts do
not follow fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from zimage_operator import pools
from zimage_operator.reconcile import admit, cancel_patch, event_patch, timeout_patch
from zimage_operator.types import Reason
from zimage_queue import JobEvent
from zimage_queue.message import ResultImage
from zimage_queue.queue import QueueStats

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "gitops.md"
SCRIPTS = {
    "ImageJob": REPO / "docs" / "gitops" / "argocd-health-imagejob.lua",
    "ModelDeployment": REPO / "docs" / "gitops" / "argocd-health-modeldeployment.lua",
    "ImageWorkflow": REPO / "docs" / "gitops" / "argocd-health-imagejob.lua",  # the same phases: one script
}
KUSTOMIZE = REPO / "docs" / "examples" / "kustomize"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing"}
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


# --- running the scripts the way Argo CD does -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lua() -> ModuleType:
    lupa = pytest.importorskip("lupa", reason="pip install lupa (in the dev extra)")
    try:
        from lupa import lua51  # Argo CD's gopher-lua implements Lua 5.1

        return lua51
    except ImportError:
        return lupa


def to_lua(runtime: Any, value: Any) -> Any:
    """JSON-shaped Python -> Lua tables: objects keyed by name, arrays 1-based, null absent (as Argo CD does)."""
    if isinstance(value, dict):
        table = runtime.table()
        for k, v in value.items():
            if v is not None:
                table[k] = to_lua(runtime, v)
        return table
    if isinstance(value, list):
        table = runtime.table()
        for i, v in enumerate(value, 1):
            table[i] = to_lua(runtime, v)
        return table
    return value


def health(lua: ModuleType, obj: dict[str, Any]) -> tuple[str, str]:
    """Run the kind's script with a global ``obj``, in a state without os/io/require (Argo CD opens only the safe
    libraries), and return (status, message). The script must leave no globals behind."""
    script = SCRIPTS[obj["kind"]].read_text()
    runtime = lua.LuaRuntime(unpack_returned_tuples=False)
    g = runtime.globals()
    for name in ("os", "io", "debug", "package", "require", "dofile", "loadfile"):
        g[name] = None
    g.obj = to_lua(runtime, json.loads(json.dumps(obj)))  # the JSON round trip Argo CD's object goes through
    before = set(g)
    hs = runtime.execute(script)
    assert set(g) == before, "the script set globals: use local"
    result = dict(hs.items())
    assert set(result) == {"status", "message"}, result
    assert result["status"] in ARGO_STATUSES and isinstance(result["message"], str) and result["message"]
    return result["status"], result["message"]


# --- ImageJob: statuses from reconcile's decisions --------------------------------------------------------------------

JOB_META = {
    "uid": "u-1",
    "namespace": "ns",
    "name": "fox",
    "generation": 1,
    "creationTimestamp": "2026-11-23T11:00:00Z",
}
JOB_SPEC = {"model": "z-image-turbo", "prompt": "a red fox", "timeoutSeconds": 900}
MODEL = {"spec": {"model": {"variant": "turbo"}}}


def image_job(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {**JOB_META, "generation": generation},
        "spec": JOB_SPEC,
    }
    if status is not None:
        obj["status"] = status
    return obj


def after(status: dict[str, Any], event_type: str, **kw: Any) -> dict[str, Any]:
    event = JobEvent(type=event_type, uid="u-1", namespace="ns", name="fox", ts=NOW.timestamp(), **kw)  # type: ignore[arg-type]
    patch, _ = event_patch(status, event, NOW, generation=1)
    assert patch is not None
    return {**status, **patch}


def queued() -> dict[str, Any]:
    return admit(spec=JOB_SPEC, status={}, meta=JOB_META, model=MODEL, now=NOW).patch


def running() -> dict[str, Any]:
    started = after(queued(), "started", worker="w-1", attempt=1, total_steps=8)
    return after(started, "progress", step=3, total_steps=8)


def succeeded() -> dict[str, Any]:
    image = ResultImage(uri="file:///data/fox.png", width=1024, height=1024, seed=42, sha256="0" * 64, bytes=1)
    return after(running(), "succeeded", worker="w-1", attempt=1, results=[image], run_seconds=2.0)


def test_imagejob_without_status_is_progressing(lua: ModuleType) -> None:
    assert health(lua, image_job(None)) == ("Progressing", "Waiting for the zimage operator to admit the job")
    # kopf's bookkeeping can land before the first phase
    assert health(lua, image_job({"kopf": {"progress": {}}}))[0] == "Progressing"


def test_imagejob_pending_queued_running_are_progressing(lua: ModuleType) -> None:
    pending = admit(spec=JOB_SPEC, status={}, meta=JOB_META, model=None, now=NOW).patch
    assert pending["phase"] == "Pending"
    status, message = health(lua, image_job(pending))
    assert status == "Progressing" and message.startswith("Pending: ModelDeployment 'z-image-turbo' not found")

    assert health(lua, image_job(queued())) == (
        "Progressing",
        "Queued: enqueued on z-image-turbo (normal priority)",
    )
    assert health(lua, image_job(running())) == ("Progressing", "Running 3/8: running on w-1 (attempt 1)")

    retrying = after(running(), "retrying", attempt=1, reason="WorkerError", message="CUDA out of memory")
    assert retrying["phase"] == "Queued"
    status, message = health(lua, image_job(retrying))
    assert status == "Progressing" and message.startswith("Queued: attempt 1 failed (WorkerError: CUDA out of memory)")


def test_imagejob_succeeded_is_healthy(lua: ModuleType) -> None:
    assert health(lua, image_job(succeeded())) == ("Healthy", "1 image(s) stored")


def test_imagejob_failed_is_degraded_with_the_reason(lua: ModuleType) -> None:
    worker = after(running(), "failed", attempt=4, message="CUDA out of memory")
    assert health(lua, image_job(worker)) == ("Degraded", "Failed (WorkerError): CUDA out of memory")

    late = JOB_META | {"creationTimestamp": (NOW - timedelta(seconds=901)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    timed_out = timeout_patch(JOB_SPEC, running(), late, NOW)
    assert timed_out is not None
    assert health(lua, image_job({**running(), **timed_out})) == (
        "Degraded",
        "Failed (Timeout): not finished within timeoutSeconds=900",
    )

    invalid = admit(spec={**JOB_SPEC, "width": 1000}, status={}, meta=JOB_META, model=MODEL, now=NOW)
    assert invalid.action == "fail"
    status, message = health(lua, image_job(invalid.patch))
    assert status == "Degraded" and message.startswith("Failed (InvalidSpec): spec.width")


def test_imagejob_cancelled_is_degraded(lua: ModuleType) -> None:
    """Terminal and without the images: Degraded (Suspended would mean it can resume, and hang a sync hook)."""
    by_api = cancel_patch(running(), NOW, 1, Reason.CANCELLED, "cancelled through the API")
    assert by_api is not None
    assert health(lua, image_job({**running(), **by_api})) == ("Degraded", "Cancelled: cancelled through the API")

    by_worker = after(running(), "cancelled", attempt=1)
    assert health(lua, image_job(by_worker)) == ("Degraded", "Cancelled: Cancelled")


def test_imagejob_generation(lua: ModuleType) -> None:
    """An unfinished job says its spec moved on; a finished one keeps its health (an edit never runs it again)."""
    status, message = health(lua, image_job(queued(), generation=2))
    assert status == "Progressing"
    assert message.endswith("(status is for generation 1, the spec is at 2)")
    assert health(lua, image_job(queued(), generation=1))[1] == "Queued: enqueued on z-image-turbo (normal priority)"
    assert health(lua, image_job(succeeded(), generation=2)) == ("Healthy", "1 image(s) stored")
    assert health(lua, image_job(after(running(), "failed", message="boom"), generation=3))[0] == "Degraded"


# --- ModelDeployment: statuses from one pass of pools.sync ------------------------------------------------------------


class FakeKube:
    def __init__(self, deployment: dict[str, Any] | None, job: dict[str, Any] | None) -> None:
        self.live = {"Deployment": deployment, "Job": job}
        self.status: dict[str, Any] | None = None

    def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.live.get(kind)

    def as_served(self, obj: dict[str, Any]) -> dict[str, Any]:
        return obj

    def create_object(self, obj: dict[str, Any]) -> None:
        pass

    def patch_object(self, obj: dict[str, Any]) -> None:
        pass

    def post_event(self, *args: Any) -> None:
        pass

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status = status

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return []

    def annotate_pod(self, *args: Any) -> None:
        pass


class FakeQueue:
    def __init__(self, queued: int) -> None:
        self.queued = queued

    def stats(self, queue: str) -> QueueStats:
        return QueueStats(queued=self.queued, in_flight=0)

    def workers(self, queue: str) -> dict[str, bool]:
        return {}

    def reroute(self, *args: Any) -> int:
        return 0


def model_deployment(
    *,
    replicas: int = 0,
    ready: int = 0,
    queued: int = 0,
    spec: dict[str, Any] | None = None,
    preload_job: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ModelDeployment with the status one pass of the operator's pool loop writes for this situation."""
    md: dict[str, Any] = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "z-image-turbo", "namespace": "ns", "uid": "md-1", "generation": 1},
        "spec": spec or {"model": {"variant": "turbo"}, "scaling": {"minReplicas": 0, "maxReplicas": 4}},
    }
    deployment = {"spec": {"replicas": replicas}, "status": {"replicas": replicas, "readyReplicas": ready}}
    kube = FakeKube(deployment, preload_job)
    from zimage_operator.settings import OperatorSettings

    settings = OperatorSettings(
        redis_url="redis://redis:6379/0", max_job_seconds=3600, drift_check_seconds=60, job_retention_seconds=3600
    )
    rt = SimpleNamespace(
        kube=kube, queue=FakeQueue(queued), settings=settings, lease=SimpleNamespace(check=lambda: None)
    )
    pools.sync(rt, pools.Pool(body=md), NOW)  # type: ignore[arg-type]
    assert kube.status is not None
    return {**md, "status": kube.status}


def condition(obj: dict[str, Any], type_: str) -> tuple[str, str]:
    c = next(c for c in obj["status"]["conditions"] if c["type"] == type_)
    return c["status"], c["reason"]


def test_modeldeployment_without_status_is_progressing(lua: ModuleType) -> None:
    md = model_deployment()
    bare = {k: v for k, v in md.items() if k != "status"}
    assert health(lua, bare) == ("Progressing", "Waiting for the zimage operator to reconcile the pool")
    assert health(lua, {**bare, "status": {"kopf": {"progress": {}}}})[0] == "Progressing"


def test_idle_pool_scaled_to_zero_is_healthy(lua: ModuleType) -> None:
    md = model_deployment(replicas=0, ready=0, queued=0)
    assert condition(md, "Available") == ("True", "ScaledToZero")  # what pools.py writes for an idle pool
    assert md["status"]["readyReplicas"] == 0 and md["status"]["desiredReplicas"] == 0
    assert health(lua, md) == ("Healthy", "ScaledToZero: 0/0 workers ready")


def test_serving_pool_is_healthy_even_while_scaling(lua: ModuleType) -> None:
    steady = model_deployment(replicas=2, ready=2, queued=8)
    assert health(lua, steady) == ("Healthy", "WorkersReady: 2/2 workers ready")

    growing = model_deployment(replicas=1, ready=1, queued=12)
    assert condition(growing, "Scaling") == ("True", "ScaleUp")
    status, message = health(lua, growing)
    assert status == "Healthy"
    assert message.startswith("WorkersReady: 1/3 workers ready; scaling (ScaleUp: 1 ready of 3 wanted")


def test_pool_waking_from_zero_is_progressing(lua: ModuleType) -> None:
    md = model_deployment(replicas=0, ready=0, queued=1)
    assert condition(md, "Available") == ("False", "NoReadyWorkers")
    assert health(lua, md) == ("Progressing", "NoReadyWorkers: 0/1 workers ready")


def test_model_cache_download_is_progressing_then_healthy(lua: ModuleType) -> None:
    spec = {"model": {"variant": "turbo"}, "cache": {"size": "50Gi", "preload": True}}
    downloading = model_deployment(queued=1, spec=spec, preload_job={"status": {"active": 1}})
    # The workers are held at zero until the download is done, so Available alone would say "idle, healthy".
    assert condition(downloading, "Available") == ("True", "ScaledToZero")
    assert condition(downloading, "ModelCached") == ("False", "Downloading")
    assert health(lua, downloading) == ("Progressing", "Downloading: preload Job is downloading the model")

    cached = model_deployment(queued=0, spec=spec, preload_job={"status": {"succeeded": 1}})
    assert condition(cached, "ModelCached") == ("True", "Preloaded")
    assert health(lua, cached) == ("Healthy", "ScaledToZero: 0/0 workers ready")


def test_invalid_spec_is_degraded(lua: ModuleType) -> None:
    md = model_deployment(spec={"scaling": {"minReplicas": 5, "maxReplicas": 2}})
    assert condition(md, "Degraded") == ("True", "InvalidSpec")
    assert health(lua, md) == ("Degraded", "InvalidSpec: spec.scaling: minReplicas (5) exceeds maxReplicas (2)")


def test_status_older_than_the_spec_is_progressing(lua: ModuleType) -> None:
    """After an edit the old conditions describe the old spec: a fixed spec is not Degraded, a broken one not
    Healthy, until the operator has looked at it."""
    for md in (model_deployment(spec={"scaling": {"minReplicas": 5, "maxReplicas": 2}}), model_deployment()):
        edited = {**md, "metadata": {**md["metadata"], "generation": 2}}
        assert health(lua, edited) == ("Progressing", "Waiting for the zimage operator to observe generation 2")


# --- the doc ----------------------------------------------------------------------------------------------------------


def doc_yaml() -> list[dict[str, Any]]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert blocks
    return [d for block in blocks for d in yaml.safe_load_all(block) if d]


def crd_names() -> dict[str, str]:
    """kind -> group, from the chart's CRDs of our own group (kopf's peering kinds have no health to report)."""
    folder = REPO / "charts" / "zimage-operator" / "crds"
    crds = [yaml.safe_load(p.read_text()) for p in sorted(folder.glob("*.yaml"))]
    return {c["spec"]["names"]["kind"]: c["spec"]["group"] for c in crds if c["spec"]["group"] != "kopf.dev"}


def test_doc_embeds_the_lua_files_unchanged() -> None:
    (cm,) = [d for d in doc_yaml() if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "argocd-cm"]
    assert cm["metadata"]["namespace"] == "argocd"
    groups = crd_names()
    assert set(groups) == set(SCRIPTS)
    assert cm["data"] == {
        f"resource.customizations.health.{groups[kind]}_{kind}": path.read_text() for kind, path in SCRIPTS.items()
    }


def test_doc_manifests_point_at_this_repository() -> None:
    docs = doc_yaml()
    apps = [d for d in docs if d.get("kind") == "Application"]
    assert {a["spec"]["source"]["path"] for a in apps} == {"charts/zimage-operator", "docs/examples/kustomize"}
    for app in apps:
        assert (REPO / app["spec"]["source"]["path"]).is_dir()
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]

    (release,) = [d for d in docs if d.get("kind") == "HelmRelease"]
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    assert (REPO / release["spec"]["chart"]["spec"]["chart"]).is_dir()
    assert release["spec"]["upgrade"]["crds"] == "CreateReplace"

    (flux_ks,) = [d for d in docs if d.get("kind") == "Kustomization" and "healthCheckExprs" in d.get("spec", {})]
    assert (REPO / flux_ks["spec"]["path"]).is_dir()
    groups = crd_names()
    assert {(e["apiVersion"], e["kind"]) for e in flux_ks["spec"]["healthCheckExprs"]} == {
        (f"{group}/v1alpha1", kind) for kind, group in groups.items()
    }

    hooks = [d for d in docs if d.get("kind") == "ImageJob"]
    assert hooks and all(h["metadata"]["annotations"]["argocd.argoproj.io/hook"] for h in hooks)


# --- the example kustomization ----------------------------------------------------------------------------------------


def test_kustomization_copies_equal_the_examples() -> None:
    for name in ("modeldeployment.yaml", "imagejob.yaml"):
        assert (KUSTOMIZE / name).read_text() == (REPO / "docs" / "examples" / name).read_text(), name


def test_example_kustomization_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == [
        ("ImageJob", "red-fox"),
        ("ModelDeployment", "z-image-turbo"),
    ]
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    labels = {k: v for entry in kustomization["labels"] for k, v in entry["pairs"].items()}
    assert kustomization["namespace"] == "zimage" and labels
    for d in rendered:
        assert d["apiVersion"] == "zimage.dev/v1alpha1"
        assert d["metadata"]["namespace"] == "zimage"
        assert labels.items() <= d["metadata"]["labels"].items()
        source = yaml.safe_load((KUSTOMIZE / f"{d['kind'].lower()}.yaml").read_text())
        assert d["spec"] == source["spec"]
    job = next(d for d in rendered if d["kind"] == "ImageJob")
    assert job["spec"]["model"] == "z-image-turbo"  # the pool it renders next to


# --- ImageWorkflow: statuses from the planner (the ImageJob script serves both kinds) ---------------------------------


def test_imageworkflow_health_follows_the_planner(lua: ModuleType) -> None:
    from zimage_operator import workflow

    wf: dict[str, Any] = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageWorkflow",
        "metadata": {"name": "w", "namespace": "n", "generation": 1},
        "spec": {"steps": [{"name": "a", "model": "m", "params": {"prompt": "x"}}]},
    }
    assert health(lua, wf) == ("Progressing", "Waiting for the zimage operator to admit the workflow")
    wf["status"] = workflow.plan(wf, {}, NOW).status
    assert health(lua, wf) == ("Progressing", "Running 0/1: 1 steps")
    job = {"status": {"phase": "Failed", "message": "provider said no"}}
    wf["status"] = workflow.plan(wf, {"w-a": job}, NOW).status
    status, message = health(lua, wf)
    assert status == "Degraded" and message.startswith("Failed (StepFailed): step a job w-a: provider said no")
