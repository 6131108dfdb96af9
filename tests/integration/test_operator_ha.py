"""Two operator replicas on one namespace, as the chart runs them: jobs are enqueued and finished once, one
replica holds the control-loop lease, and when it is killed the other takes over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import (
    BIN,
    REPO,
    Kube,
    Processes,
    entries_added,
    operator_stack,
    start_operator,
    start_worker,
    submit_jobs,
    wait_for,
)
from zimage_queue import keys
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.kube
NS = f"zimage-ha-{os.getpid()}"
MODEL = "z-image-turbo"


def submit(kube: Kube, names: list[str]) -> None:
    submit_jobs(kube, NS, names)


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


PHASE_RANK = {"": 0, "Pending": 0, "Queued": 1, "Running": 2, "Succeeded": 3, "Failed": 3, "Cancelled": 3}


class StatusLog:
    """Every status the API server shows for the namespace's ImageJobs, in resourceVersion order (a watch)."""

    def __init__(self, kube: Kube, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["kubectl", "get", "ij", "-n", ns, "--watch", "--output-watch-events", "-o", "json"],
            env=kube.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout
        decoder, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buf += line
            try:
                doc, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                continue
            buf = buf.lstrip()[end:]
            obj = doc["object"]
            self.seen.setdefault(obj["metadata"]["name"], []).append(obj.get("status") or {})

    def finished(self) -> int:
        """Jobs whose last status seen is terminal."""
        return sum(
            1 for h in list(self.seen.values()) if h and h[-1].get("phase") in ("Succeeded", "Failed", "Cancelled")
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_peered_replicas_one_killed_midway_conditions_only_move_forward(crds: Kube, tmp_path: Path) -> None:
    """Two replicas with kopf peering (as the chart runs them), 300 jobs, the active one SIGKILLed midway."""
    kube, ns, count = crds, f"zimage-peer-{os.getpid()}", 300
    kube.kubectl("apply", "-f", str(REPO / "charts" / "zimage-operator" / "crds" / "kopf-peering.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    kube.kubectl("create", "namespace", ns)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "zimage", "namespace": ns}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(peering))
    ps = Processes(tmp_path)
    log = StatusLog(kube, ns)
    try:
        with RedisServer() as srv:
            env = {
                **kube.env,
                "ZIMAGE_REDIS_URL": srv.url,
                "ZIMAGE_LEASE_SECONDS": "2",
                "ZIMAGE_PEERING_LIFETIME_SECONDS": "5",
                "ZIMAGE_RESYNC_FIRST_SECONDS": "1",
                "ZIMAGE_EVENTS_RECLAIM_SECONDS": "3",
                "ZIMAGE_NORMAL_EVENTS": "true",  # Completed Events are counted: exactly one per job
            }
            argv = [str(BIN / "zimage-operator"), "--peering", "zimage", "-n", ns, "--metrics-port", "0"]
            r = redis.Redis.from_url(srv.url)
            # The lower priority starts first and takes the lease; once the higher one is up, kopf pauses the
            # first one's handlers and the lease follows: the loops run where the handlers run.
            ps.start("operator", [*argv, "--priority", "100"], {**env, "ZIMAGE_CONSUMER_NAME": "standby"})
            wait_for(lambda: (r.get(keys.OPERATOR_LEASE) or b"").startswith(b"standby-"), 30, what="first leads")
            active = ps.start("operator", [*argv, "--priority", "200"], {**env, "ZIMAGE_CONSUMER_NAME": "active"})
            wait_for(lambda: (r.get(keys.OPERATOR_LEASE) or b"").startswith(b"active-"), 30, what="the lease moves")
            kube.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
            for i in range(2):
                start_worker(
                    ps,
                    srv.url,
                    keys.queue_name(ns, MODEL),
                    tmp_path / "images",
                    ZIMAGE_MODEL_SOURCE="noop",
                    ZIMAGE_WORKER_NAME=f"w{i}",
                )
            names = [f"job-{i}" for i in range(count)]
            half = count // 2
            submit_jobs(kube, ns, names[:half])
            wait_for(lambda: done(kube, ns) >= half // 3, 120, what="some jobs done")
            active.send_signal(signal.SIGKILL)  # mid-run, without a goodbye
            active.wait(10)
            submit_jobs(kube, ns, names[half:])
            wait_for(lambda: (r.get(keys.OPERATOR_LEASE) or b"").startswith(b"standby-"), 30, what="takeover")
            wait_for(lambda: done(kube, ns) == count, 240, interval=1.0, what="every job finished")
            # A job the killed replica finished just before dying gets its Event from the survivor, which
            # reclaims the events the dead one had read but not acked.
            wait_for(lambda: len(completed_events(kube, ns)) == count, 60, interval=1.0, what="every Event")
            # The log's watch reads behind the API server: let it see every job's last status before it stops.
            wait_for(lambda: log.finished() == count, 60, interval=0.5, what="the watch to see every job finish")
        final_events = completed_events(kube, ns)
    finally:
        log.stop()
        ps.stop_all()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    phases = {n: (h[-1].get("phase") or "") for n, h in log.seen.items()}
    assert set(phases.values()) == {"Succeeded"} and len(phases) == count, (Counter(phases.values()), len(phases))
    for name, history in log.seen.items():
        ranks = [PHASE_RANK[s.get("phase") or ""] for s in history]
        assert ranks == sorted(ranks), f"{name} moved backwards: {[s.get('phase') for s in history]}"
        final = [s for s in history if s.get("phase") == "Succeeded"]
        assert all(s.get("results") == final[0].get("results") for s in final), f"{name}: results rewritten"
    assert final_events == Counter(dict.fromkeys(names, 1)), {n: c for n, c in final_events.items() if c != 1}


def done(kube: Kube, ns: str) -> int:
    out = kube.kubectl("get", "ij", "-n", ns, "-o", "jsonpath={.items[*].status.phase}").stdout.split()
    return sum(p in ("Succeeded", "Failed", "Cancelled") for p in out)


def completed_events(kube: Kube, ns: str) -> Counter[str]:
    events = json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return Counter(e["involvedObject"]["name"] for e in events if e.get("reason") == "Completed")
