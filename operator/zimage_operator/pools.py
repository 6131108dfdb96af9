"""The ModelDeployment control loop: children, replicas that follow the queue, deletion costs, status.

One loop per operator over every known ModelDeployment (kept current by a watch handler), rather than a kopf
daemon per object: daemons put a finalizer on each object, and the queue must be polled every second anyway.
Each pass is a thin shell around pure functions: ``scaling.decide_replicas`` and ``workload.desired_objects``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from zimage_operator import adapters, reconcile, scaling, workload
from zimage_operator.conditions import iso, set_condition
from zimage_operator.lease import LeaseLost
from zimage_operator.metrics import DESIRED_REPLICAS, INFLIGHT, QUEUE_LENGTH, READY_REPLICAS, SCALE_DECISIONS
from zimage_operator.runtime import Runtime
from zimage_operator.types import ModelDeploymentSpec
from zimage_queue import keys
from zimage_queue.clients import Credentials

log = logging.getLogger(__name__)


@dataclass
class Pool:
    body: dict[str, Any]
    state: scaling.ScalerState = field(default_factory=scaling.ScalerState)
    next_drift_check: float = 0.0
    last_status: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, int] = field(default_factory=dict)
    no_capacity_since: datetime | None = None


@functools.lru_cache(maxsize=4)
def worker_redis_auth(
    creds: Credentials, secret: str, secret_key: str, ca_secret: str, ca_secret_key: str
) -> workload.RedisAuth:
    """What the workers authenticate with: the operator's own credentials (its CA file read once)."""
    return workload.RedisAuth(
        password=creds.password,
        ca_cert=creds.ca_pem(),
        username=creds.username,
        secret=secret or None,
        secret_key=secret_key,
        ca_secret=ca_secret or None,
        ca_secret_key=ca_secret_key,
    )


def _ns_name(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def sync(rt: Runtime, pool: Pool, now: datetime) -> None:
    """One pass for one ModelDeployment (blocking I/O: run it in a thread)."""
    md = pool.body
    ns, name = _ns_name(md)
    errors = reconcile.modeldeployment_errors(md.get("spec") or {}, name)
    if errors:
        _invalid(rt, pool, now, "; ".join(errors))
        return
    spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    policy = scaling.policy_for(spec)
    queue = keys.queue_name(ns, name)
    stats = rt.queue.stats(queue)
    workers = rt.queue.workers(queue)
    busy = sum(workers.values())
    actual = rt.kube.get_object("apps/v1", "Deployment", ns, workload.worker_name(name))
    current = int(((actual or {}).get("spec") or {}).get("replicas") or 0) if actual else policy.min_replicas

    if policy.mode == "external":
        desired, reason = (spec.replicas if spec.replicas is not None else current), "External"
    else:
        desired, pool.state, reason = scaling.decide_replicas(
            policy, stats.queued, stats.in_flight, current, pool.state, now, busy=busy
        )
    cached = True
    if spec.cache.preload:
        job = rt.kube.get_object("batch/v1", "Job", ns, workload.preload_job_name(name))
        cached = bool(((job or {}).get("status") or {}).get("succeeded"))
        if not cached and desired > 0:
            # Workers mount the cache read-only and offline: starting them before the download is done would
            # only crash-loop them.
            desired, reason = 0, "WaitingForModelCache"
    objects = workload.desired_objects(
        md,
        redis_url=rt.settings.worker_redis_url or rt.settings.redis_url,
        replicas=desired,
        redis_auth=worker_redis_auth(
            rt.settings.redis_credentials,
            rt.settings.worker_redis_secret,
            rt.settings.worker_redis_secret_key,
            rt.settings.worker_redis_ca_secret,
            rt.settings.worker_redis_ca_secret_key,
        ),
        storage_url=rt.settings.worker_storage_url or None,
        longest_timeout_seconds=rt.settings.max_job_seconds,
        job_retention_seconds=rt.settings.job_retention_seconds,
        operator_namespace=rt.settings.operator_namespace or None,
        storage_claim=rt.settings.worker_storage_claim or None,
        storage_mount_path=rt.settings.worker_storage_mount_path,
        storage_secret=rt.settings.worker_storage_secret or None,
        forwarder_image=rt.settings.forwarder_image,
    )

    drift_check = time.monotonic() >= pool.next_drift_check
    for key, desired_obj in objects.items():
        obj = rt.kube.as_served(desired_obj)
        if key == "deployment":
            live = actual
        elif drift_check:
            live = rt.kube.get_object(obj["apiVersion"], obj["kind"], ns, obj["metadata"]["name"])
        else:
            continue
        if live is None:
            log.info("creating %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
            rt.lease.check()  # fencing: no write once the lease may have passed to another replica
            rt.kube.create_object(obj)
        elif key != "job" and workload.drifted(obj, live):  # a Job's template is immutable
            log.info("reverting drift of %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
            rt.lease.check()  # fencing: no write once the lease may have passed to another replica
            rt.kube.patch_object(obj)
    if drift_check:
        pool.next_drift_check = time.monotonic() + rt.settings.drift_check_seconds

    status: dict[str, Any] = dict(pool.last_status) or dict(md.get("status") or {})
    status.pop("kopf", None)
    if desired != current and actual is not None:
        SCALE_DECISIONS.labels(model=queue, reason=reason).inc()
        rt.lease.check()  # fencing: no write once the lease may have passed to another replica
        rt.kube.post_event(
            md,
            "Normal",
            reason,
            f"replicas {current} -> {desired} (queued {stats.queued}, "
            f"in flight {stats.in_flight}, busy workers {busy})",
        )
        status["scalingHistory"] = scaling.record_scaling(status.get("scalingHistory"), current, desired, reason, now)
        status["lastScaleTime"] = iso(now)

    gen = md["metadata"].get("generation")
    dep_status = (actual or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    selector = workload.selector_string(name)
    conditions, _ = set_condition(
        status.get("conditions"),
        "Available",
        ready > 0 or desired == 0,
        "WorkersReady" if ready > 0 else ("ScaledToZero" if desired == 0 else "NoReadyWorkers"),
        f"{ready}/{desired} workers ready",
        now,
        gen,
    )
    if spec.cache.preload:
        conditions, _ = set_condition(
            conditions,
            "ModelCached",
            cached,
            "Preloaded" if cached else "Downloading",
            "model files are in the cache volume" if cached else "preload Job is downloading the model",
            now,
            gen,
        )
    conditions, _ = set_condition(conditions, "Degraded", False, "SpecValid", "spec is valid", now, gen)
    conditions, _ = set_condition(
        conditions,
        "Scaling",
        ready != desired,
        reason if ready != desired else "Settled",
        f"{ready} ready of {desired} wanted (queued {stats.queued}, in flight {stats.in_flight})",
        now,
        gen,
    )
    status.update(
        replicas=int(dep_status.get("replicas") or 0),
        readyReplicas=ready,
        desiredReplicas=desired,
        selector=selector,
        queueLength=stats.queued,
        inFlight=stats.in_flight,
        conditions=conditions,
        observedGeneration=gen,
    )
    if spec.adapters:
        status["adapters"] = adapters.status(spec.adapters, rt.queue.loaded_adapters(queue, workers))
    elif "adapters" in status:
        status["adapters"] = None  # the merge patch drops it
    if status != pool.last_status:
        rt.lease.check()  # fencing: no write once the lease may have passed to another replica
        rt.kube.patch_model_status(ns, name, status)
        pool.last_status = status
    if spec.fallback:
        due, pool.no_capacity_since = scaling.fallback_due(
            spec.fallback.after_seconds, ready, stats.queued, pool.no_capacity_since, now
        )
        if due:
            rt.lease.check()  # fencing: no write once the lease may have passed to another replica
            moved = rt.queue.reroute(queue, keys.queue_name(ns, spec.fallback.model), spec.fallback.model)
            if moved:
                log.info("moved %d job(s) from %s to fallback %s", moved, name, spec.fallback.model)
    QUEUE_LENGTH.labels(model=queue).set(stats.queued)
    INFLIGHT.labels(model=queue).set(stats.in_flight)
    DESIRED_REPLICAS.labels(model=queue).set(desired)
    READY_REPLICAS.labels(model=queue).set(ready)

    # Busy workers get the highest pod-deletion-cost so a scale-down takes idle pods first.
    if actual is not None and (workers or pool.costs):
        pods = rt.kube.list_pods(ns, selector)
        costs = scaling.deletion_costs(
            [(p["metadata"]["name"], workers.get(p["metadata"]["name"], False)) for p in pods]
        )
        for pod, cost in costs.items():
            if pool.costs.get(pod) != cost:
                rt.lease.check()  # fencing: no write once the lease may have passed to another replica
                rt.kube.annotate_pod(ns, pod, {scaling.DELETION_COST_ANNOTATION: str(cost)})
        pool.costs = costs


def _invalid(rt: Runtime, pool: Pool, now: datetime, message: str) -> None:
    """A spec the schema let through but the operator cannot build: say so once, touch no children."""
    md = pool.body
    ns, name = _ns_name(md)
    status = dict(pool.last_status) or {k: v for k, v in (md.get("status") or {}).items() if k != "kopf"}
    conditions, changed = set_condition(
        status.get("conditions"), "Degraded", True, "InvalidSpec", message, now, md["metadata"].get("generation")
    )
    if changed:
        status.update(conditions=conditions, observedGeneration=md["metadata"].get("generation"))
        rt.lease.check()  # fencing: no write once the lease may have passed to another replica
        rt.kube.patch_model_status(ns, name, status)
        rt.lease.check()  # fencing: no write once the lease may have passed to another replica
        rt.kube.post_event(md, "Warning", "InvalidSpec", message)
        pool.last_status = status


async def run_once(rt: Runtime) -> None:
    """One pass over every ModelDeployment (the leader's). One failing pool does not stop the others; a pass in
    which every pool failed counts as a failed pass of the loop."""
    if not await asyncio.to_thread(rt.lease.held):
        return
    failed = []
    pools = list(rt.pools.values())
    for pool in pools:
        try:
            await asyncio.to_thread(sync, rt, pool, datetime.now(UTC))
        except LeaseLost as e:
            log.warning("%s", e)  # the next pass renews it, or the replica that took it over carries on
            return
        except Exception as e:
            log.exception("sync of ModelDeployment %s/%s failed; retrying", *_ns_name(pool.body))
            failed.append(e)
    if pools and len(failed) == len(pools):
        raise failed[-1]
