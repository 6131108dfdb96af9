"""ModelDeployment on a real API server: owned children, queue-driven replicas, deletion costs, drift, /scale."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from conftest import Kube, operator_stack, wait_for
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, keys

pytestmark = pytest.mark.kube
NS = f"zimage-md-{os.getpid()}"


@pytest.fixture(scope="module")
def env(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with operator_stack(crds, tmp_path_factory.mktemp("md"), NS, ZIMAGE_DRIFT_CHECK_SECONDS="1") as (ps, url):
        yield {"kube": crds, "redis": url, "ps": ps}


def md(name: str, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"variant": "turbo", "source": "tiny-random"},
            "image": "example.org/zimage-worker:test",
            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}, "requests": {"cpu": "2"}},
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 5,
                "targetQueuePerReplica": 4,
                "scaleDownDelaySeconds": 2,
                **scaling,
            },
        },
    }


def get(kube: Kube, kind: str, name: str) -> dict[str, Any] | None:
    proc = kube.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def replicas(kube: Kube, name: str) -> int | None:
    dep = get(kube, "deployment", f"{name}-worker")
    return None if dep is None else dep["spec"].get("replicas")


def message(queue: str) -> JobMessage:
    uid = str(uuid.uuid4())
    params = GenerationParams(prompt="a red fox", width=64, height=64, steps=1, seed=1)
    return JobMessage(uid=uid, namespace=NS, name=f"j-{uid[:6]}", queue=queue, params=params)


def test_pool_children_scaling_costs_and_drift(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(md("turbo")))
    dep = wait_for(lambda: get(kube, "deployment", "turbo-worker"), what="worker Deployment")
    assert wait_for(lambda: get(kube, "service", "turbo-worker-metrics"), what="metrics Service")
    assert wait_for(lambda: get(kube, "pdb", "turbo-worker"), what="PodDisruptionBudget")

    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelDeployment", "turbo", True)
    assert dep["spec"]["replicas"] == 0
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] >= 900  # the operator's max_job_seconds: a draining job finishes
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    [c] = pod["containers"]
    assert c["image"] == "example.org/zimage-worker:test"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env_vars = {e["name"]: e.get("value") for e in c["env"]}
    assert env_vars["ZIMAGE_QUEUE"] == f"{NS}/turbo" and env_vars["ZIMAGE_REDIS_URL"] == env["redis"]

    # 20 queued jobs: ceil(20 / 4) = 5 replicas, within 2 seconds.
    q = JobQueue.from_url(env["redis"])
    queue = keys.queue_name(NS, "turbo")
    t0 = time.monotonic()
    for _ in range(20):
        q.enqueue(message(queue))
    wait_for(lambda: replicas(kube, "turbo") == 5, timeout=2.0, what="scale-up to 5 within 2 s")
    scale_up_seconds = time.monotonic() - t0
    status = wait_for(
        lambda: (
            (get(kube, "md", "turbo") or {}).get("status", {}).get("desiredReplicas") == 5
            and get(kube, "md", "turbo")["status"]
        ),
        what="md status",
    )  # type: ignore[index]
    assert status["queueLength"] == 20 and status["selector"]
    assert status["scalingHistory"][-1]["to"] == 5 and status["scalingHistory"][-1]["reason"] == "WakeFromZero"
    print(f"scale-up reaction: {scale_up_seconds:.2f}s")

    # A busy worker (its pod's name is its worker name) gets the highest pod-deletion-cost.
    pods = wait_for(
        lambda: (
            (
                p := json.loads(kube.kubectl("get", "pods", "-n", NS, "-l", status["selector"], "-o", "json").stdout)[
                    "items"
                ]
            )
            and len(p) == 5
            and p
        ),
        what="5 pods",
    )
    busy_pod = pods[0]["metadata"]["name"]
    d = q.take(queue, busy_pod, block_ms=0)[0]
    q.begin(d, busy_pod)
    q.worker_heartbeat(queue, busy_pod, busy=True)
    for p in pods[1:]:
        q.worker_heartbeat(queue, p["metadata"]["name"], busy=False)

    def costs() -> dict[str, str]:
        items = json.loads(kube.kubectl("get", "pods", "-n", NS, "-l", status["selector"], "-o", "json").stdout)
        return {
            p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(
                "controller.kubernetes.io/pod-deletion-cost"
            )
            for p in items["items"]
        }

    c = wait_for(lambda: (c := costs()) and None not in c.values() and c, what="deletion costs")
    assert int(c[busy_pod]) > max(int(v) for k, v in c.items() if k != busy_pod)

    # Editing the owned Deployment's image is reverted.
    kube.kubectl(
        "patch",
        "deployment",
        "turbo-worker",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil:latest"}]',
    )
    wait_for(
        lambda: (
            get(kube, "deployment", "turbo-worker")["spec"]["template"]["spec"]["containers"][0]["image"]  # type: ignore[index]
            == "example.org/zimage-worker:test"
        ),
        timeout=10,
        what="drift reverted",
    )

    # Drained (the held job done, the queue emptied): back to minReplicas 0 after scaleDownDelaySeconds.
    q.complete(d, [], JobEvent(type="succeeded", uid=d.message.uid, namespace=NS, name="x"))
    while got := q.take(queue, "drainer", count=50, block_ms=0):
        for item in got:
            q.ack(item)
    q.worker_gone(queue, busy_pod)
    t_drained = time.monotonic()
    wait_for(lambda: replicas(kube, "turbo") == 0, timeout=15, what="scale to zero")
    assert time.monotonic() - t_drained >= 2.0 - 0.5  # not before the delay (0.5 s: one poll of slack)


def test_kubectl_scale_in_external_mode(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(md("ext", mode="external")))
    wait_for(lambda: get(kube, "deployment", "ext-worker"), what="Deployment")
    kube.kubectl("scale", "md/ext", "-n", NS, "--replicas=3")
    wait_for(lambda: replicas(kube, "ext") == 3, timeout=10, what="replicas 3 via /scale")
    scale = json.loads(
        kube.kubectl("get", "--raw", f"/apis/zimage.dev/v1alpha1/namespaces/{NS}/modeldeployments/ext/scale").stdout
    )
    assert scale["spec"]["replicas"] == 3
    wait_for(
        lambda: json.loads(
            kube.kubectl("get", "--raw", f"/apis/zimage.dev/v1alpha1/namespaces/{NS}/modeldeployments/ext/scale").stdout
        )["status"].get("selector"),
        what="scale selector for HPA",
    )


def test_deleting_the_pool_garbage_collects_its_children(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(md("short-lived")))
    wait_for(lambda: get(kube, "pdb", "short-lived-worker"), what="children")
    kube.kubectl("delete", "md", "short-lived", "-n", NS)
    for kind, name in (
        ("deployment", "short-lived-worker"),
        ("service", "short-lived-worker-metrics"),
        ("pdb", "short-lived-worker"),
    ):
        wait_for(lambda kind=kind, name=name: get(kube, kind, name) is None, what=f"{kind} collected")


def test_invalid_pool_spec_is_reported_not_built(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(md("bad", minReplicas=3, maxReplicas=1)))

    def degraded() -> dict[str, Any] | None:
        conds = ((get(kube, "md", "bad") or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "Degraded" and c["status"] == "True"), None)

    cond = wait_for(degraded, what="Degraded condition")
    assert cond["reason"] == "InvalidSpec" and "minReplicas" in cond["message"]
    assert get(kube, "deployment", "bad-worker") is None


def test_preload_holds_workers_until_the_model_is_cached(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    body = md("cached")
    body["spec"]["cache"] = {"size": "50Gi", "preload": True}
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(body))
    job = wait_for(lambda: get(kube, "job", "cached-preload"), what="preload Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "zimage_worker.preload"
    assert wait_for(lambda: get(kube, "pvc", "cached-model-cache"), what="cache PVC")
    q = JobQueue.from_url(env["redis"])
    q.enqueue(message(keys.queue_name(NS, "cached")))

    def condition(type_: str) -> dict[str, Any] | None:
        conds = ((get(kube, "md", "cached") or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == type_), None)

    assert wait_for(lambda: (c := condition("ModelCached")) and c["status"] == "False" and c)["reason"] == "Downloading"
    assert replicas(kube, "cached") == 0  # a queued job does not start workers on an empty cache
    # No kubelet here: play its part and report the download pod as done; the Job controller does the rest.
    pod = wait_for(
        lambda: (
            kube.kubectl(
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "job-name=cached-preload",
                "-o",
                "jsonpath={.items[0].metadata.name}",
                check=False,
            ).stdout
        ),
        what="preload pod",
    )
    kube.kubectl(
        "patch", "pod", pod, "-n", NS, "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Succeeded"}}'
    )
    wait_for(lambda: replicas(kube, "cached") == 1, timeout=10, what="workers after the preload")
    # The same pass writes the status just after the replicas: wait for it rather than race it.
    wait_for(lambda: (c := condition("ModelCached")) and c["status"] == "True", timeout=10, what="ModelCached")


def test_jobs_move_to_the_fallback_pool_without_capacity(env: dict[str, Any], tmp_path_factory: Any) -> None:
    kube: Kube = env["kube"]
    primary, backup = md("primary"), md("backup")
    primary["spec"]["fallback"] = {"model": "backup", "afterSeconds": 1}
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump_all([primary, backup]))
    job = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": "patient"},
        "spec": {"model": "primary", "prompt": "a red fox", "width": 64, "height": 64},
    }
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(job))
    # No kubelet: the primary pool's pods never get ready, so after 1 s the job moves to the backup's queue.
    q = JobQueue.from_url(env["redis"])
    wait_for(lambda: q.stats(keys.queue_name(NS, "backup")).queued == 1, timeout=15, what="job on the backup queue")
    st = wait_for(
        lambda: (s := (get(kube, "ij", "patient") or {}).get("status") or {}).get("routedTo") and s,
        what="status.routedTo",
    )
    assert st["routedTo"] == "backup" and st["phase"] == "Queued"


def test_printer_columns_resolve_in_a_real_status(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(md("columns")))
    wait_for(lambda: ((get(kube, "md", "columns") or {}).get("status") or {}).get("selector"), what="status")
    table = kube.kubectl("get", "md", "columns", "-n", NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "BACKEND", "VARIANT", "READY", "DESIRED", "QUEUE", "AGE"]
    assert table[1].split()[:6] == ["columns", "diffusers", "turbo", "0", "0", "0"]


REMOTE = {
    "api": "chat",
    "baseUrl": "https://llm.example/v1",
    "model": "gpt-x",
    "keysSecret": "provider-keys",
    "limits": {"requestsPerWindow": 4},
    "concurrencyPerReplica": 2,
}


def backend_md(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "zimage.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"backend": "remote"}, "spec.remote is required with backend remote"),
        ({"remote": REMOTE}, "spec.remote is required with backend remote"),
        ({"backend": "function"}, "spec.function is required with backend function"),
        ({"backend": "function", "function": {"entryPoint": "builtin:blur"}}, "entryPoint builtin:<name> names"),
        ({"backend": "remote", "remote": REMOTE, "cache": {"size": "1Gi", "preload": True}}, "spec.cache"),
        ({"backend": "function", "function": {"entryPoint": "m:f"}, "cache": {"existingClaim": "c"}}, "spec.cache"),
        ({"fallbacks": {"rateLimited": ["other", "loop"]}}, "spec.fallbacks may not name the ModelDeployment"),
        ({"backend": "remote", "remote": {**REMOTE, "baseUrl": "ftp://x"}}, "spec.remote.baseUrl"),
    ],
)
def test_the_api_server_refuses_backend_specs_that_cannot_work(
    env: dict[str, Any], spec: dict[str, Any], complaint: str
) -> None:
    """The CRD's CEL rules (and schema) answer at once, so a broken pool is never stored; a dry run is enough."""
    kube: Kube = env["kube"]
    proc = kube.kubectl(
        "apply", "-n", NS, "--dry-run=server", "-f", "-", input=yaml.safe_dump(backend_md("loop", **spec)), check=False
    )
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


def test_remote_and_function_pools_are_accepted_and_rendered(env: dict[str, Any]) -> None:
    kube: Kube = env["kube"]
    remote = backend_md(
        "provider-a",
        backend="remote",
        remote=REMOTE,
        fallbacks={"unavailable": ["provider-b"], "failed": ["compose"]},
        scaling={"maxReplicas": 4, "scaleDownDelaySeconds": 2},
    )
    function = backend_md("compose", backend="function", function={"entryPoint": "builtin:compose"})
    kube.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump_all([remote, function]))
    stored = get(kube, "md", "provider-a")
    assert stored and stored["spec"]["remote"]["limits"]["windowSeconds"] == 60  # defaulted by the API server
    fwd = wait_for(lambda: get(kube, "deployment", "provider-a-worker"), what="forwarder Deployment")
    pod = fwd["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["zimage-forwarder"] and "nvidia.com/gpu" not in json.dumps(c.get("resources"))
    assert {"name": "provider-keys", "mountPath": "/etc/zimage/provider-keys", "readOnly": True} in c["volumeMounts"]
    assert any((v.get("secret") or {}).get("secretName") == "provider-keys" for v in pod["volumes"])
    env_vars = {e["name"]: e.get("value") for e in c["env"]}
    assert env_vars["ZIMAGE_REMOTE_BASE_URL"] == "https://llm.example/v1"
    assert env_vars["ZIMAGE_QUEUE"] == f"{NS}/provider-a"
    worker = wait_for(lambda: get(kube, "deployment", "compose-worker"), what="function worker Deployment")
    [w] = worker["spec"]["template"]["spec"]["containers"]
    assert w["command"] == ["zimage-worker"]
    assert {e["name"]: e.get("value") for e in w["env"]}["ZIMAGE_FUNCTION"] == "builtin:compose"
    # 5 queued calls at 2 per forwarder: 3 replicas (targetQueuePerReplica, 4 by default, would give 2).
    q = JobQueue.from_url(env["redis"])
    for _ in range(5):
        q.enqueue(message(keys.queue_name(NS, "provider-a")))
    wait_for(lambda: replicas(kube, "provider-a") == 3, timeout=10, what="3 forwarders")
    table = kube.kubectl("get", "md", "provider-a", "compose", "-n", NS).stdout.splitlines()
    assert sorted(row.split()[:2] for row in table[1:]) == [["compose", "function"], ["provider-a", "remote"]]
