"""``zimage-operator``: run the kopf operator."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
import prometheus_client
from kubernetes.client import ApiClient
from pydantic import ValidationError

from zimage_operator import events, history, pools, resync, retention, workflows
from zimage_operator.admission import Admitter
from zimage_operator.handlers import imagejob, imageworkflow, modeldeployment  # noqa: F401  (registers handlers)
from zimage_operator.k8s import AsyncKube, Kube, load_configuration
from zimage_operator.peering import PeeringGate
from zimage_operator.recorder import Recorder
from zimage_operator.runtime import Runtime
from zimage_operator.settings import OperatorSettings
from zimage_operator.shards import SelectorError, parse_selector, peering_name
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL
from zimage_operator.workflow_types import IMAGEWORKFLOW_PLURAL
from zimage_queue import JobQueue, logs, supervise

log = logging.getLogger("zimage_operator")


class WatchOnlyDiffBase(kopf.StatusDiffBaseStorage):
    """Every handler here is a watch handler, so nothing is ever diffed: kopf still builds an essence of every
    event's body (a deep copy, ~5 % of the operator's CPU under load), and this makes it empty. Should a
    creation/update handler ever come back, drop this and kopf diffs in ``status.kopf`` again."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress lives in status, never in annotations: GitOps tools see no drift on user objects.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = WatchOnlyDiffBase()
    settings.persistence.finalizer = "zimage.dev/operator"  # only used if a handler ever needs one
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    # A half-open connection (a network partition, a dead load balancer) must fail, not hang a watch forever.
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.networking.connect_timeout = 10
    settings.networking.request_timeout = 60
    cfg: OperatorSettings = memo.get("settings") or OperatorSettings()
    # Blocking calls (enqueues, Redis reads, the sync client) of every admission and event write in flight.
    supervise.widen_thread_pool(cfg.admission_concurrency + cfg.events_concurrency + 8)
    if cfg.shard_selector:
        # Server-side: the API server sends this shard's watches only its own objects.
        for plural in (IMAGEJOB_PLURAL, MODELDEPLOYMENT_PLURAL, IMAGEWORKFLOW_PLURAL):
            settings.watching.label_selectors[GROUP, plural] = cfg.shard_selector
    # With --peering, a standby replica resumes the handlers this long after the active one stopped renewing.
    settings.peering.lifetime = cfg.peering_lifetime_seconds
    queue = JobQueue.from_url(
        cfg.redis_url,
        cfg.redis_credentials,
        result_ttl_seconds=cfg.job_retention_seconds,
        visibility_ms=int(cfg.events_reclaim_seconds * 1000),
    )
    kube_cfg = load_configuration()
    akube = AsyncKube(kube_cfg, max_connections=cfg.events_concurrency + cfg.admission_concurrency)
    rt = Runtime(
        settings=cfg,
        kube=Kube(ApiClient(kube_cfg)),
        queue=queue,
        akube=akube,
        recorder=Recorder(akube, normal=cfg.normal_events),
        namespaces=list(memo.get("namespaces") or []),
    )
    memo.runtime = rt
    memo.admitter = admitter = Admitter(rt)
    memo.edits_reported = OrderedDict()
    memo.workflows = book = workflows.WorkflowBook()
    if cfg.shard:
        log.info(
            "shard %s: namespaces %s, selector %r; events group %s, lease %s",
            cfg.shard,
            ", ".join(rt.namespaces) or "(all)",
            cfg.shard_selector,
            rt.events_group,
            rt.lease.key,
        )
    if not settings.peering.standalone:
        namespace = None if settings.peering.clusterwide else memo.get("peering_namespace")
        read = functools.partial(rt.kube.get_peering, namespace, settings.peering.name)
        rt.lease.gate = PeeringGate(read, settings.peering.priority)
        log.info(
            "the loops lead only while peering %s/%s lets this replica run",
            namespace or "(cluster)",
            settings.peering.name,
        )
    applier = events.EventApplier(rt)
    loops: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], float]]] = [
        ("worker-events", lambda: events.consume_once(rt, applier), lambda: 0.0),
        ("admission", admitter.once, lambda: 0.0),
        ("kube-events", rt.recorder.once, lambda: 0.0),
        ("housekeeping", imagejob.Housekeeping(rt).once, lambda: cfg.housekeeping_seconds),
        ("model-pools", lambda: pools.run_once(rt), lambda: cfg.pool_tick_seconds),
        ("resync", resync.Resync(rt, applier).once, lambda: 1.0),
        ("workflows", workflows.WorkflowLoop(rt, book).once, lambda: 0.0),
    ]
    rt.history = history.outbox_for(rt)
    if cfg.history_url:
        writer = history.HistoryLoop(rt)
        loops.append(("history", writer.once, writer.pause))
    gc = retention.ImageRetention(rt)
    if gc.enabled:
        loops.append(("image-retention", gc.once, gc.pause))
    for name, one_pass, interval in loops:
        task = supervise.run_async(rt.health, name, one_pass, interval, stall_seconds=cfg.loop_stall_seconds)
        rt.tasks.append(asyncio.create_task(task, name=name))


@kopf.on.probe(id="loops")
def loops_alive(memo: kopf.Memo, **_: Any) -> dict[str, dict[str, object]]:
    """The liveness probe (``--liveness``) fails while a background loop keeps failing or is stuck."""
    rt: Runtime | None = memo.get("runtime")
    if rt is None:
        return {}
    problems = rt.health.problems(time.monotonic())
    if problems:
        raise kopf.PermanentError("; ".join(problems))
    return rt.health.report(time.monotonic())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime | None = memo.get("runtime")
    for task in rt.tasks if rt else []:
        task.cancel()
    if rt is not None:
        await rt.akube.close()


def migrate(argv: list[str]) -> None:
    """``zimage-operator migrate``: bring the history store's schema to this release's (the operator also does
    it on start-up; this is for a pre-upgrade hook or a database the operator may not alter)."""
    p = argparse.ArgumentParser(prog="zimage-operator migrate", description=migrate.__doc__)
    p.add_argument("--revision", default="head", help="an Alembic revision (default: head)")
    args = p.parse_args(argv)
    cfg = OperatorSettings()
    if not cfg.history_url:
        p.error("ZIMAGE_HISTORY_URL is not set: no history store to migrate")
    from zimage_history import db

    logs.configure(logging.INFO)
    engine = db.connect(cfg.history_url, cfg.history_password or None)
    db.migrate(engine, args.revision)
    log.info("history store at revision %s", db.current_revision(engine))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:
        migrate(argv[1:])
        return
    p = argparse.ArgumentParser(prog="zimage-operator", description="Run the zimage kopf operator.")
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument("--standalone", action="store_true", help="no peering (the default without --peering)")
    p.add_argument(
        "--peering",
        default=None,
        help="kopf peering object for HA replicas (needs kopf's peering CRDs); without it: standalone",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority of this replica (default: random, so replicas of one Deployment differ: kopf pauses "
        "every replica that sees a peer of the same or a higher priority)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="this operator's shard (default: ZIMAGE_SHARD): its own events consumer group, Redis lease and "
        "peering object (--peering NAME becomes NAME-SHARD), so several operators split the namespaces "
        "(-n) or the labels (--selector) between them",
    )
    p.add_argument(
        "--selector",
        default=None,
        help="label selector of the ImageJobs and ModelDeployments this shard owns, e.g. zimage.dev/shard=a "
        "(default: ZIMAGE_SHARD_SELECTOR; needs a shard)",
    )
    p.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--metrics-port", type=int, default=8000, help="Prometheus /metrics port (0: off)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("shard", args.shard), ("shard_selector", args.selector)) if v is not None}
    try:
        cfg = OperatorSettings(**overrides)
        parse_selector(cfg.shard_selector)
    except (ValidationError, SelectorError) as e:
        p.error(str(e))
    if cfg.shard_selector and not cfg.shard:
        p.error("--selector needs --shard (or ZIMAGE_SHARD): a shard's events group and lease are named by it")
    if not args.namespace and not args.all_namespaces:
        args.namespace = ["default"]
    peering = peering_name(args.peering, cfg.shard) if args.peering and not args.standalone else None
    # The loops' leader follows the peering object of the first namespace named literally (kopf keeps one in
    # each namespace it serves; patterns it resolves itself).
    literal = [n for n in args.namespace if not any(c in n for c in "*?!,")]
    if peering and not args.all_namespaces and not literal:
        p.error("--peering with only namespace patterns: name one namespace literally too (its peering object)")
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # kopf logs every timer run at INFO: thousands of jobs would drown the log
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    priority = args.priority
    if priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1) if args.peering else 0
    if peering:
        log.info("peering %r with priority %d: the highest-priority live replica runs the handlers", peering, priority)
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace if not args.all_namespaces else [],
            standalone=not peering,
            peering_name=peering,
            priority=priority,
            liveness_endpoint=args.liveness,
            # Where the peering object lives when watching namespaces (kopf keeps one per namespace).
            memo=kopf.Memo(
                peering_namespace=(literal or [None])[0],
                settings=cfg,
                namespaces=[] if args.all_namespaces else args.namespace,
            ),
        )
    )


if __name__ == "__main__":
    main()
