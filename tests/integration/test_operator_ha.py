"""Two operator replicas on one namespace, as the chart runs them: jobs are enqueued and finished once, one
replica holds the control-loop lease, and when it is killed the other takes over."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import redis

from conftest import REPO, Kube, entries_added, operator_stack, start_operator, start_worker, wait_for
from zimage_queue import keys

pytestmark = pytest.mark.kube
NS = f"zimage-ha-{os.getpid()}"
MODEL = "z-image-turbo"


def submit(kube: Kube, names: list[str]) -> None:
    docs = [
        {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ImageJob",
            "metadata": {"name": n},
            "spec": {"model": MODEL, "prompt": n, "width": 64, "height": 64, "steps": 2},
        }
        for n in names
    ]
    kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


def wait_succeeded(kube: Kube, names: list[str]) -> None:
    kube.kubectl(
        "wait", "-n", NS, "--for=condition=Succeeded", *[f"ij/{n}" for n in names], "--timeout=120s", timeout=130
    )


def test_two_replicas_share_the_work_and_fail_over(crds: Kube, tmp_path: Path) -> None:
    kube = crds
    with operator_stack(kube, tmp_path, NS, ZIMAGE_CONSUMER_NAME="replica-a", ZIMAGE_LEASE_SECONDS="2") as (ps, url):
        second = start_operator(ps, kube, url, NS, ZIMAGE_CONSUMER_NAME="replica-b", ZIMAGE_LEASE_SECONDS="2")
        first = ps.procs[0][1]
        r = redis.Redis.from_url(url)
        holder = wait_for(lambda: r.get(keys.OPERATOR_LEASE), what="a lease holder").decode()
        kube.kubectl("apply", "-n", NS, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
        start_worker(ps, url, keys.queue_name(NS, MODEL), tmp_path / "images")

        names = [f"job-{i}" for i in range(8)]
        submit(kube, names)
        wait_succeeded(kube, names)
        entries = entries_added(r, keys.streams(keys.queue_name(NS, MODEL)))
        assert entries == len(names)  # both replicas admitted each job; the queue kept one entry each
        for n in names:
            uid = json.loads(kube.kubectl("get", "ij", n, "-n", NS, "-o", "json").stdout)["metadata"]["uid"]
            assert r.hget(keys.job(uid), "attempts") == b"1"
        assert r.get(keys.OPERATOR_LEASE).decode() == holder  # type: ignore[union-attr]

        # Kill the lease holder without a goodbye; the other replica takes the loops over.
        victim = second if holder.startswith("replica-b-") else first
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        new = wait_for(lambda: (h := r.get(keys.OPERATOR_LEASE)) and h.decode() != holder and h, timeout=20).decode()
        assert new.rsplit("-", 1)[0] != holder.rsplit("-", 1)[0]  # the other replica, not a restart
        more = [f"after-{i}" for i in range(3)]
        submit(kube, more)
        wait_succeeded(kube, more)
