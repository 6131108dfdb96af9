"""Pure rendering of a ModelDeployment's children: (ModelDeployment body, operator settings) -> manifests.

Everything is a plain dict, ready for kopf.adopt and the API server; nothing here talks to a cluster.

Per ``spec.backend`` the pool's Deployment (always ``<name>-worker``, with the same labels, metrics Service and
PodDisruptionBudget, so scaling, deletion costs and the Redis NetworkPolicy treat every pool alike) runs:

- ``diffusers``: GPU workers (the worker image's entry point) with the model's environment, its cache volume and,
  when asked, a preload Job.
- ``function``: ``zimage-worker`` from ``spec.image`` with ``ZIMAGE_ENGINE=function`` and
  ``ZIMAGE_FUNCTION=<spec.function.entryPoint>`` (``module:function`` or ``builtin:<name>``); no model
  environment, no cache, no GPU unless ``spec.resources`` asks for one.
- ``remote``: ``zimage-forwarder`` from the operator's image (``forwarder_image``), no GPU. The queue, Redis and
  storage variables are the workers' (``ZIMAGE_REDIS_URL``, ``ZIMAGE_REDIS_USERNAME`` / ``_PASSWORD`` /
  ``_CA_CERT`` through ``secretKeyRef``, ``ZIMAGE_QUEUE``, ``ZIMAGE_WORKER_NAME``, ``ZIMAGE_HTTP_PORT``,
  ``ZIMAGE_STORAGE_URL``, ``ZIMAGE_JOB_RETENTION_SECONDS``), and the provider's are flat ``ZIMAGE_REMOTE_*``
  values, one per setting, so a ``pydantic-settings`` class with ``env_prefix="ZIMAGE_"`` reads them as they
  are (``zimage_forwarder.settings``)::

      remote_api: Literal["chat", "images"]   # ZIMAGE_REMOTE_API                 spec.remote.api
      remote_base_url: str                    # ZIMAGE_REMOTE_BASE_URL            spec.remote.baseUrl
      remote_model: str                       # ZIMAGE_REMOTE_MODEL               spec.remote.model
      remote_keys_dir: str                    # ZIMAGE_REMOTE_KEYS_DIR            /etc/zimage/provider-keys
      remote_key_pool: str                    # ZIMAGE_REMOTE_KEY_POOL            <namespace>/<keysSecret>
      remote_requests_per_window: int         # ZIMAGE_REMOTE_REQUESTS_PER_WINDOW spec.remote.limits.*
      remote_window_seconds: int              # ZIMAGE_REMOTE_WINDOW_SECONDS
      remote_tokens_per_window: int | None    # ZIMAGE_REMOTE_TOKENS_PER_WINDOW   (absent: not counted)
      remote_concurrency: int | None          # ZIMAGE_REMOTE_CONCURRENCY         per key (absent: no cap)
      remote_timeout_seconds: int             # ZIMAGE_REMOTE_TIMEOUT_SECONDS     spec.remote.timeoutSeconds
      remote_max_attempts: int                # ZIMAGE_REMOTE_MAX_ATTEMPTS        spec.remote.maxAttempts
      concurrency_per_replica: int            # ZIMAGE_CONCURRENCY_PER_REPLICA    spec.remote.concurrencyPerReplica
      fallbacks: dict[str, list[str]]         # ZIMAGE_FALLBACKS  JSON of spec.fallbacks (absent when unset)

  The keys never travel as environment: the Secret ``spec.remote.keysSecret`` is mounted read-only at
  ``remote_keys_dir``, one file per entry, the file's name the key's id and its content the key (the kubelet's
  own ``..data`` links and hidden entries start with a dot: skip them). ``remote_key_pool`` is a name for the
  keys' budgets in Redis that pools naming the same Secret have in common, as they share the provider's accounts.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import PurePosixPath as Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubernetes.utils.quantity import parse_quantity

from zimage_operator.types import (
    API_VERSION,
    DEFAULT_FORWARDER_IMAGE,
    GPU_RESOURCE,
    ModelDeploymentSpec,
    RemoteBackend,
)
from zimage_queue.keys import queue_name
from zimage_queue.message import ADAPTER_CACHE

WORKER_CONTAINER = "zimage-worker"
FORWARDER_CONTAINER = "zimage-forwarder"
MANAGED_BY = "zimage-operator"
METRICS_PORT = 8080  # the worker's ZIMAGE_HTTP_PORT default; set explicitly so the probes and the worker agree
SPEC_HASH_ANNOTATION = "zimage.dev/spec-hash"
MODEL_LABEL = "zimage.dev/model"
CACHE_VOLUME = "model-cache"
TMP_VOLUME = "tmp"
IMAGES_VOLUME = "images"
# A queue worker has no Service traffic to lose, but the metrics endpoints should drop the pod before it drains.
PRE_STOP_SECONDS = 5
# A worker finishes the job in hand on SIGTERM; a diffusion job at high resolution can take minutes.
MIN_GRACE_SECONDS = 600
# Loading a multi-GB model (download, then to GPU) takes minutes: allow 30 before the kubelet gives up.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURES = 180
MIN_PROGRESS_DEADLINE_SECONDS = 600
RUN_AS = 10001  # the user of the worker image (worker_image/Dockerfile)
# The keys of the Secret a pool outside the operator's namespace gets its Redis credentials from.
REDIS_PASSWORD_KEY = "redis-password"
REDIS_CA_KEY = "ca.crt"
# Remote pools: where the provider keys' Secret is mounted (files, 0440: the pod's group is its fsGroup).
PROVIDER_KEYS_VOLUME = "provider-keys"
PROVIDER_KEYS_DIR = "/etc/zimage/provider-keys"
PROVIDER_KEYS_MODE = 0o440
# Pods without spec.resources: a forwarder only waits on HTTP; a function worker runs one CPU-bound job.
FORWARDER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
FUNCTION_RESOURCES = {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
# Neither loads a model: a forwarder is ready in seconds, a function worker once its module is imported.
FORWARDER_STARTUP = (2, 30)
FUNCTION_STARTUP = (5, 60)


def worker_name(md_name: str) -> str:
    return _fit(md_name, "-worker", 253)


def metrics_service_name(md_name: str) -> str:
    # Service names are DNS-1035 labels: no dots, at most 63 characters, starting with a letter.
    base = md_name.replace(".", "-")
    return _fit(base if base[:1].isalpha() else f"md-{base}", "-worker-metrics", 63)


def cache_claim_name(md_name: str) -> str:
    return _fit(md_name, "-model-cache", 253)


def redis_secret_name(md_name: str) -> str:
    return _fit(md_name, "-redis", 253)


def preload_job_name(md_name: str) -> str:
    # A Job's name becomes its pods' job-name label value, so it has a label's 63 characters.
    return _fit(md_name, "-preload", 63)


def labels(md_name: str, component: str) -> dict[str, str]:
    instance = _fit(md_name, "", 63)
    return {
        "app.kubernetes.io/name": "zimage-worker",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        MODEL_LABEL: instance,
    }


def selector(md_name: str) -> dict[str, str]:
    """The worker pods' matchLabels: also the Service's and the PodDisruptionBudget's."""
    full = labels(md_name, "worker")
    return {k: full[k] for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component")}


def selector_string(md_name: str) -> str:
    """status.selector, which the scale subresource hands to an HPA."""
    return ",".join(f"{k}={v}" for k, v in selector(md_name).items())


@dataclass(frozen=True)
class _Parent:
    name: str
    namespace: str
    uid: str

    def metadata(self, obj_name: str, component: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        owner = {
            "apiVersion": API_VERSION,
            "kind": "ModelDeployment",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        m: dict[str, Any] = {
            "name": obj_name,
            "namespace": self.namespace,
            "labels": labels(self.name, component),
            "ownerReferences": [owner],
        }
        if annotations:
            m["annotations"] = annotations
        return m


@dataclass(frozen=True)
class RedisAuth:
    """How worker pods authenticate to Redis: only ever through ``secretKeyRef``, never a value in the pod spec.

    Pools in the operator's namespace use the Secrets named here (the chart's: ``secret`` holds the password,
    ``ca_secret`` the CA bundle). A pool elsewhere, which cannot reference a Secret across namespaces, or one whose
    Secret is not named, gets a copy of ``password`` / ``ca_cert`` in a Secret of its own namespace
    (``redis_secret_name``), owned by its ModelDeployment. ``username`` (an ACL user, not a secret) is a value.
    """

    password: str | None = field(default=None, repr=False)
    ca_cert: str | None = None
    username: str | None = None
    secret: str | None = None
    secret_key: str = REDIS_PASSWORD_KEY
    ca_secret: str | None = None
    ca_secret_key: str = REDIS_CA_KEY


def desired_objects(
    md: dict[str, Any],
    *,
    redis_url: str,
    replicas: int,
    longest_timeout_seconds: int = 0,
    operator_namespace: str | None = None,
    storage_url: str | None = None,
    job_retention_seconds: int | None = None,
    storage_claim: str | None = None,
    storage_mount_path: str = "/var/lib/zimage/images",
    storage_secret: str | None = None,
    redis_auth: RedisAuth | None = None,
    forwarder_image: str = DEFAULT_FORWARDER_IMAGE,
) -> dict[str, dict[str, Any]]:
    """The children a ModelDeployment should have, keyed by lower-case kind (``deployment``, ``service``,
    ``poddisruptionbudget``, and ``persistentvolumeclaim`` and ``job`` when the cache asks for them).

    ``replicas`` is the scaler's decision (or spec.replicas in external mode); ``longest_timeout_seconds`` the
    longest ImageJob timeout the pool may run, so a draining worker is not killed mid-job; ``operator_namespace``
    qualifies a bare Redis host name, which would not resolve from the ModelDeployment's namespace;
    ``storage_url`` is the operator's default for workers whose spec has no ``storage``;
    ``job_retention_seconds`` how long workers keep a finished job's Redis record (the operator's retention);
    ``storage_claim`` the chart's image volume, mounted at ``storage_mount_path`` by workers of pools in the
    operator's namespace (the claim lives there) whose spec has no ``storage``; ``storage_secret`` a Secret
    whose keys become the workers' environment (the store's credentials; optional in the pod); ``redis_auth``
    the workers' Redis password and CA (``RedisAuth``; a ``secret`` child when the pool needs a copy);
    ``forwarder_image`` what a remote pool's forwarders run (the operator's image).
    Raises pydantic's ValidationError or ValueError for a spec the operator must reject.
    """
    meta = md["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    if errors := spec.cross_field_errors(name):
        raise ValueError("; ".join(errors))
    parent = _Parent(name, namespace, meta["uid"])
    images_claim = None if spec.storage or operator_namespace not in (None, namespace) else storage_claim
    redis_env, redis_secret = _redis_auth(redis_auth, parent, operator_namespace)
    queue_env = _queue_env(name, namespace, _worker_redis_url(redis_url, namespace, operator_namespace), redis_env)
    store_env = _store_env(
        spec.storage.url if spec.storage else (Path(storage_mount_path).as_uri() if images_claim else storage_url),
        job_retention_seconds,
    )
    images: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])  # volumes, mounts
    if images_claim:
        images = (
            [{"name": IMAGES_VOLUME, "persistentVolumeClaim": {"claimName": images_claim}}],
            [{"name": IMAGES_VOLUME, "mountPath": storage_mount_path}],
        )
    grace = max(MIN_GRACE_SECONDS, longest_timeout_seconds)
    cache_volumes: list[dict[str, Any]] = []
    if spec.backend == "remote" and spec.remote:
        container, volumes = _forwarder(spec, spec.remote, namespace, queue_env, store_env, forwarder_image)
        # A draining forwarder finishes the calls in hand: each at most timeoutSeconds, maxAttempts times.
        grace, startup = spec.remote.timeout_seconds * spec.remote.max_attempts, FORWARDER_STARTUP
    elif spec.backend == "function" and spec.function:
        container, volumes = _function_worker(spec, spec.function.entry_point, queue_env, store_env)
        startup = FUNCTION_STARTUP
    else:
        container, volumes, cache_volumes = _diffusers_worker(spec, name, queue_env, store_env)
        startup = (STARTUP_PERIOD_SECONDS, STARTUP_FAILURES)
    container = _without_none(
        {
            **container,
            "envFrom": [{"secretRef": {"name": storage_secret, "optional": True}}] if storage_secret else None,
            "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
            "volumeMounts": [*container["volumeMounts"], *images[1]],
            "securityContext": _container_security(),
            "startupProbe": _probe("/readyz", *startup),
            "readinessProbe": _probe("/readyz", 5, 3),
            # Liveness only sees the HTTP thread; a long generation holds the GPU, not that thread.
            "livenessProbe": _probe("/healthz", 20, 3),
            "lifecycle": {
                # exec python, not sleep: the worker image has Python, and preStop.sleep needs Kubernetes 1.30+.
                "preStop": {"exec": {"command": ["python", "-c", f"import time; time.sleep({PRE_STOP_SECONDS})"]}}
            },
        }
    )
    pod_spec = _without_none(
        {
            "containers": [container],
            "volumes": [*volumes, *images[0]],
            "securityContext": _pod_security(),
            # The worker needs no API access; a mounted token would only be something to steal.
            "automountServiceAccountToken": False,
            # Service links inject <SERVICE>_* variables, and a Service named zimage-* would land in ZIMAGE_*.
            "enableServiceLinks": False,
            # The grace period includes preStop; the rest is the drain of the job in hand.
            "terminationGracePeriodSeconds": grace + PRE_STOP_SECONDS,
            **_placement(spec),
        }
    )
    template: dict[str, Any] = {"metadata": {"labels": labels(name, "worker")}, "spec": pod_spec}
    # Only what reaches the pods is hashed, so a scaling edit does not restart workers that took minutes to load.
    template["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: _hash(template)}
    objects: dict[str, dict[str, Any]] = {
        "deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": parent.metadata(worker_name(name), "worker"),
            "spec": {
                "replicas": max(0, replicas),
                "selector": {"matchLabels": selector(name)},
                # One surge pod loads while one old pod drains: rollouts progress even with no spare GPU.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}},
                "revisionHistoryLimit": 3,
                "progressDeadlineSeconds": max(MIN_PROGRESS_DEADLINE_SECONDS, 2 * startup[0] * startup[1]),
                "template": template,
            },
        },
        "service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": parent.metadata(metrics_service_name(name), "worker"),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(name),
                "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
            },
        },
        "poddisruptionbudget": {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": parent.metadata(worker_name(name), "worker"),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector(name)},
                # A worker that never became ready holds no job: let node drains evict it.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        },
    }
    cache = spec.cache
    if spec.backend == "diffusers":  # only a diffusers pool keeps a model (the CRD refuses a cache elsewhere)
        if cache.size and not cache.existing_claim:
            objects["persistentvolumeclaim"] = {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": parent.metadata(cache_claim_name(name), "model-cache"),
                "spec": _without_none(
                    {
                        "accessModes": list(cache.access_modes),
                        "resources": {"requests": {"storage": cache.size}},
                        "storageClassName": cache.storage_class_name,
                    }
                ),
            }
        if cache.preload:
            objects["job"] = _preload_job(spec, parent, cache_volumes)
    if redis_secret:  # first, so it is there when the pods start
        objects = {"secret": redis_secret, **objects}
    return objects


def _diffusers_worker(
    spec: ModelDeploymentSpec, name: str, queue_env: list[dict[str, Any]], store_env: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The GPU worker container (without what every backend's has), its volumes, and the cache's volumes (which
    the preload Job shares)."""
    cache = spec.cache
    claim = cache.existing_claim or (cache_claim_name(name) if cache.size else None)
    cache_volume: dict[str, Any] = (
        {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": CACHE_VOLUME, "emptyDir": {}}
    )
    volumes = [cache_volume, {"name": TMP_VOLUME, "emptyDir": {}}]
    container = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": _worker_env(spec, queue_env, store_env),
        "resources": _resources(spec.resources),
        # With a preload Job as the only writer, workers cannot corrupt the cache; without one they must download.
        "volumeMounts": _mounts(cache.mount_path, read_only=cache.preload),
    }
    return container, list(volumes), volumes


def _function_worker(
    spec: ModelDeploymentSpec, entry_point: str, queue_env: list[dict[str, Any]], store_env: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A CPU worker: the worker's queue loop with the function engine, no model, no cache."""
    env = [
        *queue_env,
        {"name": "ZIMAGE_ENGINE", "value": "function"},
        {"name": "ZIMAGE_FUNCTION", "value": entry_point},
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        *store_env,
    ]
    container = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["zimage-worker"],
        "env": _with_user_env(env, spec),
        "resources": _resources(spec.resources) or copy.deepcopy(FUNCTION_RESOURCES),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }
    return container, [{"name": TMP_VOLUME, "emptyDir": {}}]


def _forwarder(
    spec: ModelDeploymentSpec,
    remote: RemoteBackend,
    namespace: str,
    queue_env: list[dict[str, Any]],
    store_env: list[dict[str, Any]],
    image: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A remote pool's forwarder: the operator's image, the keys as files, the provider's settings as values."""
    container = {
        "name": FORWARDER_CONTAINER,
        "image": image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["zimage-forwarder"],
        "env": _with_user_env(
            [*queue_env, {"name": "HOME", "value": "/tmp"}, *remote_env(spec, remote, namespace), *store_env], spec
        ),
        "resources": _resources(spec.resources) or copy.deepcopy(FORWARDER_RESOURCES),
        "volumeMounts": [
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": PROVIDER_KEYS_VOLUME, "mountPath": PROVIDER_KEYS_DIR, "readOnly": True},
        ],
    }
    volumes = [
        {"name": TMP_VOLUME, "emptyDir": {}},
        {
            "name": PROVIDER_KEYS_VOLUME,
            "secret": {"secretName": remote.keys_secret, "defaultMode": PROVIDER_KEYS_MODE},
        },
    ]
    return container, volumes


def remote_env(spec: ModelDeploymentSpec, remote: RemoteBackend, namespace: str) -> list[dict[str, Any]]:
    """The forwarder's provider settings (the module docstring's layout): values only, never a key."""
    values: dict[str, Any] = {
        "ZIMAGE_REMOTE_API": remote.api,
        "ZIMAGE_REMOTE_BASE_URL": remote.base_url,
        "ZIMAGE_REMOTE_MODEL": remote.model,
        "ZIMAGE_REMOTE_KEYS_DIR": PROVIDER_KEYS_DIR,
        "ZIMAGE_REMOTE_KEY_POOL": f"{namespace}/{remote.keys_secret}",
        "ZIMAGE_REMOTE_REQUESTS_PER_WINDOW": remote.limits.requests_per_window,
        "ZIMAGE_REMOTE_WINDOW_SECONDS": remote.limits.window_seconds,
        "ZIMAGE_REMOTE_TOKENS_PER_WINDOW": remote.limits.tokens_per_window,
        "ZIMAGE_REMOTE_CONCURRENCY": remote.limits.concurrency,
        "ZIMAGE_REMOTE_TIMEOUT_SECONDS": remote.timeout_seconds,
        "ZIMAGE_REMOTE_MAX_ATTEMPTS": remote.max_attempts,
        "ZIMAGE_CONCURRENCY_PER_REPLICA": remote.concurrency_per_replica,
    }
    if spec.fallbacks:
        chains = spec.fallbacks.model_dump(by_alias=True, exclude_none=True)
        values["ZIMAGE_FALLBACKS"] = json.dumps(chains, separators=(",", ":"))
    return [{"name": k, "value": str(v)} for k, v in values.items() if v is not None]


def _redis_auth(
    auth: RedisAuth | None, parent: _Parent, operator_namespace: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The workers' Redis credential variables, and the Secret holding the copies they refer to (if any)."""
    if auth is None:
        return [], None
    here = operator_namespace in (None, parent.namespace)
    env: list[dict[str, Any]] = []
    if auth.username:
        env.append({"name": "ZIMAGE_REDIS_USERNAME", "value": auth.username})
    copied: dict[str, str] = {}
    for var, value, secret, key, own_key in (
        ("ZIMAGE_REDIS_PASSWORD", auth.password, auth.secret, auth.secret_key, REDIS_PASSWORD_KEY),
        ("ZIMAGE_REDIS_CA_CERT", auth.ca_cert, auth.ca_secret, auth.ca_secret_key, REDIS_CA_KEY),
    ):
        if here and secret:
            ref = {"name": secret, "key": key}
        elif value:
            copied[own_key] = base64.b64encode(value.encode()).decode()
            ref = {"name": redis_secret_name(parent.name), "key": own_key}
        else:
            continue
        env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    if not copied:
        return env, None
    secret_obj = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": parent.metadata(redis_secret_name(parent.name), "worker"),
        "type": "Opaque",
        "data": copied,  # base64, as the API server serves it: drift compares it
    }
    return env, secret_obj


def _preload_job(spec: ModelDeploymentSpec, parent: _Parent, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    container = {
        "name": "preload",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "zimage_worker.preload"],
        # Not the worker's queue settings: the Redis URL may carry a password this pod has no use for.
        "env": _with_user_env(_model_env(spec), spec),
        "volumeMounts": _mounts(spec.cache.mount_path, read_only=False),
        "securityContext": _container_security(),
    }
    pod_spec = _without_none(
        {
            "restartPolicy": "OnFailure",
            "containers": [container],
            "volumes": copy.deepcopy(volumes),
            "securityContext": _pod_security(),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # The workers' placement, so a zonal volume is first bound where the workers can attach it.
            **_placement(spec),
        }
    )
    template = {"metadata": {"labels": labels(parent.name, "preload")}, "spec": pod_spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        # A Job's template is immutable: the hash tells the caller when to replace it rather than patch it.
        "metadata": parent.metadata(preload_job_name(parent.name), "preload", {SPEC_HASH_ANNOTATION: _hash(template)}),
        "spec": {"backoffLimit": 4, "template": template},
    }


def _model_env(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    """What both the workers and the preload Job need to find (or fetch) the same weights."""
    mount = spec.cache.mount_path
    env: list[dict[str, Any]] = [
        {"name": "ZIMAGE_MODEL_SOURCE", "value": spec.model.source},
        {"name": "ZIMAGE_VARIANT", "value": spec.model.variant},
        {"name": "ZIMAGE_DTYPE", "value": spec.model.dtype},
        {"name": "MODELS_DIR", "value": mount},
        # Hub downloads land on the cache volume too; hidden so it never shadows a model directory name.
        {"name": "HF_HOME", "value": f"{mount.rstrip('/')}/.huggingface"},
        # The root filesystem is read-only: libraries that write under ~ (torch, triton caches) get /tmp.
        {"name": "HOME", "value": "/tmp"},
    ]
    if spec.model.revision:
        env.append({"name": "ZIMAGE_REVISION", "value": spec.model.revision})
    if spec.adapters:  # LoRA adapters jobs may name: loaded on demand (workers), fetched ahead (preload)
        adapters = json.dumps([a.wire() for a in spec.adapters], separators=(",", ":"))
        env.append({"name": "ZIMAGE_ADAPTERS", "value": adapters})
        env.append({"name": "ZIMAGE_MAX_RESIDENT_ADAPTERS", "value": str(spec.max_resident_adapters)})
        # Fetched objects on the volume, where the preload Job puts them.
        env.append({"name": "ZIMAGE_ADAPTER_CACHE_DIR", "value": f"{mount.rstrip('/')}/{ADAPTER_CACHE}"})
    return env


def _queue_env(name: str, namespace: str, redis_url: str, redis_env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where every pod of a pool takes its jobs from and who it is, whatever its backend."""
    return [
        {"name": "ZIMAGE_REDIS_URL", "value": redis_url},
        *redis_env,
        {"name": "ZIMAGE_QUEUE", "value": queue_name(namespace, name)},
        {"name": "ZIMAGE_WORKER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ZIMAGE_HTTP_PORT", "value": str(METRICS_PORT)},
    ]


def _store_env(storage_url: str | None, job_retention_seconds: int | None) -> list[dict[str, Any]]:
    env = []
    if storage_url:
        env.append({"name": "ZIMAGE_STORAGE_URL", "value": storage_url})
    if job_retention_seconds is not None:  # the records a worker finishes expire after the operator's retention
        env.append({"name": "ZIMAGE_JOB_RETENTION_SECONDS", "value": str(job_retention_seconds)})
    return env


def _worker_env(
    spec: ModelDeploymentSpec, queue_env: list[dict[str, Any]], store_env: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        *queue_env,
        *_model_env(spec),
        {"name": "ZIMAGE_MAX_BATCH_SIZE", "value": str(spec.batching.max_batch_size)},
        {"name": "ZIMAGE_MAX_WAIT_MILLISECONDS", "value": str(spec.batching.max_wait_milliseconds)},
        {"name": "ZIMAGE_WARMUP", "value": str(spec.acceleration.warmup).lower()},
        {"name": "ZIMAGE_COMPILE", "value": str(spec.acceleration.compile).lower()},
    ]
    if spec.acceleration.attention_backend:
        env.append({"name": "ZIMAGE_ATTENTION_BACKEND", "value": spec.acceleration.attention_backend})
    env += store_env
    if spec.cache.preload:
        # The cache is read-only: a worker must use what the preload Job put there, not start a download.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return _with_user_env(env, spec)


def _with_user_env(ours: list[dict[str, Any]], spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in spec.env or []]
    overridden = {e["name"] for e in user}
    # Ours first: $(VAR) references in the user's values resolve only against earlier entries.
    return [e for e in ours if e["name"] not in overridden] + user


def _worker_redis_url(redis_url: str, namespace: str, operator_namespace: str | None) -> str:
    """A bare Service name (redis://zimage-redis:6379) resolves only in its own namespace: qualify it."""
    if not operator_namespace or operator_namespace == namespace:
        return redis_url
    parts = urlsplit(redis_url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host, colon, port = hostport.partition(":")
    if not host or "." in host or host.startswith("[") or host.lower() == "localhost":
        return redis_url
    netloc = f"{userinfo}{at}{host}.{operator_namespace}.svc{colon}{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _resources(resources: dict[str, Any] | None) -> dict[str, Any] | None:
    if not resources:
        return None
    out = copy.deepcopy(resources)
    for section in ("requests", "limits"):
        if isinstance(out.get(section), dict):
            # Quantities as strings, as the API serves them: YAML's bare 1 for a GPU is the same quantity.
            out[section] = {k: str(v) for k, v in out[section].items()}
    requests, limits = out.get("requests") or {}, out.get("limits") or {}
    # Kubernetes accepts an extended resource in limits alone (requests follow), never in requests alone.
    if GPU_RESOURCE in requests and GPU_RESOURCE not in limits:
        out["limits"] = {**limits, GPU_RESOURCE: requests[GPU_RESOURCE]}
    return out


def _mounts(mount_path: str, *, read_only: bool) -> list[dict[str, Any]]:
    cache: dict[str, Any] = {"name": CACHE_VOLUME, "mountPath": mount_path}
    if read_only:
        cache["readOnly"] = True
    return [cache, {"name": TMP_VOLUME, "mountPath": "/tmp"}]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "metrics"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        # A model cache holds tens of GB: a recursive chown on every mount would delay each pod start.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _placement(spec: ModelDeploymentSpec) -> dict[str, Any]:
    return {
        "nodeSelector": dict(spec.node_selector) if spec.node_selector else None,
        "tolerations": copy.deepcopy(spec.tolerations) if spec.tolerations else None,
        "affinity": copy.deepcopy(spec.affinity) if spec.affinity else None,
        "priorityClassName": spec.priority_class_name,
        "serviceAccountName": spec.service_account_name,
    }


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _fit(base: str, suffix: str, limit: int) -> str:
    """base + suffix, or a truncated base with a digest of the whole, so long names stay valid and distinct."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def drifted(desired: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Whether ``actual`` differs from ``desired`` in a field we set.

    Only our labels, annotations and spec fields count: server defaults, fields other controllers add (a
    restartedAt annotation, a PVC's volumeName) and Go's omitted zero values are not drift.
    """
    dm, am = desired.get("metadata") or {}, actual.get("metadata") or {}
    return not (
        _covers(am.get("labels"), dm.get("labels"))
        and _covers(am.get("annotations"), dm.get("annotations"))
        and _covers(actual.get("spec"), desired.get("spec"))
        and _covers(actual.get("data"), desired.get("data"))  # a Secret's
    )


def _covers(actual: Any, desired: Any, quantity: bool = False) -> bool:
    if desired is None:
        return True  # not ours to set
    if desired in _EMPTY and actual in _EMPTY:
        # The API server omits empty strings, lists and maps. Not False or 0: those fields are pointers whose
        # absence means a default, and a changed template shows in the spec-hash annotation anyway.
        return True
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            _covers(actual.get(k), v, quantity or k in ("limits", "requests")) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(_covers(a, d, quantity) for a, d in zip(actual, desired, strict=True))
        )
    if actual == desired and type(actual) is type(desired):
        return True
    if not quantity:
        return False
    # Quantities come back canonical: 1000m reads as 1, 1 (int) as "1".
    want = _quantity(desired)
    return want is not None and _quantity(actual) == want


_EMPTY: tuple[Any, ...] = (None, "", [], {})


def _quantity(value: Any) -> Decimal | None:
    try:
        q: Decimal = parse_quantity(value)
    except (ValueError, TypeError):
        return None
    return q
