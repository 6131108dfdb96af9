"""API latency benchmark: what the HTTP API adds over the raw queue path, with a no-op model.

As deployed, but on one machine: the API in this process (``local_api(workers=0)``: private Redis, in-memory
job store, no worker of its own; uvicorn in a thread), ONE ``zimage-worker`` process (the real entry point,
``ZIMAGE_MODEL_SOURCE=noop``) and the load generator in a third. Once a first image has gone through the API,
each path is warmed up, then driven open-loop at ``--rate`` requests/s, one after the other:

* ``raw queue``: a resolved ``JobMessage`` enqueued as the operator does, until the worker's ``succeeded`` event;
* ``POST /v1/images/generations``: OpenAI-compatible, answered with the image's URL once it is there;
* ``POST /v1/jobs``: the native submit, answered 202 at admission (its jobs run to the end within the phase).

CPU columns: each process's CPU time (``/proc/<pid>/stat``) over the phase, per request and as a share of one
core. The API's rate limit and quota are raised out of the way. Linux only. From the repository root:
``.venv/bin/python -m bench.api_latency [--rate 50] [--requests 500]``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import inf, nan
from pathlib import Path

import httpx

from zimage_api.local import DEV_KEY, LOCAL_NAMESPACE, LocalApi, local_api, serve_in_thread
from zimage_queue import GenerationParams, JobMessage, JobQueue, keys
from zimage_queue.message import VARIANT_DEFAULTS
from zimage_worker.engine import NoopEngine

VARIANT = "turbo"  # local_api's default ModelDeployment variant
EVENTS_GROUP = "bench-latency"
TIMEOUT_S = 60.0  # one HTTP request; the worker's start; a drain after the last send
RUN_TIMEOUT_S = 900.0
RAW, GENERATIONS, JOBS = "raw queue", "POST /v1/images/generations", "POST /v1/jobs (202)"
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}
WARMUP = "warm-up"


@dataclass
class Phase:
    name: str
    sent: list[float] = field(default_factory=list)  # perf_counter at each request start
    latencies_ms: list[float] = field(default_factory=list)  # of the successful ones
    errors: list[str] = field(default_factory=list)  # what went wrong, one per failed request
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over the phase
    wall_s: float = nan
    note: str = ""

    def rate(self) -> float:  # as sent
        return (len(self.sent) - 1) / (max(self.sent) - min(self.sent))

    def pct(self, q: int) -> float:
        lat = self.latencies_ms
        return statistics.quantiles(lat, n=100, method="inclusive")[q - 1] if len(lat) > 1 else (lat or [nan])[0]


@dataclass(frozen=True)
class Plan:  # what the load process needs: plain values, it crosses a process boundary
    redis_url: str
    queue: str
    base_url: str
    pids: dict[str, int]  # api, worker, redis -> pid: the CPU columns
    rate: float
    requests: int
    warmup: int
    size: tuple[int, int]


def mark(pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Now, and each process's CPU seconds so far (utime + stime: fields 14 and 15 of /proc/<pid>/stat)."""
    cpu = {}
    for k, pid in pids.items():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # from field 3 on
        cpu[k] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), cpu


def close(phase: Phase, since: tuple[float, dict[str, float]], pids: dict[str, int]) -> Phase:
    now, cpu = mark(pids)
    phase.wall_s, phase.cpu_s = now - since[0], {k: v - since[1][k] for k, v in cpu.items()}
    return phase


# -- the load process
def raw_phase(name: str, plan: Plan, q: JobQueue, n: int) -> Phase:
    """Enqueue from a thread on schedule; read the worker's events here until every job has ended."""
    phase, ended = Phase(name), dict[str, float | str]()  # uid -> perf_counter of ``succeeded``, or what went wrong
    tag = f"{name.replace(' ', '-')}-{os.getpid()}-{time.monotonic_ns()}-"
    (width, height), defaults, since = plan.size, VARIANT_DEFAULTS[VARIANT], mark(plan.pids)

    def send() -> None:
        start = time.perf_counter()
        for k in range(n):
            time.sleep(max(0.0, start + k / plan.rate - time.perf_counter()))
            params = GenerationParams(  # resolved as the operator's admission resolves them
                prompt="bench", width=width, height=height, steps=defaults.steps,
                guidance_scale=defaults.guidance_scale, seed=k,
            )  # fmt: skip
            uid, t = f"{tag}{k}", time.perf_counter()
            q.enqueue(JobMessage(uid=uid, namespace=LOCAL_NAMESPACE, name=uid, queue=plan.queue, params=params))
            phase.sent.append(t)  # phase.sent[k]: job k's start

    q.ensure_group(keys.EVENTS_STREAM, EVENTS_GROUP)  # before the first send: no event is missed
    sender, deadline = threading.Thread(target=send, daemon=True), inf
    sender.start()
    while len(ended) < n and time.monotonic() < deadline:
        got = q.read_events("bench", count=500, block_ms=200, group=EVENTS_GROUP)
        t = time.perf_counter()
        for _id, ev in got:
            if ev.uid.startswith(tag) and ev.type in ("succeeded", "failed", "cancelled"):
                ended[ev.uid] = t if ev.type == "succeeded" else f"job {ev.type}: {ev.reason}: {ev.message}"
        q.ack_events([i for i, _ in got], group=EVENTS_GROUP)
        if deadline == inf and not sender.is_alive():
            deadline = time.monotonic() + TIMEOUT_S
    sender.join()
    for k, t0 in enumerate(phase.sent):
        end = ended.get(f"{tag}{k}", f"no succeeded event within {TIMEOUT_S:.0f} s of the last send")
        if isinstance(end, float):
            phase.latencies_ms.append((end - t0) * 1000)
        else:
            phase.errors.append(f"{tag}{k}: {end}")
    return close(phase, since, plan.pids)


async def http_phase(name: str, plan: Plan, q: JobQueue, c: httpx.AsyncClient, path: str, n: int) -> Phase:
    """``n`` POSTs, open loop (latency: request start to full response), then until the worker is idle."""
    phase, expect, since = Phase(name), 202 if path == "/v1/jobs" else 200, mark(plan.pids)
    w, h = plan.size
    body = {"prompt": "bench", "width": w, "height": h} if expect == 202 else {"prompt": "bench", "size": f"{w}x{h}"}

    async def one() -> None:
        t = time.perf_counter()
        phase.sent.append(t)
        try:
            r = await c.post(path, json=body)  # OpenAI: response_format "url", the default
        except httpx.HTTPError as e:
            phase.errors.append(f"{e!r} after {time.perf_counter() - t:.2f} s")
            return
        elapsed_ms = (time.perf_counter() - t) * 1000
        if r.status_code != expect or (expect == 200 and not r.json()["data"][0].get("url")):
            phase.errors.append(f"HTTP {r.status_code}: {r.text}")
        else:
            phase.latencies_ms.append(elapsed_ms)

    tasks, loop = [], asyncio.get_running_loop()
    start = loop.time()
    for k in range(n):
        await asyncio.sleep(max(0.0, start + k / plan.rate - loop.time()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    last = time.perf_counter()
    while (stats := q.stats(plan.queue)).queued or stats.in_flight:  # the worker's backlog (after /v1/jobs)
        if time.perf_counter() - last > TIMEOUT_S:
            raise RuntimeError(f"queue {plan.queue} not drained within {TIMEOUT_S:.0f} s: {stats}")
        await asyncio.sleep(0.02)
    if expect == 202:
        phase.note = f"the jobs of {name} ran to the end {time.perf_counter() - last:.2f} s after the last 202"
    return close(phase, since, plan.pids)


async def http_phases(plan: Plan, q: JobQueue) -> list[Phase]:
    phases = []
    for name, path in ((GENERATIONS, "/v1/images/generations"), (JOBS, "/v1/jobs")):
        limits = httpx.Limits(max_connections=1000)  # one client per path: no connection left idle by another
        async with httpx.AsyncClient(base_url=plan.base_url, headers=AUTH, timeout=TIMEOUT_S, limits=limits) as c:
            phases.append(await http_phase(f"{name} {WARMUP}", plan, q, c, path, plan.warmup))
            phases.append(await http_phase(name, plan, q, c, path, plan.requests))
    return phases


def load(plan: Plan) -> list[Phase]:
    """The load process: the raw queue path, then the HTTP paths, each after its warm-up."""
    q = JobQueue.from_url(plan.redis_url)
    try:
        phases = [raw_phase(f"{RAW} {WARMUP}", plan, q, plan.warmup), raw_phase(RAW, plan, q, plan.requests)]
        return phases + asyncio.run(http_phases(plan, q))
    finally:
        q.r.close()


# -- this process: the API
@contextmanager
def worker_process(api: LocalApi) -> Iterator[subprocess.Popen[bytes]]:
    """One ``zimage-worker`` on the API's queue, as a pod would run it; SIGTERM and wait at the end."""
    env = dict(os.environ, ZIMAGE_REDIS_URL=api.redis_url, ZIMAGE_QUEUE=api.queue, ZIMAGE_MODEL_SOURCE="noop")
    env.update(ZIMAGE_STORAGE_URL=api.images_dir.as_uri(), ZIMAGE_HTTP_PORT="0")
    exe = str(Path(sys.executable).parent / "zimage-worker")  # next to python: the venv's bin
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([exe], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            failed = sys.exc_info()[1] is not None  # an exception on its way out of the with block
            proc.terminate()
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if failed or code:
                log.seek(0)
                print(f"worker exited {code}; its output ends:\n{log.read()[-4000:].decode()}", file=sys.stderr)


async def first_image(base: str, worker: subprocess.Popen[bytes]) -> None:
    """Ready, event-driven: one image through the API needs the worker up and serving (or it exited)."""
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=TIMEOUT_S) as c:
        post = asyncio.create_task(c.post("/v1/images/generations", json={"prompt": "bench"}))
        while not (await asyncio.wait({post}, timeout=0.1))[0]:
            if worker.poll() is not None:
                post.cancel()
                raise RuntimeError(f"the worker exited ({worker.returncode}) before its first job was done")
        if (r := post.result()).status_code != 200:
            raise RuntimeError(f"first image: HTTP {r.status_code}: {r.text[:500]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rate", type=float, default=50.0, help="open-loop arrival rate, requests/s (default 50)")
    p.add_argument("--requests", type=int, default=500, help="measured requests per path (default 500)")
    p.add_argument("--size", default="64x64", help="image size WIDTHxHEIGHT (default 64x64)")
    p.add_argument("--warmup", type=int, default=20, help="requests per path sent (not measured) first")
    args = p.parse_args(argv)
    w, _, h = args.size.partition("x")
    if not (w.isdigit() and h.isdigit()) or args.rate <= 0 or args.requests < 2 or args.warmup < 0:
        p.error("--size must be WIDTHxHEIGHT, --rate > 0, --requests >= 2, --warmup >= 0")
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    print(f"machine: {platform.node()}, {len(os.sched_getaffinity(0))} usable cores, {cpu}")
    print(
        f"python {platform.python_version()}, httpx {httpx.__version__}; API + uvicorn in this process, one "
        f"zimage-worker process (noop, {VARIANT}: {VARIANT_DEFAULTS[VARIANT].steps} steps, {args.size}), load "
        f"from a third; open loop at {args.rate:g}/s, {args.requests} requests per path after {args.warmup} warm-up"
    )
    t0 = time.perf_counter()
    unlimited = {"rate_per_second": 1e6, "rate_burst": 10**6, "max_concurrent_jobs": 10**6}
    with (
        local_api(engine=NoopEngine(VARIANT), workers=0, **unlimited) as api,  # type: ignore[arg-type]
        serve_in_thread(api.app) as base,
        worker_process(api) as worker,
    ):
        asyncio.run(first_image(base, worker))
        print(f"worker pid {worker.pid}: first image through the API {time.perf_counter() - t0:.2f} s after the start")
        with JobQueue.from_url(api.redis_url).r as redis:
            pids = {"api": os.getpid(), "worker": worker.pid, "redis": int(redis.info("server")["process_id"])}
        plan = Plan(api.redis_url, api.queue, base, pids, args.rate, args.requests, args.warmup, (int(w), int(h)))
        with mp.get_context("spawn").Pool(1) as pool:
            phases = pool.apply_async(load, (plan,)).get(RUN_TIMEOUT_S)

    head = f"\n{'path':<30}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'rate /s':>9}"
    print(head + "".join(f"{k + ' cpu':>18}" for k in pids))
    for ph in (ph for ph in phases if not ph.name.endswith(WARMUP)):
        lat = "".join(f"{v:>10.2f}" for v in (ph.pct(50), ph.pct(99), max(ph.latencies_ms, default=nan)))
        use = "".join(f"{1000 * c / len(ph.sent):>8.2f} ms {100 * c / ph.wall_s:>4.0f} %" for c in ph.cpu_s.values())
        print(f"{ph.name:<30}{len(ph.latencies_ms):>6}{lat}{ph.rate():>9.1f}{use}")
    print(f"(cpu: per request, and as a share of one core over the phase; {len(os.sched_getaffinity(0))} cores)")
    ok = True
    for ph in phases:
        if ph.note and not ph.name.endswith(WARMUP):
            print(f"({ph.note})")
        if ph.errors:
            ok = False
            print(f"{ph.name}: {len(ph.errors)} of {len(ph.sent)} failed; first: {ph.errors[0][:500]}")
    raw, gens = (next(ph for ph in phases if ph.name == name) for name in (RAW, GENERATIONS))
    d50, d99 = (gens.pct(q) - raw.pct(q) for q in (50, 99))
    print(f"API adds p50 {d50:.2f} ms, p99 {d99:.2f} ms over the raw queue path")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
