"""A ModelDeployment's rendered children: contents, validity against the Kubernetes models, and drift."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client as k8s
from pydantic import ValidationError

from zimage_operator.types import ModelDeploymentSpec
from zimage_operator.workload import (
    MIN_GRACE_SECONDS,
    PRE_STOP_SECONDS,
    SPEC_HASH_ANNOTATION,
    desired_objects,
    drifted,
    metrics_service_name,
    preload_job_name,
    selector_string,
)

REDIS = "redis://zimage-redis:6379/0"
GPU = "nvidia.com/gpu"


def md(name: str = "turbo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def render(body: dict[str, Any] | None = None, **kw: Any) -> dict[str, dict[str, Any]]:
    return desired_objects(body or md(), **{"redis_url": REDIS, "replicas": 1, **kw})


def worker(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = objs["deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


def pod(objs: dict[str, dict[str, Any]], kind: str = "deployment") -> dict[str, Any]:
    spec: dict[str, Any] = objs[kind]["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


FULL = md(
    "turbo",
    model={"variant": "turbo", "source": "Tongyi-MAI/Z-Image-Turbo", "revision": "main", "dtype": "bfloat16"},
    image="registry.example/zimage-worker:1.2.3",
    imagePullPolicy="Always",
    resources={"limits": {GPU: 1, "memory": "32Gi"}, "requests": {"cpu": "4", "memory": "24Gi"}},
    nodeSelector={"nvidia.com/gpu.product": "H100"},
    tolerations=[{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
    affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    priorityClassName="inference",
    serviceAccountName="zimage-worker",
    env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    cache={"size": "80Gi", "storageClassName": "fast", "preload": True},
    batching={"maxBatchSize": 4, "maxWaitMilliseconds": 50},
    storage={"url": "s3://images/team-a"},
)


def test_children_and_their_owner() -> None:
    objs = render(FULL)
    names = {kind: o["metadata"]["name"] for kind, o in objs.items()}
    assert names == {
        "deployment": "turbo-worker",
        "service": "turbo-worker-metrics",
        "poddisruptionbudget": "turbo-worker",
        "persistentvolumeclaim": "turbo-model-cache",
        "job": "turbo-preload",
    }
    assert all(key == o["kind"].lower() for key, o in objs.items())
    for o in objs.values():
        assert o["metadata"]["namespace"] == "team-a"
        assert o["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "zimage.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "turbo",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "zimage-worker"
        assert labels["app.kubernetes.io/instance"] == "turbo"
        assert labels["app.kubernetes.io/managed-by"] == "zimage-operator"
        assert labels["zimage.dev/model"] == "turbo"


def test_selectors_agree() -> None:
    objs = render(FULL)
    sel = {"app.kubernetes.io/instance": "turbo", "app.kubernetes.io/component": "worker"}
    dep = objs["deployment"]["spec"]
    assert dep["selector"]["matchLabels"] == sel
    assert objs["service"]["spec"]["selector"] == sel
    assert objs["poddisruptionbudget"]["spec"]["selector"]["matchLabels"] == sel
    assert sel.items() <= dep["template"]["metadata"]["labels"].items()
    assert objs["poddisruptionbudget"]["spec"]["maxUnavailable"] == 1
    # the preload pods must not count as workers (Service endpoints, PDB, the Deployment's ReplicaSet)
    assert not sel.items() <= objs["job"]["spec"]["template"]["metadata"]["labels"].items()
    assert selector_string("turbo") == "app.kubernetes.io/instance=turbo,app.kubernetes.io/component=worker"
    assert objs["service"]["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


@pytest.mark.parametrize("kind", ["deployment", "job"])
def test_locked_down_pods(kind: str) -> None:
    spec = pod(render(FULL), kind)
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,  # the worker image's user
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]


def test_worker_container() -> None:
    objs = render(FULL, replicas=3)
    c = worker(objs)
    assert c["name"] == "zimage-worker"
    assert (c["image"], c["imagePullPolicy"]) == ("registry.example/zimage-worker:1.2.3", "Always")
    assert c["resources"] == {"limits": {GPU: "1", "memory": "32Gi"}, "requests": {"cpu": "4", "memory": "24Gi"}}
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "model loads take minutes"
    assert "preStop" in c["lifecycle"]
    spec = pod(objs)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert spec["tolerations"] == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["affinity"] == FULL["spec"]["affinity"]
    assert (spec["priorityClassName"], spec["serviceAccountName"]) == ("inference", "zimage-worker")
    assert objs["deployment"]["spec"]["replicas"] == 3


def test_minimal_spec_leaves_placement_unset() -> None:
    spec = pod(render())
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName"):
        assert key not in spec
    assert "resources" not in worker(render())


def test_worker_env() -> None:
    env = env_of(worker(render(FULL)))
    assert env["ZIMAGE_REDIS_URL"] == REDIS
    assert env["ZIMAGE_QUEUE"] == "team-a/turbo"
    assert env["ZIMAGE_WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["ZIMAGE_MODEL_SOURCE"] == "Tongyi-MAI/Z-Image-Turbo"
    assert (env["ZIMAGE_VARIANT"], env["ZIMAGE_REVISION"], env["ZIMAGE_DTYPE"]) == ("turbo", "main", "bfloat16")
    assert env["MODELS_DIR"] == "/models"
    assert env["HF_HOME"].startswith("/models/")
    assert env["ZIMAGE_STORAGE_URL"] == "s3://images/team-a"
    assert env["ZIMAGE_HTTP_PORT"] == "8080"
    assert (env["ZIMAGE_MAX_BATCH_SIZE"], env["ZIMAGE_MAX_WAIT_MILLISECONDS"]) == ("4", "50")
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_HUB_OFFLINE"] == "1"  # preloaded, read-only cache


def test_acceleration_reaches_the_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_worker.settings import WorkerSettings

    body = md(acceleration={"warmup": False, "compile": True, "attentionBackend": "_native_cudnn"})
    for name, value in env_of(worker(render(body))).items():
        if isinstance(value, str):  # what the pod's environment holds (valueFrom entries aside)
            monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert (settings.warmup, settings.compile, settings.attention_backend) == (False, True, "_native_cudnn")
    assert (settings.max_batch_size, settings.queue) == (1, "team-a/turbo")


def test_storage_url_from_the_spec_or_the_operator() -> None:
    assert env_of(worker(render(FULL, storage_url="file:///tmp/x")))["ZIMAGE_STORAGE_URL"] == "s3://images/team-a"
    assert env_of(worker(render(storage_url="s3://default/")))["ZIMAGE_STORAGE_URL"] == "s3://default/"


def test_the_charts_image_volume_is_mounted_by_pools_in_its_namespace() -> None:
    """storage.mode=volume: pools next to the claim mount it and store there; a pool elsewhere (the claim is not
    in its namespace) or with its own spec.storage keeps its URL; the store's Secret comes as optional envFrom."""
    kw = {"storage_claim": "zimage-images", "storage_mount_path": "/var/lib/zimage/images", "storage_url": "s3://x/"}
    here = render(operator_namespace="team-a", storage_secret="zimage-storage", **kw)  # type: ignore[arg-type]
    w, p = worker(here), pod(here)
    assert env_of(w)["ZIMAGE_STORAGE_URL"] == "file:///var/lib/zimage/images"
    assert {"name": "images", "mountPath": "/var/lib/zimage/images"} in w["volumeMounts"]
    assert {"name": "images", "persistentVolumeClaim": {"claimName": "zimage-images"}} in p["volumes"]
    assert w["envFrom"] == [{"secretRef": {"name": "zimage-storage", "optional": True}}]
    elsewhere = render(operator_namespace="zimage-system", **kw)  # type: ignore[arg-type]
    assert env_of(worker(elsewhere))["ZIMAGE_STORAGE_URL"] == "s3://x/"
    assert all(v["name"] != "images" for v in pod(elsewhere)["volumes"]) and "envFrom" not in worker(elsewhere)
    own = render(FULL, operator_namespace="team-a", **kw)  # type: ignore[arg-type]
    assert env_of(worker(own))["ZIMAGE_STORAGE_URL"] == "s3://images/team-a"
    assert all(v["name"] != "images" for v in pod(own)["volumes"])
    assert _unknown_fields(here["deployment"], "V1Deployment", "deployment") == []


def test_workers_keep_job_records_for_the_operators_retention() -> None:
    """The records a worker finishes expire after the operator's retention, not the worker's default."""
    from zimage_worker.settings import WorkerSettings

    env = env_of(worker(render(job_retention_seconds=3600)))
    assert env["ZIMAGE_JOB_RETENTION_SECONDS"] == "3600"
    assert (
        WorkerSettings.model_validate(
            {"job_retention_seconds": env["ZIMAGE_JOB_RETENTION_SECONDS"]}
        ).job_retention_seconds
        == 3600
    )
    assert "ZIMAGE_JOB_RETENTION_SECONDS" not in env_of(worker(render()))


def test_optional_env_left_out_and_user_env_overrides() -> None:
    body = md(env=[{"name": "HF_HOME", "value": "/elsewhere"}, {"name": "EXTRA", "value": "1"}])
    c = worker(render(body))
    names = [e["name"] for e in c["env"]]
    for absent in ("ZIMAGE_REVISION", "ZIMAGE_STORAGE_URL", "HF_HUB_OFFLINE", "ZIMAGE_ATTENTION_BACKEND"):
        assert absent not in names
    assert (env_of(c)["ZIMAGE_WARMUP"], env_of(c)["ZIMAGE_COMPILE"]) == ("true", "false")
    assert names.count("HF_HOME") == 1 and env_of(c)["HF_HOME"] == "/elsewhere"
    assert names[-2:] == ["HF_HOME", "EXTRA"], "user entries come last, so $(VAR) can refer to ours"


@pytest.mark.parametrize(
    ("resources", "limits"),
    [
        ({"limits": {GPU: 2}}, {GPU: "2"}),
        ({"requests": {GPU: 1, "cpu": "2"}}, {GPU: "1"}),
        ({"requests": {GPU: "1"}, "limits": {"memory": "8Gi"}}, {"memory": "8Gi", GPU: "1"}),
        ({"requests": {"cpu": "2"}}, None),
    ],
)
def test_gpu_always_in_limits(resources: dict[str, Any], limits: dict[str, Any] | None) -> None:
    body = md(resources=resources)
    assert worker(render(body))["resources"].get("limits") == limits
    assert body["spec"]["resources"] == resources, "the ModelDeployment body is not modified"


EMPTY_DIR = {"name": "model-cache", "emptyDir": {}}
OWN_CLAIM = {"name": "model-cache", "persistentVolumeClaim": {"claimName": "turbo-model-cache"}}
USER_CLAIM = {"name": "model-cache", "persistentVolumeClaim": {"claimName": "weights"}}


@pytest.mark.parametrize(
    ("cache", "volume", "read_only", "pvc", "job"),
    [
        ({}, EMPTY_DIR, False, False, False),
        ({"size": "50Gi"}, OWN_CLAIM, False, True, False),
        ({"existingClaim": "weights"}, USER_CLAIM, False, False, False),
        ({"existingClaim": "weights", "preload": True}, USER_CLAIM, True, False, True),
        ({"size": "50Gi", "preload": True}, OWN_CLAIM, True, True, True),
    ],
)
def test_cache(cache: dict[str, Any], volume: dict[str, Any], read_only: bool, pvc: bool, job: bool) -> None:
    objs = render(md(cache=cache))
    assert volume in pod(objs)["volumes"]
    mount = next(m for m in worker(objs)["volumeMounts"] if m["name"] == "model-cache")
    assert mount["mountPath"] == "/models" and mount.get("readOnly", False) is read_only
    assert ("persistentvolumeclaim" in objs) is pvc
    assert ("job" in objs) is job
    if job:
        preload = pod(objs, "job")["containers"][0]
        assert preload["command"] == ["python", "-m", "zimage_worker.preload"]
        assert not next(m for m in preload["volumeMounts"] if m["name"] == "model-cache").get("readOnly")
        assert volume in pod(objs, "job")["volumes"]
        env = env_of(preload)
        assert "HF_HUB_OFFLINE" not in env and "ZIMAGE_REDIS_URL" not in env
        assert env["MODELS_DIR"] == "/models"


def test_claim_spec() -> None:
    objs = render(md(cache={"size": "80Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]}))
    assert objs["persistentvolumeclaim"]["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "80Gi"}},
        "storageClassName": "fast",
    }
    assert render(md(cache={"size": "1Gi"}))["persistentvolumeclaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_mount_path_moves_models_dir() -> None:
    c = worker(render(md(cache={"mountPath": "/var/cache/models"})))
    assert env_of(c)["MODELS_DIR"] == "/var/cache/models"
    assert {"name": "model-cache", "mountPath": "/var/cache/models"} in c["volumeMounts"]


@pytest.mark.parametrize(
    ("longest", "grace"),
    [(0, MIN_GRACE_SECONDS), (600, MIN_GRACE_SECONDS), (3600, 3600)],
)
def test_grace_period_covers_the_longest_job(longest: int, grace: int) -> None:
    spec = pod(render(longest_timeout_seconds=longest))
    assert spec["terminationGracePeriodSeconds"] == grace + PRE_STOP_SECONDS


def _hash(objs: dict[str, dict[str, Any]]) -> str:
    h: str = objs["deployment"]["spec"]["template"]["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    return h


@pytest.mark.parametrize(
    ("change", "rolls"),
    [
        ({"image": "registry.example/zimage-worker:9"}, True),
        ({"model": {"source": "tiny-random"}}, True),
        ({"env": [{"name": "X", "value": "1"}]}, True),
        ({"resources": {"limits": {GPU: 2}}}, True),
        ({"batching": {"maxBatchSize": 2}}, True),
        ({"scaling": {"maxReplicas": 9, "scaleDownDelaySeconds": 5}}, False),
        ({"fallback": {"model": "base"}}, False),
        ({"replicas": 3}, False),
    ],
)
def test_spec_hash_rolls_pods_only_for_pod_changes(change: dict[str, Any], rolls: bool) -> None:
    base: dict[str, Any] = {"resources": {"limits": {GPU: 1}}}
    assert (_hash(render(md(**base))) != _hash(render(md(**{**base, **change})))) is rolls
    assert _hash(render(md(**base))) == _hash(render(md(**base))), "stable across calls"
    assert _hash(render(md(**base), replicas=1)) == _hash(render(md(**base), replicas=5))


def test_long_names_stay_valid() -> None:
    name = "a" * 200 + ".b" * 20
    objs = render(md(name, cache={"size": "1Gi", "preload": True}))
    svc, job = metrics_service_name(name), preload_job_name(name)
    assert len(svc) <= 63 and "." not in svc and svc[0].isalpha()
    assert len(job) <= 63
    for o in objs.values():
        assert len(o["metadata"]["name"]) <= 253
        assert all(len(v) <= 63 for v in o["metadata"]["labels"].values())
    assert metrics_service_name("7-up") == "md-7-up-worker-metrics"
    other = "a" * 200 + ".c" * 20
    assert metrics_service_name(other) != svc, "truncated names stay distinct"


@pytest.mark.parametrize(
    ("url", "operator_ns", "expected"),
    [
        (REDIS, None, REDIS),
        (REDIS, "team-a", REDIS),
        (REDIS, "zimage-system", "redis://zimage-redis.zimage-system.svc:6379/0"),
        ("redis://:s3cret@zimage-redis:6379/0", "ops", "redis://:s3cret@zimage-redis.ops.svc:6379/0"),
        ("rediss://user:pw@redis/1", "ops", "rediss://user:pw@redis.ops.svc/1"),
        ("redis://redis.ops.svc.cluster.local:6379", "zimage-system", "redis://redis.ops.svc.cluster.local:6379"),
        ("redis://10.0.0.7:6379", "ops", "redis://10.0.0.7:6379"),
        ("redis://[::1]:6379", "ops", "redis://[::1]:6379"),
        ("redis://localhost:6379", "ops", "redis://localhost:6379"),
    ],
)
def test_bare_redis_host_is_qualified(url: str, operator_ns: str | None, expected: str) -> None:
    c = worker(render(redis_url=url, operator_namespace=operator_ns))
    assert env_of(c)["ZIMAGE_REDIS_URL"] == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"scaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas (5) exceeds maxReplicas (2)"),
        ({"cache": {"existingClaim": "w", "size": "1Gi"}}, "existingClaim or size, not both"),
        ({"cache": {"storageClassName": "fast"}}, "storageClassName: only used with size"),
        ({"cache": {"preload": True}}, "needs a persistent cache"),
        ({"cache": {"mountPath": "/tmp"}}, "mountPath: /tmp is taken"),
        ({"env": [{"name": "ZIMAGE_QUEUE", "value": "x"}]}, "ZIMAGE_QUEUE set by the operator"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "duplicate A"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {}}]}, "value or valueFrom, not both"),
        ({"resources": {"requests": {GPU: 1}, "limits": {GPU: 2}}}, "requests (1) and limits (2) differ"),
    ],
)
def test_cross_field_errors(spec: dict[str, Any], error: str) -> None:
    assert any(error in e for e in ModelDeploymentSpec.model_validate(spec).cross_field_errors())
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        render(md(**spec))


@pytest.mark.parametrize(
    "spec",
    [
        {"scaling": {"maxReplicas": 0}},
        {"scaling": {"mode": "keda"}},
        {"model": {"variant": "huge"}},
        {"cache": {"size": "lots"}},
        {"storage": {"url": "ftp://x"}},
        {"imagePullPolicy": "Sometimes"},
        {"unknownField": 1},
    ],
)
def test_schema_errors(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        render(md(**spec))


def test_defaults() -> None:
    spec = ModelDeploymentSpec.model_validate({})
    s = spec.scaling
    assert (s.mode, s.min_replicas, s.max_replicas, s.target_queue_per_replica) == ("builtin", 0, 4, 4)
    assert (s.activation_queue_length, s.scale_up_stabilization_seconds, s.scale_down_delay_seconds) == (1, 0, 60)
    assert s.poll_interval_seconds == 1
    assert (spec.cache.mount_path, spec.cache.preload, spec.cache.access_modes) == ("/models", False, ["ReadWriteOnce"])
    assert spec.cross_field_errors() == []


# --- validity: every rendered object deserializes into the official client's models with no unknown field ---

_SCALARS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "object": (str, int, dict)}


def _unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in _unknown_fields(v, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith(("dict[", "dict(")):
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in _unknown_fields(v, inner, f"{path}.{k}")]
    if type_name in _SCALARS:
        ok = isinstance(value, _SCALARS[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: {value!r} is not {type_name}"]
    model = getattr(k8s, type_name)
    by_json = {j: attr for attr, j in model.attribute_map.items()}
    errors = []
    for key, v in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors += _unknown_fields(v, model.openapi_types[by_json[key]], f"{path}.{key}")
    return errors


MODELS = {
    "deployment": "V1Deployment",
    "service": "V1Service",
    "poddisruptionbudget": "V1PodDisruptionBudget",
    "persistentvolumeclaim": "V1PersistentVolumeClaim",
    "job": "V1Job",
}


@pytest.mark.parametrize("body", [md(), FULL, md(cache={"existingClaim": "w", "preload": True})])
def test_rendered_objects_are_valid_kubernetes_objects(body: dict[str, Any]) -> None:
    api = k8s.ApiClient()
    for kind, obj in render(body).items():
        assert _unknown_fields(obj, MODELS[kind], kind) == []
        # the client's models also enforce required fields and enums on construction
        api._ApiClient__deserialize(copy.deepcopy(obj), MODELS[kind])


# --- drift ---


def server_view(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server hands back: defaults filled in, quantities canonical, zero values omitted."""
    out = copy.deepcopy(obj)
    out["metadata"].update(uid="child-uid", resourceVersion="42", generation=3, managedFields=[{"manager": "kopf"}])
    out["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "2"
    out["status"] = {"observedGeneration": 3}
    if out["kind"] in ("Deployment", "Job"):
        template = out["spec"]["template"]
        template["metadata"]["creationTimestamp"] = None
        template["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "2026-01-01T00:00:00Z"
        spec = template["spec"]
        spec.update(
            dnsPolicy="ClusterFirst",
            schedulerName="default-scheduler",
            securityContext={**spec["securityContext"], "supplementalGroups": []},
        )
        spec.setdefault("restartPolicy", "Always")
        for c in spec["containers"]:
            c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
            for e in c["env"]:
                if "fieldRef" in e.get("valueFrom", {}):
                    e["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    c[probe].update(successThreshold=1)
                    c[probe]["httpGet"]["scheme"] = "HTTP"
            res = c.get("resources") or {}
            for section in res.values():
                for k, v in section.items():
                    section[k] = {"1": "1", "4": "4", "32Gi": "32Gi"}.get(str(v), str(v))
            if "requests" in res and "cpu" in res["requests"]:
                res["requests"]["cpu"] = "4000m"
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                v["persistentVolumeClaim"].setdefault("readOnly", None)
    if out["kind"] == "Deployment":
        out["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": 1, "maxUnavailable": 1}
    if out["kind"] == "Service":
        out["spec"].update(clusterIP="10.0.0.12", sessionAffinity="None")
    if out["kind"] == "PersistentVolumeClaim":
        out["spec"].update(volumeName="pvc-1234", volumeMode="Filesystem")
        out["spec"]["resources"]["requests"]["storage"] = "80Gi"
    if out["kind"] == "Job":
        out["spec"].update(completions=1, parallelism=1, selector={"matchLabels": {"controller-uid": "x"}})
        out["spec"]["template"]["metadata"]["labels"]["job-name"] = "turbo-preload"
    return out


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_server_defaults_are_not_drift(kind: str) -> None:
    desired = render(FULL)[kind]
    assert not drifted(desired, server_view(desired))


def _pod_spec(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


def _container(d: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = _pod_spec(d)["containers"][0]
    return c


def _template_annotations(d: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = d["spec"]["template"]["metadata"]["annotations"]
    return annotations


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: _container(d).update(image="evil/miner:latest"), id="image"),
        pytest.param(lambda d: _container(d)["env"][0].update(value="redis://elsewhere:6379"), id="env value"),
        pytest.param(lambda d: _container(d)["env"].pop(0), id="env removed"),
        pytest.param(lambda d: _container(d)["resources"]["limits"].update({GPU: "2"}), id="gpu limit"),
        pytest.param(lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False), id="rootfs"),
        pytest.param(lambda d: _pod_spec(d).update(automountServiceAccountToken=True), id="token"),
        pytest.param(lambda d: _pod_spec(d).pop("automountServiceAccountToken"), id="token default"),
        pytest.param(lambda d: _pod_spec(d).pop("tolerations"), id="tolerations removed"),
        pytest.param(lambda d: _template_annotations(d).update({SPEC_HASH_ANNOTATION: "0"}), id="hash"),
        pytest.param(lambda d: d["spec"].update(replicas=7), id="replicas"),
        pytest.param(lambda d: d["metadata"]["labels"].update({"app.kubernetes.io/managed-by": "helm"}), id="label"),
        pytest.param(lambda d: d["metadata"]["labels"].pop("zimage.dev/model"), id="label removed"),
    ],
)
def test_drift_in_our_fields(edit: Any) -> None:
    desired = render(FULL)["deployment"]
    actual = server_view(desired)
    edit(actual)
    assert drifted(desired, actual)


def test_drift_from_a_changed_spec() -> None:
    before, after = render(FULL), render(md(**{**FULL["spec"], "image": "registry.example/zimage-worker:1.2.4"}))
    assert drifted(after["deployment"], server_view(before["deployment"]))
    assert not drifted(after["service"], server_view(before["service"]))
    grown = render(md(**{**FULL["spec"], "cache": {**FULL["spec"]["cache"], "size": "100Gi"}}))
    assert drifted(grown["persistentvolumeclaim"], server_view(before["persistentvolumeclaim"]))
    rescaled = render(FULL, replicas=4)
    assert drifted(rescaled["deployment"], server_view(before["deployment"]))
    assert not drifted(rescaled["poddisruptionbudget"], server_view(before["poddisruptionbudget"]))
