"""Fault scenarios on a real Kubernetes API (the test bed, or KUBECONFIG), a real operator process, real Redis
(AOF on) and workers standing in for pods. Each scenario breaks one thing on purpose while jobs run and
returns a row: submitted, succeeded, expected failures, lost, duplicated, stuck.

lost = jobs that finished, but neither succeeded (with their images stored) nor failed the way the scenario
expects; duplicated = jobs whose result was recorded more than once (more than one ``succeeded`` event, or
more than one stored image set); stuck = jobs still not finished when the scenario gives up waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import BIN, REPO, Kube, Processes, healthz, start_operator, start_worker, wait_for, worker_env
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue, keys
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
    stuck: int = 0  # not finished when the scenario stopped waiting
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

    def start_operator(self, *flags: str, **env: str) -> subprocess.Popen[bytes]:
        """conftest.start_operator; with ``flags`` (``--peering NAME``, ``--liveness URL``) the same process with
        these flags in place of ``--standalone``."""
        if not flags:
            self.operator = start_operator(self.ps, self.kube, self.url, self.ns, **env)
        else:
            env = {**self.kube.env, "ZIMAGE_REDIS_URL": self.url, "ZIMAGE_MODEL_RECHECK_SECONDS": "1", **env}
            argv = [str(BIN / "zimage-operator"), "-n", self.ns, "--metrics-port", "0", *flags]
            self.operator = self.ps.start("operator", argv, env)
        return self.operator

    def worker_process(self, **env: str) -> subprocess.Popen[bytes]:
        return start_worker(self.ps, self.url, self.queue, self.images, ZIMAGE_VISIBILITY_MS="3000", **env)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What one of this stack's processes has logged so far."""
        return next(log.read_text() for _, p, log in self.ps.procs if p is proc)

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

    def events(self) -> list[JobEvent]:
        """The events stream as the operator reads it (entries that do not parse left out: see poison_events)."""
        out = []
        for _id, fields in JobQueue.from_url(self.url).r.xrange(keys.EVENTS_STREAM):
            with suppress(ValueError):  # pydantic's ValidationError included
                out.append(JobEvent.model_validate_json(fields.get(keys.EVENT_FIELD.encode(), b"")))
        return out

    def count(self, fault: str, names: list[str], t0: float, expect_failed: set[str] = frozenset()) -> Row:  # type: ignore[assignment]
        jobs = self.wait_terminal(names, 180)
        succeeded_events: Counter[str] = Counter()
        started: Counter[str] = Counter()
        for ev in self.events():
            if ev.type == "succeeded":
                succeeded_events[ev.uid] += 1
            elif ev.type == "started":
                started[ev.uid] += 1
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
            elif phase not in TERMINAL:
                row.stuck += 1
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
def stack(kube: Kube, tmp: Path, name: str, operator: bool = True, **operator_env: str) -> Iterator[Stack]:
    """A namespace with the ModelDeployment, a private Redis (AOF) and (unless ``operator=False``) the operator."""
    ns = f"fault-{name}-{random.randrange(10**6)}"
    kube.kubectl("create", "namespace", ns)
    srv = RedisServer(port=free_port(), appendonly=True, data_dir=str(tmp / "redis"))
    (tmp / "redis").mkdir(parents=True, exist_ok=True)
    srv.start()
    st = Stack(kube, ns, tmp, srv, Processes(tmp))
    try:
        kube.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
        if operator:
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


def redis_down(kube: Kube, tmp: Path, jobs: int, seconds: float = 60.0) -> Row:
    """Redis stopped for ``seconds`` (AOF on) with jobs in flight and more submitted meanwhile: the operator's
    and the workers' loops back off in the same processes, and the jobs converge once Redis is back."""
    ports = [free_port() for _ in range(3)]
    with stack(kube, tmp, "redis-down", operator=False) as st:
        procs = [
            st.start_operator("--standalone", f"--liveness=http://127.0.0.1:{ports[0]}/healthz"),
            *[st.worker_process(ZIMAGE_HTTP_PORT=str(port)) for port in ports[1:]],
        ]
        wait_for(lambda: all(healthz(p) == 200 for p in ports), 90, interval=0.5, what="operator and workers live")
        q = JobQueue.from_url(st.url)
        wait_for(lambda: len(q.workers(st.queue)) == 2, 90, interval=0.5, what="both workers serving")
        names = [f"rd-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names[: jobs // 2])
        st.wait_finished(2)
        before = len(finished(st.jobs(), names))
        st.redis_srv.stop()
        st.submit(names[jobs // 2 :])  # accepted by the API server; the operator cannot enqueue them yet
        red: set[int] = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # the outage itself (a legit wait); meanwhile, does liveness tell?
            red |= {p for p in ports if healthz(p) >= 500}  # kopf answers 500, the worker 503
            time.sleep(1.0)
        st.redis_srv.start()
        row = st.count(f"Redis down {seconds:g}s (AOF)", names, t0)
        green = True
        try:
            wait_for(lambda: all(healthz(p) == 200 for p in ports), 90, interval=1.0, what="live again")
        except AssertionError:
            green = False
        alive = sum(p.poll() is None for p in procs)
        op_log, worker_logs = st.log(procs[0]), [st.log(p) for p in procs[1:]]
        backoff = op_log.count("next try in"), sum(w.count("Redis unavailable") for w in worker_logs)
        row.note = (
            f"{before} finished before the outage; {alive}/3 processes alive, never restarted; liveness red during "
            f"the outage {len(red)}/3, green after: {green}; backoff lines: operator {backoff[0]}, workers "
            f"{backoff[1]}"
        )
        return row


def poison_events(kube: Kube, tmp: Path, jobs: int) -> Row:
    """Malformed entries on the events stream and a job stream, and entries with a field from a newer release,
    injected while jobs run: the malformed ones are dead-lettered, the newer ones read as usual, nothing stalls."""
    with stack(kube, tmp, "poison-events") as st:
        st.worker_process()
        names = [f"pe-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names[: jobs // 2])
        st.wait_finished(2)
        q = JobQueue.from_url(st.url)
        job_stream = keys.stream(st.queue, "normal")
        malformed = [
            (keys.EVENTS_STREAM, {keys.EVENT_FIELD: "{broken"}),
            (keys.EVENTS_STREAM, {keys.EVENT_FIELD: json.dumps({"type": "started", "uid": 7})}),
            (keys.EVENTS_STREAM, {"something": "else"}),
            (job_stream, {keys.MESSAGE_FIELD: "not a job"}),
            (job_stream, {keys.MESSAGE_FIELD: json.dumps({"uid": "x", "params": {}})}),
        ]
        # From a newer release (a field this one does not know): a job no ImageJob stands for, and an event.
        ghost = JobMessage(
            uid=f"newer-{st.ns}", namespace=st.ns, name="newer-release", queue=st.queue,
            params=GenerationParams(prompt="newer", width=64, height=64, steps=2, seed=1),
        )  # fmt: skip
        newer_job = {**json.loads(ghost.model_dump_json(by_alias=True)), "fromNewerRelease": {"x": 1}}
        newer_job["params"]["styleOfTheFuture"] = "x"
        newer_event = {"type": "started", "uid": "no-such-job", "namespace": st.ns, "name": "gone", "future": 1}
        for stream_key, fields in [
            *malformed,
            (job_stream, {keys.MESSAGE_FIELD: json.dumps(newer_job)}),
            (keys.EVENTS_STREAM, {keys.EVENT_FIELD: json.dumps(newer_event)}),
        ]:
            q.r.xadd(stream_key, fields)
        st.submit(names[jobs // 2 :])
        row = st.count("poison on the events and a job stream", names, t0)
        wait_for(lambda: q.state(ghost.uid) == "succeeded", 30, what="the newer release's job to run")
        poisoned = q.poisoned()
        by_source = Counter("events" if p.source == keys.EVENTS_STREAM else "job" for p in poisoned)
        newer_poisoned = sum("future" in p.raw or "fromNewerRelease" in p.raw for p in poisoned)
        row.note = (
            f"dead-lettered: {len(poisoned)} ({by_source['events']} events, {by_source['job']} job) of "
            f"{len(malformed)} malformed; newer-release entries dead-lettered: {newer_poisoned}, its job "
            f"{q.state(ghost.uid)}"
        )
        if len(poisoned) != len(malformed) or newer_poisoned:
            row.lost += 1  # an entry lost to the dead-letter stream, or poison that was read as a job
        return row


OLD_RELEASE = "e4dda8a"  # the previous release (tests/fixtures/wire/release-0.1.0.json holds its wire shapes)


def old_release(tmp: Path) -> dict[str, str]:
    """The previous release's operator/ and worker_image/ trees in ``tmp``; the environment that makes
    ``python -m zimage_worker`` import them instead of the installed (current) packages."""
    tmp.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_RELEASE, "operator", "worker_image"], capture_output=True, check=True
    ).stdout
    tar = tmp / "old.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
    return {"PYTHONPATH": os.pathsep.join([str(tmp / "operator"), str(tmp / "worker_image")])}


def imported_from(env: dict[str, str]) -> set[Path]:
    """Where the worker's entry point imports each zimage package module from, under ``env``."""
    probe = (
        "import json, sys, zimage_worker.__main__\n"
        "print(json.dumps([m.__file__ for n, m in sys.modules.items() if n.startswith('zimage_') and m.__file__]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return {Path(f) for f in json.loads(out.stdout)}


def rolling_upgrade(kube: Kube, tmp: Path, jobs: int) -> Row:
    """The previous release's worker serving the queue, then next to a current one, then drained, under the
    current operator, with jobs submitted throughout."""
    with stack(kube, tmp, "rolling-upgrade") as st:
        old_env = old_release(tmp / "old")
        files = imported_from(old_env)
        old_files = sum(f.is_relative_to(tmp / "old") for f in files)
        assert old_files == len(files) and not any(f.name == "supervise.py" for f in files), files
        names = [f"ru-{i}" for i in range(jobs)]
        thirds = [names[: jobs // 3], names[jobs // 3 : 2 * jobs // 3], names[2 * jobs // 3 :]]
        old = st.ps.start(
            "old-worker",
            [sys.executable, "-m", "zimage_worker"],
            worker_env(st.url, st.queue, st.images, ZIMAGE_VISIBILITY_MS="3000", ZIMAGE_WORKER_NAME="old-0", **old_env),
        )
        t0 = time.monotonic()
        st.submit(thirds[0])  # the old worker alone
        st.wait_finished(2)
        st.worker_process(ZIMAGE_WORKER_NAME="new-0")
        st.submit(thirds[1])  # both
        st.wait_finished(len(thirds[0]) + 2)
        old.send_signal(signal.SIGTERM)  # drained: finishes the job in hand and goes
        st.submit(thirds[2])  # the current worker alone
        row = st.count(f"rolling upgrade: {OLD_RELEASE} worker next to current", names, t0)
        old.wait(30)
        ran_by: Counter[str] = Counter()
        for ev in st.events():
            if ev.type == "succeeded" and ev.name in names:
                ran_by[ev.worker] += 1
        q = JobQueue.from_url(st.url)
        with suppress(AssertionError):  # the old worker acks without deleting; housekeeping trims those entries
            wait_for(lambda: sum(q.r.xlen(s) for s in keys.streams(st.queue)) == 0, 30, 0.5, "job streams trimmed")
        left = sum(q.r.xlen(s) for s in keys.streams(st.queue))
        row.note = (
            f"old worker imported {old_files} modules from the {OLD_RELEASE} tree; succeeded by old {ran_by['old-0']}, "
            f"new {ran_by['new-0']}; old exited {old.returncode}; entries left in job streams: {left}"
        )
        return row


PEERING_CRD = REPO / "charts" / "zimage-operator" / "crds" / "kopf-peering.yaml"


def peering_status(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """The live replicas kopf lists in the KopfPeering object (identity -> priority, lifetime, lastseen)."""
    out = kube.kubectl("get", "kopfpeering", name, "-n", ns, "-o", "json", check=False)
    return dict(json.loads(out.stdout).get("status") or {}) if out.returncode == 0 else {}


def completed_events(kube: Kube, ns: str) -> Counter[str]:
    """Kubernetes Events with reason Completed per ImageJob name."""
    items = json.loads(kube.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return Counter(
        e["involvedObject"]["name"]
        for e in items
        if e.get("reason") == "Completed" and e["involvedObject"].get("kind") == "ImageJob"
    )


def leader_failover(kube: Kube, tmp: Path, jobs: int) -> Row:
    """Two operator replicas with kopf peering and the Redis lease, jobs under load; SIGKILL the active one
    (handlers and loops) midway: the other takes over."""
    kube.kubectl("apply", "-f", str(PEERING_CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    peering = "zimage-operator"
    with stack(kube, tmp, "leader-failover", operator=False) as st:
        peer = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}}
        kube.kubectl("apply", "-n", st.ns, "-f", "-", input=json.dumps(peer))
        r = JobQueue.from_url(st.url).r

        def lease_holder() -> str:
            """The replica (its ZIMAGE_CONSUMER_NAME) holding the loops' lease, whose value is "<consumer>-<pid>"."""
            value = r.get(keys.OPERATOR_LEASE)
            return str(value.decode().rsplit("-", 1)[0]) if value else ""

        def replica(name: str, priority: int) -> subprocess.Popen[bytes]:
            # Events the killed replica read but never acked move to the survivor after 3 s (default 30 s).
            env = {
                "ZIMAGE_CONSUMER_NAME": name,
                "POD_ID": name,
                "ZIMAGE_LEASE_SECONDS": "2",
                "ZIMAGE_EVENTS_RECLAIM_SECONDS": "3",
                "ZIMAGE_NORMAL_EVENTS": "true",  # the row counts Completed Events: exactly one per job
            }
            proc = st.start_operator(
                "--peering", peering, "--priority", str(priority), ZIMAGE_PEERING_LIFETIME_SECONDS="5", **env
            )
            wait_for(lambda: name in peering_status(kube, st.ns, peering), 60, 0.5, f"{name} in the peering")
            return proc

        # The first replica gets the higher priority and is the first to take the lease: it runs the handlers and
        # the loops, so killing it fails both over. (The chart gives each replica a random priority.)
        replicas = {"replica-a": replica("replica-a", 2)}
        wait_for(lease_holder, 30, what="replica-a to take the lease")
        replicas["replica-b"] = replica("replica-b", 1)
        victim = lease_holder()
        active = max(peering_status(kube, st.ns, peering).items(), key=lambda kv: kv[1].get("priority", 0))[0]
        st.worker_process()
        names = [f"lf-{i}" for i in range(jobs)]
        t0 = time.monotonic()
        st.submit(names[: jobs // 2])
        st.wait_finished(jobs // 4)
        replicas[victim].send_signal(signal.SIGKILL)
        replicas[victim].wait()
        killed_at = time.monotonic()
        st.submit(names[jobs // 2 :])  # while nobody runs the handlers yet
        heir = wait_for(lambda: (h := lease_holder()) not in ("", victim) and h, 60, what="another lease holder")
        took_over = time.monotonic() - killed_at
        row = st.count("operator leader SIGKILL (two replicas, peering)", names, t0)
        with contextlib.suppress(AssertionError):  # a job still without its Event is counted as "none" below
            # A job the victim finished just before dying gets its Event from the survivor once it reclaims
            # the events the victim had read but not acked.
            wait_for(lambda: all(completed_events(kube, st.ns)[n] for n in names), 60, 1.0, "every Completed Event")
        events = completed_events(kube, st.ns)
        once = sum(events[n] == 1 for n in names)
        row.duplicated += sum(events[n] > 1 for n in names)
        row.note = (
            f"killed {victim} (lease holder; peering active: {active}); {heir} took the "
            f"lease after {took_over:.1f}s; Completed Events: {once}/{len(names)} jobs exactly one, "
            f"{sum(events[n] == 0 for n in names)} none, {sum(events[n] > 1 for n in names)} more"
        )
        return row


SCENARIOS: dict[str, Callable[..., Row]] = {
    "worker-sigkill": worker_sigkill,
    "operator-sigkill": operator_sigkill,
    "redis-restart": redis_restart,
    "kube-api-outage": kube_api_outage,
    "oom": worker_oom,
    "poison": poison_job,
    "redis-down": redis_down,
    "poison-events": poison_events,
    "rolling-upgrade": rolling_upgrade,
    "leader-failover": leader_failover,
}
