"""Fault scenarios on a real Kubernetes API (the test bed, or KUBECONFIG), a real operator process, real Redis
(AOF on) and workers standing in for pods. Each scenario breaks one thing on purpose while jobs run and
returns a row: submitted, succeeded, expected failures, lost, duplicated.

lost = jobs that neither succeeded nor failed the way the scenario expects; duplicated = jobs whose result
was recorded more than once (more than one ``succeeded`` event, or more than one stored image set).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from conftest import REPO, Kube, Processes, start_operator, start_worker, wait_for
from zimage_queue import GenerationParams, JobQueue, keys
from zimage_queue.server import RedisServer, free_port
from zimage_worker.engine import Engine, NoopEngine
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore, job_prefix

MODEL = "z-image-turbo"
TERMINAL = {"Succeeded", "Failed", "Cancelled"}


def finished(jobs: dict[str, dict[str, Any]], names: list[str] | None = None) -> list[str]:
    """The names (of ``names``, default all) whose job reached a terminal phase."""
    return [
        n
        for n in (jobs if names is None else names)
        if ((jobs.get(n) or {}).get("status") or {}).get("phase") in TERMINAL
    ]


@dataclass
class Row:
    fault: str
    submitted: int = 0
    succeeded: int = 0
    expected_failed: int = 0
    lost: int = 0
    duplicated: int = 0
    reruns: int = 0  # jobs that ran more than once (at-least-once delivery at work)
    seconds: float = 0.0
    note: str = ""


@dataclass
class Stack:
    kube: Kube
    ns: str
    tmp: Path
    redis_srv: RedisServer
    ps: Processes
    operator: subprocess.Popen[bytes] | None = None
    threads: list[tuple[Worker, threading.Thread]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.redis_srv.url

    @property
    def queue(self) -> str:
        return keys.queue_name(self.ns, MODEL)

    @property
    def images(self) -> Path:
        return self.tmp / "images"

    def start_operator(self, **env: str) -> None:
        self.operator = start_operator(self.ps, self.kube, self.url, self.ns, **env)

    def worker_process(self) -> subprocess.Popen[bytes]:
        return start_worker(self.ps, self.url, self.queue, self.images, ZIMAGE_VISIBILITY_MS="3000")

    def worker_thread(self, engine: Engine, name: str) -> None:
        w = Worker(JobQueue.from_url(self.url, visibility_ms=3000), engine, LocalStore(self.images), self.queue, name)
        t = threading.Thread(target=w.run, kwargs={"block_ms": 200}, daemon=True)
        t.start()
        self.threads.append((w, t))

    def submit(self, names: list[str], **spec: Any) -> None:
        items = [
            {
                "apiVersion": "zimage.dev/v1alpha1",
                "kind": "ImageJob",
                "metadata": {"name": n},
                "spec": {"model": MODEL, "prompt": n, "width": 64, "height": 64, "steps": 2, **spec},
            }
            for n in names
        ]
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.kube.kubectl("apply", "-n", self.ns, "-f", "-", input=doc, timeout=120)

    def jobs(self) -> dict[str, dict[str, Any]]:
        out = self.kube.kubectl("get", "ij", "-n", self.ns, "-o", "json", timeout=60, check=False)
        if out.returncode != 0:  # the API server may be the thing that is down
            return {}
        return {j["metadata"]["name"]: j for j in json.loads(out.stdout)["items"]}

    def wait_terminal(self, names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        jobs: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            jobs = self.jobs() or jobs
            if len(finished(jobs, names)) == len(names):
                break
            time.sleep(0.5)
        return jobs

    def wait_finished(self, count: int) -> None:
        """Until ``count`` jobs have finished: the moment to break something mid-flight."""
        wait_for(lambda: len(finished(self.jobs())) >= count, 120, what=f"{count} finished jobs")

    def count(self, fault: str, names: list[str], t0: float, expect_failed: set[str] = frozenset()) -> Row:  # type: ignore[assignment]
        jobs = self.wait_terminal(names, 180)
        r = redis.Redis.from_url(self.url)
        succeeded_events: Counter[str] = Counter()
        started: Counter[str] = Counter()
        for _id, fields in r.xrange(keys.EVENTS_STREAM):
            ev = json.loads(fields[b"event"])
            if ev["type"] == "succeeded":
                succeeded_events[ev["uid"]] += 1
            elif ev["type"] == "started":
                started[ev["uid"]] += 1
        row = Row(fault, submitted=len(names), seconds=round(time.monotonic() - t0, 1))
        for n in names:
            job = jobs.get(n) or {}
            phase = (job.get("status") or {}).get("phase")
            uid = (job.get("metadata") or {}).get("uid", "")
            stored = list((self.images / job_prefix(self.ns, self.ns, n)).glob("*/*"))
            if n in expect_failed and phase == "Failed":
                row.expected_failed += 1
            elif n not in expect_failed and phase == "Succeeded" and stored:  # a result that was never stored is lost
                row.succeeded += 1
            else:
                row.lost += 1
            if succeeded_events[uid] > 1 or len({p.parent for p in stored}) > 1:
                row.duplicated += 1
            if started[uid] > 1:
                row.reruns += 1
        return row

    def stop(self) -> None:
        for w, _ in self.threads:
            w.request_stop()
        for _, t in self.threads:
            t.join(10)
        self.ps.stop_all()


@contextmanager
def stack(kube: Kube, tmp: Path, name: str, **operator_env: str) -> Iterator[Stack]:
    ns = f"fault-{name}-{random.randrange(10**6)}"
    kube.kubectl("create", "namespace", ns)
    srv = RedisServer(port=free_port(), appendonly=True, data_dir=str(tmp / "redis"))
    (tmp / "redis").mkdir(parents=True, exist_ok=True)
    srv.start()
    st = Stack(kube, ns, tmp, srv, Processes(tmp))
    try:
        kube.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
        st.start_operator(**operator_env)
        yield st
    except BaseException:
        print(st.ps.logs())
        raise
    finally:
        st.stop()
        srv.close()
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# -- scenarios -------------------------------------------------------------------------------------------
def worker_sigkill(kube: Kube, tmp: Path, jobs: int, every: float = 2.0, workers: int = 3) -> Row:
    """SIGKILL a random worker every few seconds (and start a new one) while the jobs run."""
    with stack(kube, tmp, "worker-kill") as st:
        procs = [st.worker_process() for _ in range(workers)]
        names = [f"chaos-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names)
        kills = 0
        while time.monotonic() - t0 < 170:
            if len(finished(st.jobs(), names)) == len(names):
                break
            time.sleep(every)
            victim = random.randrange(len(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills += 1
            procs[victim] = st.worker_process()
        row = st.count(f"worker SIGKILL every {every:g}s", names, t0)
        row.note = f"{kills} workers killed"
        return row


def operator_sigkill(kube: Kube, tmp: Path, jobs: int) -> Row:
    """kill -9 the operator mid-flight and start it again."""
    with stack(kube, tmp, "operator-kill") as st:
        st.worker_process()
        names = [f"op-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names)
        st.wait_finished(jobs // 4)
        assert st.operator is not None
        st.operator.send_signal(signal.SIGKILL)
        st.operator.wait()
        st.start_operator()
        row = st.count("operator kill -9 + restart", names, t0)
        children = st.kube.kubectl("get", "deploy,svc,pdb", "-n", st.ns, "-o", "name").stdout.split()
        row.note = f"{len(children)} child objects (3 expected)"
        if len(children) != 3:
            row.duplicated += len(children) - 3
        return row


def redis_restart(kube: Kube, tmp: Path, jobs: int) -> Row:
    """Restart Redis (AOF on) while jobs are queued and running."""
    with stack(kube, tmp, "redis-restart") as st:
        st.worker_process()
        names = [f"rr-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names)
        st.wait_finished(jobs // 4)
        st.redis_srv.stop()
        st.redis_srv.start()
        return st.count("Redis restart (AOF)", names, t0)


def kube_api_outage(kube: Kube, tmp: Path, jobs: int, seconds: float = 10.0) -> Row:
    """The Kubernetes API unreachable from the operator for ``seconds`` while jobs run and more arrive."""
    from urllib.parse import urlparse

    import yaml

    from e2e.proxy import CuttableProxy

    config = yaml.safe_load(Path(kube.env["KUBECONFIG"]).read_text())
    server = urlparse(config["clusters"][0]["cluster"]["server"])
    proxy = CuttableProxy(server.hostname or "127.0.0.1", server.port or 443)
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    via_proxy = tmp / "via-proxy.kubeconfig"
    via_proxy.parent.mkdir(parents=True, exist_ok=True)
    via_proxy.write_text(yaml.safe_dump(config))
    try:
        with stack(kube, tmp, "kube-outage", KUBECONFIG=str(via_proxy)) as st:
            st.worker_process()
            names = [f"ko-{i}" for i in range(jobs)]
            t0 = time.monotonic()
            st.submit(names[: jobs // 2])
            st.wait_finished(2)
            proxy.cut()
            st.submit(names[jobs // 2 :])  # kubectl goes straight to the API server: only the operator is cut off
            time.sleep(seconds)  # the outage itself: there is no event to wait for
            proxy.restore()
            probe = subprocess.run(
                ["kubectl", "--kubeconfig", str(via_proxy), "get", "ij", "-n", st.ns, "-o", "name"],
                env=kube.env, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            row = st.count(f"Kubernetes API unreachable {seconds:g}s", names, t0)
            row.note = f"API through the proxy after the outage: {'ok' if probe.returncode == 0 else probe.stderr[:80]}"
            return row
    finally:
        proxy.close()


class FlakyEngine:
    """The first attempt of jobs whose prompt starts with ``oom`` dies of an out-of-memory error;
    jobs whose prompt starts with ``poison`` crash every time."""

    name = "flaky"
    variant = "turbo"

    def __init__(self) -> None:
        self.inner = NoopEngine()
        self.seen: set[str] = set()

    def generate(self, params: GenerationParams, **kw: Any) -> Any:
        if params.prompt.startswith("poison"):
            raise RuntimeError("pipeline crashed (poison input)")
        if params.prompt.startswith("oom") and params.prompt not in self.seen:
            self.seen.add(params.prompt)
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.generate(params, **kw)


def worker_oom(kube: Kube, tmp: Path, jobs: int) -> Row:
    with stack(kube, tmp, "oom") as st:
        st.worker_thread(FlakyEngine(), "flaky-0")
        names = [f"oom-{i}" if i % 2 == 0 else f"ok-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names)
        row = st.count("out-of-memory on first attempt", names, t0)
        retried = [
            j for n, j in st.jobs().items() if n.startswith("oom") and (j.get("status") or {}).get("attempts") == 2
        ]
        row.note = f"{len(retried)} retried after OutOfMemory; worker alive: {st.threads[0][1].is_alive()}"
        return row


def poison_job(kube: Kube, tmp: Path, jobs: int) -> Row:
    with stack(kube, tmp, "poison") as st:
        st.worker_thread(FlakyEngine(), "flaky-0")
        names = ["poison-0", *[f"ok-{i}" for i in range(jobs - 1)]]
        t0 = time.monotonic()
        st.submit(names[:1], maxRetries=2)
        st.submit(names[1:])
        row = st.count("job crashing every time", names, t0, expect_failed={"poison-0"})
        dead = JobQueue.from_url(st.url).dead_letters()
        msg = (st.jobs()["poison-0"].get("status") or {}).get("message", "")
        row.note = f"dead-lettered: {len(dead)}; status: {msg[:60]}"
        return row


SCENARIOS: dict[str, Callable[..., Row]] = {
    "worker-sigkill": worker_sigkill,
    "operator-sigkill": operator_sigkill,
    "redis-restart": redis_restart,
    "kube-api-outage": kube_api_outage,
    "oom": worker_oom,
    "poison": poison_job,
}
