"""Shared fixtures: a real redis-server, a real Kubernetes control plane, the operator and workers as processes.

Kubernetes: ``KUBECONFIG`` when set (kind, k3d, a real cluster), else ``../shared/testbed/kube-testbed``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from zimage_queue import JobQueue, logs
from zimage_queue.server import RedisServer

REPO = Path(__file__).resolve().parent
TESTBED = REPO.parent / "shared" / "testbed" / "kube-testbed"
BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until predicate() is truthy (for state that has no event to await, e.g. on the API server)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """The records of a log in zimage_queue.logs' format; fails on anything that is not one JSON object per
    line, on a raw control character and on non-ASCII (so unescaped) text."""
    assert text.isascii(), "non-ASCII (and so unescaped) bytes in the log"
    assert not any(c in text for c in "\r\x1b\x00\x07\x85"), "a raw control character in the log"
    out = []
    for line in text.splitlines():
        rec = json.loads(line)  # fails on any line that is not one whole JSON object
        assert {"ts", "level", "logger", "msg"} <= set(rec), line
        out.append(rec)
    return out


def imagejobs(names: list[str], model: str = "z-image-turbo", **spec: Any) -> dict[str, Any]:
    """A List of tiny ImageJobs (64x64, 2 steps unless ``spec`` says otherwise), one per name."""
    items = [
        {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ImageJob",
            "metadata": {"name": n},
            "spec": {"model": model, "prompt": n, "width": 64, "height": 64, "steps": 2, **spec},
        }
        for n in names
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def submit_jobs(kube: Kube, namespace: str, names: list[str], batch: int = 50, **spec: Any) -> None:
    for i in range(0, len(names), batch):
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(imagejobs(names[i : i + batch], **spec)))


def healthz(port: int) -> int:
    """The status a process's /healthz answers with on loopback (0: nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def entries_added(r: redis.Redis, streams: list[str]) -> int:
    """How many entries were ever added to these streams (acked job entries are deleted, so XLEN no longer
    counts enqueues)."""
    total = 0
    for s in streams:
        if r.exists(s):
            total += int(r.xinfo_stream(s)["entries-added"])
    return total


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Logging as the entry points configure it (``zimage_queue.logs.configure``), into a buffer."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(stream=out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def queue(redis_url: str) -> JobQueue:
    return JobQueue.from_url(redis_url, visibility_ms=500)


# -- PostgreSQL (the history store) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    from zimage_history.server import PostgresServer

    with PostgresServer() as srv:
        yield srv


@pytest.fixture
def history_url(postgres_server: Any) -> str:
    """A fresh, empty database on the session's server (no schema yet: the code under test migrates)."""
    import secrets

    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.url.rsplit("/", 1)[0] + "/" + name


# -- Kubernetes --------------------------------------------------------------------------------------------
class Kube:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", *args], env=self.env, capture_output=True, text=True, input=input, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def apply(self, ns: str, *objs: dict[str, Any]) -> None:
        """``kubectl apply`` these objects in ``ns``, as one List."""
        items = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)})
        self.kubectl("apply", "-n", ns, "-f", "-", input=items)


@contextmanager
def kube_cluster(state: Path) -> Iterator[Kube]:
    """KUBECONFIG's cluster, else a fresh test bed in ``state`` (stopped afterwards). Also for e2e.report."""
    env = dict(os.environ)
    if env.get("KUBECONFIG"):
        yield Kube(env)
        return
    if not TESTBED.exists():
        raise FileNotFoundError(f"no Kubernetes: set KUBECONFIG or provide {TESTBED} (see shared/TESTBED.md)")
    subprocess.run([str(TESTBED), "install"], check=True, capture_output=True)
    for line in subprocess.run([str(TESTBED), "env"], check=True, capture_output=True, text=True).stdout.splitlines():
        m = re.match(r'export (\w+)="?(.*?)"?$', line)
        if m:
            env[m[1]] = m[2].replace("$PATH", env.get("PATH", ""))
    out = subprocess.run([str(TESTBED), "up", str(state)], check=True, capture_output=True, text=True, env=env)
    m = re.search(r"export KUBECONFIG=(\S+)", out.stdout)
    assert m, out.stdout + out.stderr
    env["KUBECONFIG"] = m[1].strip('"')
    try:
        yield Kube(env)
    finally:
        subprocess.run([str(TESTBED), "down", str(state)], capture_output=True, env=env)


def install_crds(kube: Kube) -> Kube:
    kube.kubectl("apply", "-f", str(REPO / "crds"))
    for name in ("imagejobs.zimage.dev", "modeldeployments.zimage.dev", "imageworkflows.zimage.dev"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return kube


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if not os.environ.get("KUBECONFIG") and not TESTBED.exists():
        pytest.skip(f"no Kubernetes: set KUBECONFIG or provide {TESTBED} (see shared/TESTBED.md)")
    with kube_cluster(tmp_path_factory.mktemp("kube")) as k:
        yield k


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Kube:
    return install_crds(kube)


@pytest.fixture
def namespace(crds: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "t-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"
    crds.kubectl("create", "namespace", name)
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@contextmanager
def dev_stack_in(kube: Kube, ns: str, state: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Iterator[Any]:
    """``zimage dev up`` in-process for namespace ``ns`` (created here, deleted after): the operator and local
    processes for every pool there (the test bed has no kubelet). Each process's log tail is printed at the end."""
    from zimage_api.dev import DevStack

    kube.kubectl("create", "namespace", ns)
    for k, v in kube.env.items():  # dev mode reads the kubeconfig (KUBECONFIG) like a developer's shell
        monkeypatch.setenv(k, v)
    stack = DevStack([ns], state, workers=1, api_port=None, say=print, **options)
    stack.start()
    runner = threading.Thread(target=stack.run, daemon=True)
    runner.start()
    try:
        yield stack
    finally:
        stack._stop.set()
        runner.join(10)
        stack.stop()
        for child in stack.children.values():
            if child.log_path.exists():
                print(f"--- {child.name} ---\n{child.log_path.read_text()[-3000:]}")
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def product_photo_and_mask(folder: Path) -> tuple[Path, Path]:
    """The example workflow's inputs: a 128x128 photo with a red product, and its mask (white = the product)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.new("RGB", (128, 128), (250, 250, 250))
    photo.paste((200, 30, 30), (32, 48, 96, 80))
    photo.save(folder / "sneaker.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 48, 96, 80))
    mask.save(folder / "sneaker-mask.png")
    return folder / "sneaker.png", folder / "sneaker-mask.png"


class Processes:
    """Operator and worker processes started by a test, stopped (and their logs shown on failure) after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{log.read_text()[-4000:]}" for n, _, log in self.procs)

    def stop_all(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    ps = Processes(tmp_path)
    yield ps
    ps.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(ps.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]


@contextmanager
def operator_stack(
    kube: Kube, tmp: Path, namespace: str, metrics_port: int = 0, **operator_env: str
) -> Iterator[tuple[Processes, str]]:
    """A namespace, a private Redis and the operator watching that namespace; all gone afterwards."""
    kube.kubectl("create", "namespace", namespace)
    ps = Processes(tmp)
    with RedisServer() as srv:
        start_operator(ps, kube, srv.url, namespace, metrics_port=metrics_port, **operator_env)
        try:
            yield ps, srv.url
        finally:
            ps.stop_all()
            kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def worker_env(redis_url: str, queue_name: str, images: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ZIMAGE_REDIS_URL": redis_url,
            "ZIMAGE_QUEUE": queue_name,
            "ZIMAGE_STORAGE_URL": images.as_uri(),
            "ZIMAGE_MODEL_SOURCE": "tiny-random",
            "ZIMAGE_HTTP_PORT": "0",
            **extra,
        }
    )
    return env


def start_worker(ps: Processes, redis_url: str, queue_name: str, images: Path, **extra: str) -> subprocess.Popen[bytes]:
    return ps.start("worker", [str(BIN / "zimage-worker")], worker_env(redis_url, queue_name, images, **extra))


def start_operator(
    ps: Processes, kube: Kube, redis_url: str, namespace: str, metrics_port: int = 0, **extra: str
) -> subprocess.Popen[bytes]:
    env = {**kube.env, "ZIMAGE_REDIS_URL": redis_url, "ZIMAGE_MODEL_RECHECK_SECONDS": "1", **extra}
    argv = [str(BIN / "zimage-operator"), "--standalone", "-n", namespace, "--metrics-port", str(metrics_port)]
    return ps.start("operator", argv, env)
