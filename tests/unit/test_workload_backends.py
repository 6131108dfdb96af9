"""ModelDeployment backends: remote pools render forwarders, function pools CPU workers; their spec rules."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from kubernetes import client as k8s
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tests.unit.test_chart import helm  # noqa: F401  (the fixture)
from tests.unit.test_chart import render as render_chart
from tests.unit.test_workload import MODELS, _unknown_fields, env_of, md, render, worker
from zimage_operator import crdgen, scaling
from zimage_operator.types import DEFAULT_FORWARDER_IMAGE, ModelDeploymentSpec
from zimage_operator.workload import (
    FORWARDER_RESOURCES,
    FUNCTION_RESOURCES,
    PRE_STOP_SECONDS,
    PROVIDER_KEYS_DIR,
    RedisAuth,
    selector_string,
)

GPU = "nvidia.com/gpu"
OPERATOR_IMAGE = "registry.example/zimage-operator:9.9.9"
REMOTE = {
    "api": "chat",
    "baseUrl": "https://llm.example/v1",
    "model": "gpt-x",
    "keysSecret": "provider-a-keys",
    "limits": {"requestsPerWindow": 4},
}
FULL_REMOTE = {
    **REMOTE,
    "api": "images",
    "limits": {"requestsPerWindow": 240, "windowSeconds": 60, "tokensPerWindow": 90000, "concurrency": 2},
    "timeoutSeconds": 40,
    "maxAttempts": 3,
    "concurrencyPerReplica": 8,
}
MODEL_ENV = (
    "ZIMAGE_MODEL_SOURCE",
    "ZIMAGE_VARIANT",
    "MODELS_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "ZIMAGE_MAX_BATCH_SIZE",
)


def remote_md(name: str = "llm", **spec: Any) -> dict[str, Any]:
    return md(name, backend="remote", remote=copy.deepcopy(REMOTE), **spec)


def function_md(name: str = "compose", entry_point: str = "builtin:compose", **spec: Any) -> dict[str, Any]:
    return md(name, backend="function", function={"entryPoint": entry_point}, **spec)


def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objs["deployment"]["spec"]["template"]["spec"]
    return spec


class RemoteSettings(BaseSettings):
    """The layout zimage_operator.workload's docstring promises the forwarder, read as pydantic-settings would."""

    model_config = SettingsConfigDict(env_prefix="ZIMAGE_")

    remote_api: Literal["chat", "images"]
    remote_base_url: str
    remote_model: str
    remote_keys_dir: Path
    remote_key_pool: str
    remote_requests_per_window: int
    remote_window_seconds: int
    remote_tokens_per_window: int | None = None
    remote_concurrency: int | None = None
    remote_timeout_seconds: int
    remote_max_attempts: int
    concurrency_per_replica: int
    fallbacks: dict[Literal["unavailable", "rateLimited", "failed"], list[str]] = {}


PROVIDER_ENV = ("ZIMAGE_REMOTE_", "ZIMAGE_CONCURRENCY_PER_REPLICA", "ZIMAGE_FALLBACKS")


def remote_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> RemoteSettings:
    for e in container["env"]:
        if e["name"].startswith(PROVIDER_ENV):
            monkeypatch.setenv(e["name"], e["value"])
    return RemoteSettings()  # type: ignore[call-arg]


# -- remote ------------------------------------------------------------------------------------------------------
def test_remote_pool_is_a_forwarder_deployment_without_model_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(remote_md(), forwarder_image=OPERATOR_IMAGE, job_retention_seconds=3600)
    # No cache claim, no preload Job: the same three children as a GPU pool's, under the same names.
    assert {k: o["metadata"]["name"] for k, o in objs.items()} == {
        "deployment": "llm-worker",
        "service": "llm-worker-metrics",
        "poddisruptionbudget": "llm-worker",
    }
    assert objs["deployment"]["spec"]["selector"]["matchLabels"] == objs["service"]["spec"]["selector"]
    assert selector_string("llm") == ",".join(f"{k}={v}" for k, v in objs["service"]["spec"]["selector"].items())
    c = worker(objs)
    assert (c["name"], c["image"], c["command"]) == ("zimage-forwarder", OPERATOR_IMAGE, ["zimage-forwarder"])
    assert c["resources"] == FORWARDER_RESOURCES and GPU not in str(c["resources"])
    env = env_of(c)
    assert env["ZIMAGE_QUEUE"] == "team-a/llm" and env["ZIMAGE_REDIS_URL"].startswith("redis://")
    assert env["ZIMAGE_WORKER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["ZIMAGE_JOB_RETENTION_SECONDS"] == "3600" and env["ZIMAGE_HTTP_PORT"] == "8080"
    assert not set(MODEL_ENV) & set(env)
    assert [p["httpGet"]["port"] for p in (c["startupProbe"], c["readinessProbe"], c["livenessProbe"])] == [
        "metrics"
    ] * 3
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    # A draining forwarder may finish the call in hand with all its attempts.
    assert pod(objs)["terminationGracePeriodSeconds"] == 120 * 5 + PRE_STOP_SECONDS
    settings = remote_settings(c, monkeypatch)
    assert settings.model_dump() == {
        "remote_api": "chat",
        "remote_base_url": "https://llm.example/v1",
        "remote_model": "gpt-x",
        "remote_keys_dir": Path(PROVIDER_KEYS_DIR),
        "remote_key_pool": "team-a/provider-a-keys",
        "remote_requests_per_window": 4,
        "remote_window_seconds": 60,
        "remote_tokens_per_window": None,
        "remote_concurrency": None,
        "remote_timeout_seconds": 120,
        "remote_max_attempts": 5,
        "concurrency_per_replica": 32,
        "fallbacks": {},
    }


def test_every_remote_setting_reaches_the_forwarder(monkeypatch: pytest.MonkeyPatch) -> None:
    chains = {"unavailable": ["provider-b", "local"], "rateLimited": ["provider-b"]}
    c = worker(render(md("img", backend="remote", remote=FULL_REMOTE, fallbacks=chains)))
    assert c["image"] == DEFAULT_FORWARDER_IMAGE  # without the operator's setting
    s = remote_settings(c, monkeypatch)
    assert (s.remote_api, s.remote_requests_per_window, s.remote_window_seconds) == ("images", 240, 60)
    assert (s.remote_tokens_per_window, s.remote_concurrency) == (90000, 2)
    assert (s.remote_timeout_seconds, s.remote_max_attempts, s.concurrency_per_replica) == (40, 3, 8)
    assert s.fallbacks == chains


def test_the_forwarders_own_settings_read_the_rendered_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract with zimage_forwarder: every value the operator renders is the one the forwarder reads."""
    settings = pytest.importorskip("zimage_forwarder.settings")
    chains = {"failed": ["local"]}
    c = worker(render(md("img", backend="remote", remote=FULL_REMOTE, fallbacks=chains), job_retention_seconds=60))
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    cfg = settings.ForwarderSettings()
    assert (cfg.queue, cfg.http_port, cfg.job_retention_seconds) == ("team-a/img", 8080, 60)
    assert (cfg.remote_api, cfg.remote_base_url, cfg.remote_model) == ("images", "https://llm.example/v1", "gpt-x")
    assert cfg.remote_keys_dir == PROVIDER_KEYS_DIR
    assert (cfg.remote_requests_per_window, cfg.remote_window_seconds, cfg.remote_tokens_per_window) == (240, 60, 90000)
    assert (cfg.remote_concurrency, cfg.remote_timeout_seconds, cfg.remote_max_attempts) == (2, 40, 3)
    assert (cfg.concurrency_per_replica, cfg.fallbacks) == (8, chains)


def test_provider_keys_are_mounted_files_never_environment() -> None:
    objs = render(remote_md(env=[{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]))
    p = pod(objs)
    [keys] = [v for v in p["volumes"] if v.get("secret")]
    assert keys["secret"] == {"secretName": "provider-a-keys", "defaultMode": 0o440}  # every entry, one file each
    [mount] = [m for m in p["containers"][0]["volumeMounts"] if m["name"] == keys["name"]]
    assert mount == {"name": keys["name"], "mountPath": "/etc/zimage/provider-keys", "readOnly": True}
    c = p["containers"][0]
    refs = [e["valueFrom"] for e in c["env"] if "valueFrom" in e] + c.get("envFrom", [])
    assert "provider-a-keys" not in str(refs)
    assert env_of(c)["HTTPS_PROXY"] == "http://proxy:3128"  # the user's env still applies
    # No model cache, no writable volume but /tmp.
    assert {v["name"] for v in p["volumes"]} == {"tmp", keys["name"]}


def test_forwarder_redis_auth_and_storage_are_the_workers() -> None:
    auth = RedisAuth(password="s3cret", ca_cert="PEM", username="pool")
    here = render(remote_md(), redis_auth=RedisAuth(secret="zimage-redis"), operator_namespace="team-a")
    assert env_of(worker(here))["ZIMAGE_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "zimage-redis", "key": "redis-password"}
    }
    elsewhere = render(remote_md(), redis_auth=auth, operator_namespace="zimage")
    env = env_of(worker(elsewhere))
    assert env["ZIMAGE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "llm-redis", "key": "redis-password"}}
    assert env["ZIMAGE_REDIS_USERNAME"] == "pool" and "s3cret" not in str(worker(elsewhere))
    assert next(iter(elsewhere)) == "secret"  # first, so it is there when the pods start
    stored = render(
        remote_md(), storage_claim="images", operator_namespace="team-a", storage_secret="s3-creds", storage_url="x"
    )
    c = worker(stored)
    assert env_of(c)["ZIMAGE_STORAGE_URL"] == "file:///var/lib/zimage/images"
    assert {"name": "images", "mountPath": "/var/lib/zimage/images"} in c["volumeMounts"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": True}}]


def test_remote_resources_follow_the_spec() -> None:
    c = worker(render(remote_md(resources={"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}})))
    assert c["resources"] == {"requests": {"cpu": "250m"}, "limits": {"memory": "1Gi"}}


# -- function ----------------------------------------------------------------------------------------------------
def test_function_pool_runs_the_entry_point_in_plain_workers() -> None:
    objs = render(function_md(image="registry.example/steps:2"))
    assert set(objs) == {"deployment", "service", "poddisruptionbudget"}
    c = worker(objs)
    assert (c["name"], c["image"], c["command"]) == ("zimage-worker", "registry.example/steps:2", ["zimage-worker"])
    env = env_of(c)
    assert (env["ZIMAGE_ENGINE"], env["ZIMAGE_FUNCTION"]) == ("function", "builtin:compose")
    assert env["ZIMAGE_QUEUE"] == "team-a/compose" and env["HOME"] == "/tmp"
    assert not set(MODEL_ENV) & set(env)
    assert c["resources"] == FUNCTION_RESOURCES
    assert [v["name"] for v in pod(objs)["volumes"]] == ["tmp"]
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


def test_function_pool_gets_the_resources_it_asks_for() -> None:
    custom = function_md(
        "ocr", "shop.steps:segment", resources={"requests": {"cpu": "4"}, "limits": {"cpu": "4", GPU: 1}}
    )
    c = worker(render(custom))
    assert env_of(c)["ZIMAGE_FUNCTION"] == "shop.steps:segment"
    assert c["resources"] == {"requests": {"cpu": "4"}, "limits": {"cpu": "4", GPU: "1"}}


# -- every backend: valid Kubernetes objects ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "kw"),
    [
        (remote_md(), {}),
        (
            md("img", backend="remote", remote=FULL_REMOTE, nodeSelector={"pool": "cpu"}, storage={"url": "s3://b"}),
            {"redis_auth": RedisAuth(password="p", ca_cert="c"), "operator_namespace": "zimage"},
        ),
        (function_md(), {"storage_claim": "images", "operator_namespace": "team-a", "storage_secret": "s3"}),
        (function_md("seg", "shop.steps:segment", resources={"limits": {"cpu": "2"}}), {}),
    ],
)
def test_rendered_backends_are_valid_kubernetes_objects(body: dict[str, Any], kw: dict[str, Any]) -> None:
    api = k8s.ApiClient()
    models = {**MODELS, "secret": "V1Secret"}
    for kind, obj in render(body, **kw).items():
        assert _unknown_fields(obj, models[kind], kind) == []
        api._ApiClient__deserialize(copy.deepcopy(obj), models[kind])


# -- spec rules --------------------------------------------------------------------------------------------------
# Each refused spec once, with the complaint; the CRD's CEL rules refuse the same on a real API server
# (tests/integration/test_modeldeployment_kube.py), cross_field_errors on a cluster without CEL.
REFUSED = [
    ({"backend": "remote"}, "spec.remote: required with backend remote"),
    ({"remote": REMOTE}, "spec.remote: required with backend remote and used only with it"),
    ({"backend": "function"}, "spec.function: required with backend function"),
    ({"backend": "function", "function": {"entryPoint": "builtin:blur"}}, "builtin:blur is none of compose"),
    ({"backend": "remote", "remote": REMOTE, "cache": {"size": "1Gi", "preload": True}}, "spec.cache: preload"),
    ({"backend": "function", "function": {"entryPoint": "m:f"}, "cache": {"existingClaim": "c"}}, "spec.cache"),
    ({"backend": "remote", "remote": REMOTE, "resources": {"limits": {GPU: 1}}}, "with backend remote"),
    ({"backend": "remote", "remote": REMOTE, "env": [{"name": "ZIMAGE_REMOTE_MODEL", "value": "x"}]}, "spec.env"),
    ({"backend": "remote", "remote": REMOTE, "env": [{"name": "ZIMAGE_FALLBACKS", "value": "{}"}]}, "spec.env"),
    ({"backend": "function", "function": {"entryPoint": "m:f"}, "env": [{"name": "ZIMAGE_ENGINE"}]}, "spec.env"),
    ({"fallbacks": {"rateLimited": ["other", "pool"]}}, "spec.fallbacks: pool is this ModelDeployment"),
]
ACCEPTED = [
    {},
    {"backend": "remote", "remote": FULL_REMOTE, "fallbacks": {"unavailable": ["b"], "rateLimited": ["b", "c"]}},
    {"backend": "function", "function": {"entryPoint": "builtin:watermark"}, "cache": {"mountPath": "/m"}},
    {"backend": "function", "function": {"entryPoint": "shop.steps.v2:compose_all"}, "resources": {"limits": {GPU: 1}}},
    {"env": [{"name": "ZIMAGE_ENGINE", "value": "noop"}, {"name": "ZIMAGE_REMOTE_X", "value": "1"}]},  # diffusers'
    {"fallbacks": {"failed": ["other"]}},
]


@pytest.mark.parametrize(("spec", "complaint"), REFUSED)
def test_backend_rules_refuse(spec: dict[str, Any], complaint: str) -> None:
    errors = ModelDeploymentSpec.model_validate(spec).cross_field_errors("pool")
    assert any(complaint in e for e in errors), errors
    with pytest.raises(ValueError, match="spec"):
        render(md("pool", **spec))


@pytest.mark.parametrize("spec", ACCEPTED)
def test_backend_rules_accept(spec: dict[str, Any]) -> None:
    assert ModelDeploymentSpec.model_validate(spec).cross_field_errors("pool") == []
    assert render(md("pool", **spec))["deployment"]


@pytest.mark.parametrize(
    "remote",
    [
        {**REMOTE, "baseUrl": "ftp://llm.example"},
        {**REMOTE, "baseUrl": "https://"},
        {**REMOTE, "api": "embeddings"},
        {**REMOTE, "keysSecret": "Keys_A"},
        {**REMOTE, "limits": {"requestsPerWindow": 0}},
        {**REMOTE, "limits": {}},
        {k: v for k, v in REMOTE.items() if k != "model"},
        {**REMOTE, "concurrencyPerReplica": 0},
    ],
)
def test_remote_schema_refuses(remote: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate({"backend": "remote", "remote": remote})


@pytest.mark.parametrize(
    "spec",
    [
        {"function": {"entryPoint": "no_function"}},
        {"function": {"entryPoint": "a b:c"}},
        {"fallbacks": {"unavailable": ["a", "b", "c", "d", "e", "f"]}},
        {"fallbacks": {"failed": ["Not-A-Name"]}},
        {"backend": "gpu"},
    ],
)
def test_backend_schema_refuses(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ModelDeploymentSpec.model_validate(spec)


def test_crd_carries_the_rules_and_a_backend_column() -> None:
    crd = crdgen.crds()["modeldeployment.yaml"]
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    spec = root["properties"]["spec"]
    assert spec["properties"]["backend"] == {
        "type": "string",
        "description": spec["properties"]["backend"]["description"],
        "default": "diffusers",
        "enum": ["diffusers", "remote", "function"],
    }
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert any("spec.remote" in m for m in messages) and any("spec.function" in m for m in messages)
    assert any("spec.cache" in m for m in messages)
    assert [r["message"] for r in root["x-kubernetes-validations"]] == [
        "spec.fallbacks may not name the ModelDeployment itself"
    ]
    assert "self.metadata.name" in root["x-kubernetes-validations"][0]["rule"]
    assert spec["properties"]["function"]["x-kubernetes-validations"]
    assert {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"} in version["additionalPrinterColumns"]


# -- scaling -----------------------------------------------------------------------------------------------------
def test_remote_replicas_are_sized_by_concurrency_per_replica() -> None:
    remote = ModelDeploymentSpec.model_validate(
        {"backend": "remote", "remote": FULL_REMOTE, "scaling": {"maxReplicas": 10, "targetQueuePerReplica": 1}}
    )
    policy = scaling.policy_for(remote)
    assert policy.target_queue_per_replica == 8 and policy.max_replicas == 10
    desired, _, reason = scaling.decide_replicas(
        policy, 60, 10, 1, scaling.ScalerState(), datetime(2025, 1, 1, tzinfo=UTC), busy=1
    )
    assert (desired, reason) == (math.ceil(70 / 8), "ScaleUp")
    gpu = ModelDeploymentSpec.model_validate({"scaling": {"targetQueuePerReplica": 3}})
    assert scaling.policy_for(gpu) is gpu.scaling
    function = ModelDeploymentSpec.model_validate({"backend": "function", "function": {"entryPoint": "m:f"}})
    assert scaling.policy_for(function) is function.scaling


# -- chart -------------------------------------------------------------------------------------------------------
def test_the_chart_gives_forwarders_the_operators_image(helm: list[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from zimage_operator.settings import OperatorSettings

    docs = render_chart(helm)
    [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-zimage-operator-operator"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ZIMAGE_FORWARDER_IMAGE"] == container["image"]
    monkeypatch.setenv("ZIMAGE_FORWARDER_IMAGE", env["ZIMAGE_FORWARDER_IMAGE"])
    assert OperatorSettings().forwarder_image == container["image"]
