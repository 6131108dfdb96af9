"""Two sharded operators on the test bed: split by namespace, and one namespace split by label.

Each shard holds its own Redis lease and reads the events stream through its own consumer group. Both shards'
jobs are admitted by their own operator; with one shard's operator killed after admission, the other's jobs
still finish, it reads the dead shard's jobs' events and leaves them alone (those jobs stay Queued), and the
dead shard, restarted, finishes its jobs from its own group. Each process's metrics count exactly its own
jobs: enqueued and finished.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, REPO, Kube, Processes, imagejobs, start_worker, wait_for
from zimage_queue import keys
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.kube
JOBS = 4  # per shard, before the kill; then 2 more each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counter(port: int, name: str, **labels: str) -> float:
    """A counter's value (summed over other labels) from one operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def model(name: str, **labels: str) -> str:
    return json.dumps(
        {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {"model": {"variant": "turbo", "source": "x/y"}, "scaling": {"minReplicas": 0, "maxReplicas": 1}},
        }
    )


def submit(kube: Kube, ns: str, names: list[str], model_name: str, labels: dict[str, str]) -> None:
    jobs = imagejobs(names, model=model_name)
    for item in jobs["items"]:
        item["metadata"]["labels"] = labels
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(jobs))


def phases(kube: Kube, ns: str, names: list[str]) -> dict[str, str]:
    items = json.loads(kube.kubectl("get", "ij", "-n", ns, "-o", "json").stdout)["items"]
    got = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") or "" for i in items}
    return {n: got.get(n, "") for n in names}


def all_in(kube: Kube, ns: str, names: list[str], phase: str) -> bool:
    return set(phases(kube, ns, names).values()) == {phase}


def read_all(r: redis.Redis, group: str, last: bytes) -> bool:
    """Whether the consumer group has read the stream up to ``last`` and acked all it read."""
    for g in r.xinfo_groups(keys.EVENTS_STREAM):
        if g["name"].decode() == group:
            return bool(g["last-delivered-id"] == last and g["pending"] == 0)
    raise AssertionError(f"no consumer group {group} on {keys.EVENTS_STREAM}")


@pytest.mark.parametrize("split", ["namespaces", "labels"])
def test_two_shards_each_finish_their_own_jobs_and_survive_the_other(crds: Kube, tmp_path: Path, split: str) -> None:
    kube, pid = crds, os.getpid()
    if split == "namespaces":  # shard a: one namespace, shard b: another; no selectors
        ns = {"a": f"zimage-shard-a-{pid}", "b": f"zimage-shard-b-{pid}"}
        flags = {s: ["-n", ns[s]] for s in "ab"}
    else:  # one namespace, split by label; both shards peer, each in its own peering object
        kube.kubectl("apply", "-f", str(REPO / "charts" / "zimage-operator" / "crds" / "kopf-peering.yaml"))
        kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
        ns = dict.fromkeys("ab", f"zimage-shard-l-{pid}")
        flags = {s: ["-n", ns[s], "--selector", f"zimage.dev/shard={s}", "--peering", "zimage"] for s in "ab"}
    for n in set(ns.values()):
        kube.kubectl("create", "namespace", n)
    if split == "labels":
        for s in "ab":  # what --peering zimage --shard s meets its replicas in
            peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": f"zimage-{s}"}}
            kube.kubectl("apply", "-n", ns[s], "-f", "-", input=json.dumps(peering))
    labels = {s: {"zimage.dev/shard": s} for s in "ab"}
    for s in "ab":
        kube.kubectl("apply", "-n", ns[s], "-f", "-", input=model(f"model-{s}", **labels[s]))
    ps = Processes(tmp_path)
    try:
        with RedisServer() as srv:
            r = redis.Redis.from_url(srv.url)
            env = {
                **kube.env,
                "ZIMAGE_REDIS_URL": srv.url,
                "ZIMAGE_MODEL_RECHECK_SECONDS": "1",
                "ZIMAGE_LEASE_SECONDS": "2",
                "ZIMAGE_PEERING_LIFETIME_SECONDS": "5",
            }
            ports = {s: free_port() for s in "ab"}

            def start(s: str) -> Any:
                argv = [str(BIN / "zimage-operator"), *flags[s], "--shard", s, "--metrics-port", str(ports[s])]
                if "--peering" not in argv:
                    argv.append("--standalone")
                return ps.start(f"operator-{s}", argv, {**env, "ZIMAGE_CONSUMER_NAME": f"op-{s}"})

            procs = {s: start(s) for s in "ab"}
            # Each shard leads its own loops: two leases, each held by its own shard's operator.
            for s in "ab":
                wait_for(lambda s=s: (r.get(keys.operator_lease(s)) or b"").startswith(f"op-{s}-".encode()), 30)
            assert not r.exists(keys.OPERATOR_LEASE)

            names = {s: [f"{s}-{i}" for i in range(JOBS)] for s in "ab"}
            for s in "ab":
                submit(kube, ns[s], names[s], f"model-{s}", labels[s])
            for s in "ab":  # admitted by their own shard (no worker yet)
                wait_for(lambda s=s: all_in(kube, ns[s], names[s], "Queued"), 30, what=f"shard {s} admits its jobs")

            def worker(s: str) -> Any:
                queue = keys.queue_name(ns[s], f"model-{s}")
                return start_worker(ps, srv.url, queue, tmp_path / "images", ZIMAGE_MODEL_SOURCE="noop")

            workers = {s: worker(s) for s in "ab"}
            for s in "ab":
                wait_for(lambda s=s: all_in(kube, ns[s], names[s], "Succeeded"), 40, what=f"shard {s} finishes")
            for s in "ab":  # each process wrote its own jobs' transitions, and no other job's
                assert counter(ports[s], "zimage_operator_jobs_enqueued") == JOBS
                wait_for(lambda s=s: counter(ports[s], "zimage_operator_jobs_finished", phase="Succeeded") == JOBS, 10)

            # Shard b admits more jobs while its pool has no worker, then its operator dies without a goodbye.
            workers["b"].terminate()
            workers["b"].wait(20)
            more = {s: [f"{s}-more-{i}" for i in range(2)] for s in "ab"}
            submit(kube, ns["b"], more["b"], "model-b", labels["b"])
            wait_for(lambda: all_in(kube, ns["b"], more["b"], "Queued"), 30, what="shard b admits")
            procs["b"].send_signal(signal.SIGKILL)
            procs["b"].wait(10)
            # Shard b's jobs run and report; shard a, alive, finishes its own new jobs meanwhile.
            workers["b"] = worker("b")
            submit(kube, ns["a"], more["a"], "model-a", labels["a"])
            uids = [
                json.loads(kube.kubectl("get", "ij", n, "-n", ns["b"], "-o", "json").stdout)["metadata"]["uid"]
                for n in more["b"]
            ]
            wait_for(lambda: all(r.hget(keys.job(u), keys.F_FINAL) for u in uids), 30, what="b's jobs run")
            wait_for(lambda: all_in(kube, ns["a"], more["a"], "Succeeded"), 40, what="shard a carries on alone")
            assert counter(ports["a"], "zimage_operator_jobs_finished", phase="Succeeded") == JOBS + 2
            # Shard a has read and acked every event, b's jobs' too, and applied none of them.
            last = r.xinfo_stream(keys.EVENTS_STREAM)["last-generated-id"]
            wait_for(lambda: read_all(r, keys.operator_group("a"), last), 20, what="shard a reads every event")
            assert all_in(kube, ns["b"], more["b"], "Queued"), phases(kube, ns["b"], more["b"])

            # Restarted, shard b applies its jobs' events from its own group, where they waited.
            ports["b"] = free_port()
            procs["b"] = start("b")
            wait_for(lambda: all_in(kube, ns["b"], more["b"], "Succeeded"), 40, what="shard b, restarted, finishes")
            wait_for(lambda: counter(ports["b"], "zimage_operator_jobs_finished", phase="Succeeded") == 2, 10)
            assert counter(ports["a"], "zimage_operator_jobs_finished", phase="Succeeded") == JOBS + 2
            assert {g["name"].decode() for g in r.xinfo_groups(keys.EVENTS_STREAM)} == {"operator-a", "operator-b"}
    finally:
        ps.stop_all()
        for n in set(ns.values()):
            kube.kubectl("delete", "namespace", n, "--wait=false", check=False)
