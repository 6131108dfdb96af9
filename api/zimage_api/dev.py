"""``zimage dev up``: serve a cluster's ImageJobs from this machine (docs/quickstart.md, "Developer mode").

Runs, against the current kubeconfig, what the chart runs in the cluster: a Redis (a private one unless
``--redis-url``), the operator watching the namespaces given, the REST API, and local worker processes for every
ModelDeployment there (``--workers`` each, started as pools appear, stopped as they go, restarted with backoff
when they die). For clusters without GPUs (or a test bed without a kubelet) and for working on the code: the
operator still renders each pool's Deployment, but the jobs are served by the workers on this machine.

Each process logs to a file under the state directory (printed at start); Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from zimage_queue.keys import queue_name
from zimage_queue.server import RedisServer, free_port
from zimage_queue.supervise import backoff_seconds

BIN = Path(sys.executable).parent
POOLS_POLL_SECONDS = 2.0
# A chart's operator in the cluster draws a random priority below this; kopf pauses the lower one.
TAKEOVER_PRIORITY = 2**31
SERVES = ("ZIMAGE_MODEL_SOURCE", "ZIMAGE_REMOTE_BASE_URL", "ZIMAGE_FUNCTION")  # what a started process runs
# Pools whose processes burn CPU (a function's steps; a model's inference where there is no GPU) run below the
# I/O-bound ones (forwarders, the API, the operator) on this shared machine, as CPU limits keep them apart in pods:
# otherwise a compose step's seconds of CPU show up as event-loop lag in a forwarder on the same core.
CPU_BOUND = {"ZIMAGE_FUNCTION", "ZIMAGE_MODEL_SOURCE"}
CPU_BOUND_NICE = 10
POD_ONLY_ENV = ("MODELS_DIR", "HF_HOME", "HOME", "HF_HUB_OFFLINE")


def _exe(name: str) -> str:
    local = BIN / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    log: IO[bytes] | None = None
    nice: int = 0  # added to the process's niceness once started

    def start(self) -> None:
        self.log = self.log or self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if self.nice:
            with contextlib.suppress(OSError):  # it may already have exited; its restart sets it again
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.nice)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


@dataclass
class DevStack:
    namespaces: list[str]
    state: Path
    workers: int = 1
    model_source: str | None = None  # None: each pool's spec.model.source
    redis_url: str | None = None
    api_port: int | None = 8080  # None: no API
    takeover: str | None = None  # a chart release's peering object to take over from its operator
    say: Callable[[str], None] = print
    list_pools: Callable[[list[str]], list[dict[str, Any]]] | None = None
    read_secret: Callable[[str, str], dict[str, str]] | None = None
    operator: bool = True  # False: only the pools' processes (the embedded workflow engine drives the jobs)
    pool_workers: dict[str, int] = field(default_factory=dict)  # processes per pool name, else ``workers``
    children: dict[str, Child] = field(default_factory=dict)
    api_key: str = ""
    _redis: RedisServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def images(self) -> Path:
        return self.state / "images"

    def start(self) -> None:
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.images.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self._redis = RedisServer(data_dir=str(self._dir("redis"))).start()
            self.redis_url = self._redis.url
        base = {**os.environ, "ZIMAGE_REDIS_URL": self.redis_url}
        argv = [_exe("zimage-operator"), "--metrics-port", "0"]
        for ns in self.namespaces:
            argv += ["-n", ns]
        argv += (
            ["--peering", self.takeover, "--priority", str(TAKEOVER_PRIORITY)] if self.takeover else ["--standalone"]
        )
        if self.operator:
            self._add("operator", argv, {**base, "ZIMAGE_MODEL_RECHECK_SECONDS": "2"})
        if self.api_port is not None:
            from zimage_api.local import DEV_KEY

            self.api_key = DEV_KEY
            self.api_port = self.api_port or free_port()
            env = {
                **base,
                "ZIMAGE_API_NAMESPACE": self.namespaces[0],
                "ZIMAGE_API_HOST": "127.0.0.1",
                "ZIMAGE_API_PORT": str(self.api_port),
                "ZIMAGE_API_DEV_KEY": DEV_KEY,
                "ZIMAGE_API_URL_SIGNING_KEY": secrets.token_urlsafe(32),
                "ZIMAGE_STORAGE_URL": self.images.as_uri(),
            }
            self._add("api", [_exe("zimage-api")], env)
        for child in self.children.values():
            child.start()

    def _dir(self, name: str) -> Path:
        path = self.state / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _add(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, self.state / "logs" / f"{name.replace('/', '_')}.log")
        self.children[name] = child
        return child

    def worker_env(self, md: dict[str, Any], index: int) -> dict[str, str]:
        """What the operator would give the pool's pod (``workload.desired_objects``: the same command and plain
        settings for every backend), with this machine's Redis, store and ports, and the keys of a remote pool
        copied from its Secret into the state directory."""
        return self.worker_process(md, index)[1]

    def worker_process(self, md: dict[str, Any], index: int) -> tuple[list[str], dict[str, str]]:
        from zimage_operator import workload

        meta = md["metadata"]
        rendered = workload.desired_objects({**md, "metadata": {"uid": "dev", **meta}}, redis_url="", replicas=1)
        container = rendered["deployment"]["spec"]["template"]["spec"]["containers"][0]
        pod = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
        for pod_only in POD_ONLY_ENV:  # paths inside the pod (its cache volume, its read-only root)
            pod.pop(pod_only, None)
        env = {
            **os.environ,
            **pod,
            "ZIMAGE_REDIS_URL": self.redis_url or "",
            "ZIMAGE_QUEUE": queue_name(meta["namespace"], meta["name"]),
            "ZIMAGE_WORKER_NAME": f"dev-{meta['name']}-{index}",
            "ZIMAGE_STORAGE_URL": self.images.as_uri(),
            "ZIMAGE_HTTP_PORT": "0",
        }
        if self.model_source and "ZIMAGE_MODEL_SOURCE" in env:
            env["ZIMAGE_MODEL_SOURCE"] = self.model_source
        if "ZIMAGE_REMOTE_KEYS_DIR" in pod:
            secret = ((md.get("spec") or {}).get("remote") or {}).get("keysSecret", "")
            env["ZIMAGE_REMOTE_KEYS_DIR"] = str(self._keys(meta["namespace"], secret))
        command = container.get("command") or ["zimage-worker"]
        return [_exe(command[0]), *command[1:]], env

    def _keys(self, namespace: str, secret: str) -> Path:
        """A remote pool's keys Secret as files (one per key, like its pod's volume), readable by this user only."""
        directory = self.state / "keys" / namespace / secret
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = (self.read_secret or kube_secret)(namespace, secret)
        for kid, value in data.items():
            path = directory / kid
            path.touch(mode=0o600)
            path.write_text(value)
        return directory

    def sync_pools(self, pools: list[dict[str, Any]], now: float) -> None:
        """Workers for the pools there are (started, or restarted with backoff after dying); none for the gone."""
        wanted: dict[str, dict[str, Any]] = {}
        for md in pools:
            meta = md["metadata"]
            for i in range(self.pool_workers.get(meta["name"], self.workers)):
                wanted[f"worker/{meta['namespace']}/{meta['name']}/{i}"] = md
        for name in [n for n in self.children if n.startswith("worker/") and n not in wanted]:
            self.children.pop(name).stop()
            self.say(f"stopped {name} (its ModelDeployment is gone)")
        for name, md in wanted.items():
            child = self.children.get(name)
            if child is None:
                argv, env = self.worker_process(md, int(name.rsplit("/", 1)[1]))
                child = self._add(name, argv, env)
                if CPU_BOUND.intersection(env):
                    child.nice = CPU_BOUND_NICE
                child.start()
                serves = (
                    env.get("ZIMAGE_MODEL_SOURCE") or env.get("ZIMAGE_REMOTE_BASE_URL") or env.get("ZIMAGE_FUNCTION")
                )
                self.say(f"started {name} ({Path(argv[0]).name}: {serves})")
        self._restart_dead(now)

    def _restart_dead(self, now: float) -> None:
        for child in self.children.values():
            if child.alive() or child.proc is None:
                continue
            if child.next_start == 0.0:
                child.failures += 1
                child.next_start = now + backoff_seconds(child.failures, base=1.0)
                self.say(f"{child.name} exited ({child.proc.returncode}); restarting (logs: {child.log_path})")
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()

    def _pools(self) -> list[dict[str, Any]]:
        if self.list_pools is not None:
            return self.list_pools(self.namespaces)
        return kube_pools(self.namespaces)

    def run(self) -> None:
        """Until stop(): follow the namespaces' ModelDeployments (a failed listing is retried next poll)."""
        while not self._stop.is_set():
            try:
                self.sync_pools(self._pools(), time.monotonic())
            except Exception as e:  # the API server unreachable for a while: keep what runs, look again
                self.say(f"could not list ModelDeployments: {e}")
                self._restart_dead(time.monotonic())
            self._stop.wait(POOLS_POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        for child in reversed(list(self.children.values())):
            child.stop()
        if self._redis is not None:
            self._redis.stop()


def kube_secret(namespace: str, name: str) -> dict[str, str]:
    import base64

    from kubernetes import client

    from zimage_operator.k8s import load_configuration, with_timeouts

    api = client.CoreV1Api(with_timeouts(client.ApiClient(load_configuration())))
    secret = api.read_namespaced_secret(name, namespace, _request_timeout=10)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def kube_pools(namespaces: list[str]) -> list[dict[str, Any]]:
    from kubernetes import client

    from zimage_operator.k8s import load_configuration, with_timeouts
    from zimage_operator.types import GROUP, MODELDEPLOYMENT_PLURAL, VERSION

    api = client.CustomObjectsApi(with_timeouts(client.ApiClient(load_configuration())))
    out: list[dict[str, Any]] = []
    for ns in namespaces:
        listed = api.list_namespaced_custom_object(GROUP, VERSION, ns, MODELDEPLOYMENT_PLURAL, _request_timeout=10)
        out += listed.get("items", [])
    return out


def register(sub: Any, shared: object = None) -> None:
    """``zimage dev up``, registered on the CLI's subparsers (zimage_api.cli.COMMANDS)."""
    dev = sub.add_parser("dev", help="developer mode: serve a cluster's ImageJobs from this machine")
    dsub = dev.add_subparsers(dest="dev_command", required=True)
    up = dsub.add_parser(
        "up",
        help="run Redis, the operator, the API and local workers against the current kubeconfig",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("-n", "--namespace", action="append", default=[], help="namespace to serve (repeatable)")
    up.add_argument("--workers", type=int, default=1, help="local workers per ModelDeployment (default 1)")
    up.add_argument("--model-source", default=None, help="run every pool with this model (e.g. tiny-random)")
    up.add_argument("--redis-url", default=None, help="use this Redis (default: a private redis-server)")
    up.add_argument("--api-port", type=int, default=8080, help="the API's port on 127.0.0.1 (0: any free port)")
    up.add_argument("--no-api", action="store_true", help="no REST API")
    up.add_argument("--state-dir", default=".zimage-dev", help="images, logs and Redis data (default .zimage-dev)")
    up.add_argument(
        "--take-over",
        metavar="PEERING",
        default=None,
        help="pause the chart's operator while this runs: its peering object, <release>-zimage-operator",
    )
    up.set_defaults(func=dev_up)


def dev_up(args: argparse.Namespace) -> int:
    from zimage_api.cli_errors import UserError

    if args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if args.api_port is not None and not 0 <= args.api_port <= 65535:
        raise UserError("--api-port must be between 0 and 65535")
    stack = DevStack(
        namespaces=args.namespace or ["default"],
        state=Path(args.state_dir).resolve(),
        workers=args.workers,
        model_source=args.model_source,
        redis_url=args.redis_url,
        api_port=None if args.no_api else args.api_port,
        takeover=args.take_over,
        say=lambda line: print(f"zimage dev: {line}", flush=True),
    )
    stack.start()
    try:
        print(f"zimage dev: serving namespace(s) {', '.join(stack.namespaces)} from this machine", flush=True)
        print(f"  redis     {stack.redis_url}", flush=True)
        if stack.api_port is not None:
            print(f"  api       http://127.0.0.1:{stack.api_port}  (key: {stack.api_key})", flush=True)
        print(f"  images    {stack.images}", flush=True)
        print(f"  logs      {stack.state / 'logs'}", flush=True)
        print(f"  workers   {stack.workers} per ModelDeployment", flush=True)
        print("zimage dev: ready (Ctrl-C stops everything)", flush=True)
        stack.run()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0
