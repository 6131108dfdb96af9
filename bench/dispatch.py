"""Dispatch benchmark: the hand-off from enqueue to worker pick-up, with a no-op model.

Three systems on the same private Redis (a fresh ``redis-server`` each), one producer (this process) and one
consumer (a separate process, so the GIL does not couple them):

* ``raw redis-py``: XADD / XREADGROUP BLOCK COUNT 1 / XACK on one stream and consumer group;
* ``zimage contract``: ``JobQueue.enqueue`` / ``JobQueue.take`` + ``begin`` + ``complete`` (the ack path);
* ``celery``: ``apply_async`` / a ``--pool=solo`` worker with acks_late and a prefetch of one.

Every consumer runs the same no-op model step per job (``NoopEngine``, one step on 64x64).

Two figures per system:

* latency: p50/p99 of pick-up time minus enqueue time, jobs sent one every ``--interval-ms`` so the consumer
  is idle-waiting when each arrives. Enqueue time is ``time.time()`` just before the producer's call; pick-up
  time is ``time.time()`` when the consumer's read returns (for Celery: when the task body starts);
* throughput: a burst of ``--jobs`` jobs sent as fast as possible while the consumer drains them:
  jobs / (last pick-up - first enqueue).

Run from the repository root: ``.venv/bin/python bench/dispatch.py [--jobs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench.celery_dispatch`` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.celery_dispatch import noop_model  # noqa: E402
from zimage_queue import GenerationParams, JobEvent, JobMessage, JobQueue  # noqa: E402
from zimage_queue import keys as qkeys  # noqa: E402
from zimage_queue.server import RedisServer, find_server_binary  # noqa: E402
from zimage_worker.engine import NoopEngine  # noqa: E402

RESULTS_KEY = "bench:results"
RAW_STREAM = "bench:raw"
RAW_GROUP = "workers"
CONSUMER = "bench-worker"
CONTRACT_QUEUE = qkeys.queue_name("bench", "noop")
FLUSH = "flush"
STOP = "stop"
JOB = "job"
BLOCK_MS = 1000
PHASE_TIMEOUT_S = 120.0

# p50 of the contract at most this many times raw's; contract jobs/s at least this many times Celery's.
TARGET_P50_RATIO = 2.0
TARGET_THROUGHPUT_RATIO = 1.0

_PARAMS = GenerationParams(prompt="bench", width=64, height=64, steps=1, seed=0)


# -- consumers (separate processes) -----------------------------------------------------------------------
def _entries(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    # RESP2 gives [[stream, entries]], RESP3 a {stream: [entries]} dict.
    items = reply.items() if isinstance(reply, dict) else (reply or [])
    return [(entry[0], entry[1]) for _stream, entries in items for entry in entries]


def raw_consumer(url: str) -> None:
    r = redis.Redis.from_url(url)
    engine = NoopEngine()
    picks: list[tuple[int, float]] = []
    while True:
        reply = r.xreadgroup(RAW_GROUP, CONSUMER, {RAW_STREAM: ">"}, count=1, block=BLOCK_MS)
        t = time.time()
        for entry_id, fields in _entries(reply):
            kind = fields[b"k"].decode()
            if kind == JOB:
                picks.append((int(fields[b"i"]), t))
                noop_model(engine, _PARAMS)
            r.xack(RAW_STREAM, RAW_GROUP, entry_id)
            if kind == FLUSH:
                r.rpush(RESULTS_KEY, json.dumps(picks))
                picks = []
            elif kind == STOP:
                r.close()
                return


def contract_consumer(url: str) -> None:
    q = JobQueue.from_url(url)
    engine = NoopEngine()
    picks: list[tuple[int, float]] = []
    while True:
        got = q.take(CONTRACT_QUEUE, CONSUMER, count=1, block_ms=BLOCK_MS)
        t = time.time()
        for d in got:
            msg = d.message
            outcome = q.begin(d, CONSUMER)
            kind, _, idx = msg.name.partition("-")
            if outcome == "run" and kind == JOB:
                picks.append((int(idx), t))
                noop_model(engine, msg.params)
            event = JobEvent(
                type="succeeded",
                uid=msg.uid,
                namespace=msg.namespace,
                name=msg.name,
                worker=CONSUMER,
                attempt=d.attempt,
                run_seconds=time.time() - t,
            )
            q.complete(d, [], event)
            if kind == FLUSH:
                q.r.rpush(RESULTS_KEY, json.dumps(picks))
                picks = []
            elif kind == STOP:
                q.r.close()
                return


# -- producers (this process) -----------------------------------------------------------------------------
class System(Protocol):
    name: str

    def start(self) -> None: ...

    def send(self, idx: int) -> float:
        """Enqueue job ``idx``; returns time.time() taken just before the enqueue call."""
        ...

    def flush(self) -> None:
        """Ask the consumer to hand over the pick-up times it has recorded (after all jobs sent so far)."""
        ...

    def alive(self) -> bool: ...

    def stop(self) -> None:
        """Stop the consumer; safe to call more than once, and after a failed start."""
        ...


def _stop_process(proc: BaseProcess | None, send_stop: Callable[[], None], timeout: float = 10.0) -> None:
    if proc is None:
        return
    if proc.is_alive():
        try:
            send_stop()
        except Exception as e:  # the server may be gone already: fall through to terminate
            print(f"  (could not send stop: {e})", file=sys.stderr)
        proc.join(timeout)
    if proc.is_alive():
        print("  (consumer did not stop by itself: terminating it)", file=sys.stderr)
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


class _ProcessConsumer:
    """A consumer process stopped and flushed through control messages on its own queue."""

    proc: BaseProcess | None = None

    def _control(self, kind: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        self._control(FLUSH)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def stop(self) -> None:
        _stop_process(self.proc, lambda: self._control(STOP))
        self.proc = None


class RawSystem(_ProcessConsumer):
    name = "raw redis-py"

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = redis.Redis.from_url(url)
        self.r.xgroup_create(RAW_STREAM, RAW_GROUP, id="0", mkstream=True)
        self.proc: BaseProcess | None = None

    def start(self) -> None:
        self.proc = mp.get_context("spawn").Process(target=raw_consumer, args=(self.url,), daemon=True)
        self.proc.start()

    def send(self, idx: int) -> float:
        fields = {"k": JOB, "i": idx}
        t = time.time()
        self.r.xadd(RAW_STREAM, fields)  # type: ignore[arg-type]
        return t

    def _control(self, kind: str) -> None:
        self.r.xadd(RAW_STREAM, {"k": kind, "i": -1})


class ContractSystem(_ProcessConsumer):
    name = "zimage contract"

    def __init__(self, url: str) -> None:
        self.url = url
        self.q = JobQueue.from_url(url)
        self.q.ensure_queue(CONTRACT_QUEUE)
        self.proc: BaseProcess | None = None
        self._controls = 0

    def start(self) -> None:
        self.proc = mp.get_context("spawn").Process(target=contract_consumer, args=(self.url,), daemon=True)
        self.proc.start()

    @staticmethod
    def _message(name: str, seed: int) -> JobMessage:
        params = GenerationParams(prompt="bench", width=64, height=64, steps=1, seed=seed)
        return JobMessage(uid=f"bench-{name}", namespace="bench", name=name, queue=CONTRACT_QUEUE, params=params)

    def send(self, idx: int) -> float:
        msg = self._message(f"{JOB}-{idx}", idx)
        t = time.time()
        self.q.enqueue(msg, "normal")
        return t

    def _control(self, kind: str) -> None:
        self._controls += 1
        self.q.enqueue(self._message(f"{kind}-{self._controls}", 0), "normal")


class CelerySystem:
    name = "celery"

    def __init__(self, url: str) -> None:
        from bench import celery_dispatch

        self.cd = celery_dispatch
        self.url = url
        celery_dispatch.app.conf.broker_url = url
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, **{self.cd.BROKER_ENV: self.url})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_dispatch",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-Q",
            self.cd.QUEUE,
            "-n",
            self.cd.NODE,
            "--loglevel=WARNING",
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def send(self, idx: int) -> float:
        t = time.time()
        self.cd.pick.apply_async((idx,), queue=self.cd.QUEUE)
        return t

    def flush(self) -> None:
        self.cd.flush.apply_async((RESULTS_KEY,), queue=self.cd.QUEUE)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_log(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:  # warm shutdown through Celery's remote control: the worker exits by itself
                self.cd.app.control.shutdown(destination=[self.cd.NODE])
            except Exception as e:
                print(f"  (could not send shutdown: {e})", file=sys.stderr)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print("  (celery worker did not stop by itself: terminating it)", file=sys.stderr)
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.cd.app.pool.force_close_all()
        if self.log is not None:
            self.log.close()
            self.log = None


# -- driver ---------------------------------------------------------------------------------------------
@dataclass
class Phase:
    sent: dict[int, float]
    picked: dict[int, float]

    def latencies_ms(self) -> list[float]:
        return [(self.picked[i] - t) * 1000 for i, t in self.sent.items()]

    def throughput(self) -> float:
        return len(self.sent) / (max(self.picked.values()) - min(self.sent.values()))

    def enqueue_rate(self) -> float:
        span = max(self.sent.values()) - min(self.sent.values())
        return (len(self.sent) - 1) / span if span > 0 else float("inf")


@dataclass
class Row:
    name: str
    jobs_per_s: float
    enqueue_per_s: float
    p50_ms: float
    p99_ms: float


class Runner:
    def __init__(self, system: System, results: redis.Redis) -> None:
        self.system = system
        self.results = results
        self.next_idx = 0

    def phase(self, n: int, interval_s: float) -> Phase:
        sent: dict[int, float] = {}
        start = time.perf_counter()
        for k in range(n):
            if interval_s > 0:
                delay = start + k * interval_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            idx = self.next_idx
            self.next_idx += 1
            sent[idx] = self.system.send(idx)
        self.system.flush()
        picked = self._collect()
        missing = sent.keys() - picked.keys()
        if missing:
            raise RuntimeError(f"{self.system.name}: {len(missing)} of {n} jobs were not picked up")
        return Phase(sent=sent, picked={i: picked[i] for i in sent})

    def _collect(self) -> dict[int, float]:
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline:
            got = self.results.blpop([RESULTS_KEY], timeout=1)
            if got is not None:
                return {int(i): float(t) for i, t in json.loads(got[1])}
            if not self.system.alive():
                raise RuntimeError(f"{self.system.name}: consumer exited before handing over its pick-ups")
        raise RuntimeError(f"{self.system.name}: no pick-ups within {PHASE_TIMEOUT_S:.0f} s")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def measure(factory: Callable[[str], System], args: argparse.Namespace) -> Row:
    with RedisServer() as srv:
        results = redis.Redis.from_url(srv.url)
        system = factory(srv.url)
        t0 = time.perf_counter()
        try:
            system.start()
            runner = Runner(system, results)
            runner.phase(args.warmup, 0.0)  # also waits for the consumer to come up
            latency = runner.phase(args.latency_jobs, args.interval_ms / 1000)
            burst = runner.phase(args.jobs, 0.0)
        except Exception:
            if isinstance(system, CelerySystem):
                print(f"celery worker log:\n{system.worker_log()}", file=sys.stderr)
            raise
        finally:
            system.stop()
            results.close()
    lat = latency.latencies_ms()
    row = Row(system.name, burst.throughput(), burst.enqueue_rate(), percentile(lat, 50), percentile(lat, 99))
    print(
        f"  {row.name:<16} done in {time.perf_counter() - t0:5.1f} s"
        f"  (latency max {max(lat):.2f} ms, burst {len(burst.sent)} jobs)",
        flush=True,
    )
    return row


def ping_rtt_us(samples: int = 2000) -> float:
    with RedisServer() as srv:
        r = redis.Redis.from_url(srv.url)
        for _ in range(200):
            r.ping()
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            r.ping()
            times.append(time.perf_counter() - t)
        r.close()
    return statistics.median(times) * 1e6


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()}: {usable} usable cores ({os.cpu_count()} online), {model}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=None, help="burst size (default 2000; --quick 300)")
    p.add_argument("--quick", action="store_true", help="a smaller run (300-job burst, 100 latency jobs)")
    p.add_argument("--latency-jobs", type=int, default=None, help="paced jobs for latency (default 200)")
    p.add_argument("--interval-ms", type=float, default=5.0, help="pace of the latency jobs")
    p.add_argument("--warmup", type=int, default=20, help="jobs sent (and not measured) before measuring")
    p.add_argument("--only", choices=["raw", "contract", "celery"], action="append", help="run only these")
    args = p.parse_args(argv)
    args.jobs = args.jobs or (300 if args.quick else 2000)
    args.latency_jobs = args.latency_jobs or (100 if args.quick else 200)

    import celery
    import redis as redis_py

    server_version = subprocess.run(
        [find_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    print(f"machine: {machine()}")
    print(
        f"python {platform.python_version()}, redis-py {redis_py.__version__}, celery {celery.__version__}, "
        f"{' '.join(server_version[:3])}"
    )
    print(
        f"latency: {args.latency_jobs} jobs one every {args.interval_ms:g} ms; throughput: burst of "
        f"{args.jobs} jobs; warm-up {args.warmup} jobs; one producer process, one consumer process"
    )
    print(f"redis PING round trip p50: {ping_rtt_us():.0f} us")

    systems: dict[str, Callable[[str], System]] = {
        "raw": RawSystem,
        "contract": ContractSystem,
        "celery": CelerySystem,
    }
    rows: dict[str, Row] = {}
    for key, factory in systems.items():
        if args.only and key not in args.only:
            continue
        rows[key] = measure(factory, args)

    print()
    print(f"{'system':<18}{'jobs/s':>10}{'enqueue/s':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for row in rows.values():
        print(f"{row.name:<18}{row.jobs_per_s:>10.0f}{row.enqueue_per_s:>11.0f}{row.p50_ms:>9.3f}{row.p99_ms:>9.3f}")
    print()
    ok = True
    if "raw" in rows and "contract" in rows:
        ratio = rows["contract"].p50_ms / rows["raw"].p50_ms
        passed = ratio <= TARGET_P50_RATIO
        ok &= passed
        print(
            f"contract p50 / raw p50          = {ratio:5.2f}  (target <= {TARGET_P50_RATIO:g})  "
            f"{'PASS' if passed else 'FAIL'}"
        )
    if "contract" in rows and "celery" in rows:
        ratio = rows["contract"].jobs_per_s / rows["celery"].jobs_per_s
        passed = ratio >= TARGET_THROUGHPUT_RATIO
        ok &= passed
        print(
            f"contract jobs/s / celery jobs/s = {ratio:5.2f}  (target >= {TARGET_THROUGHPUT_RATIO:g})  "
            f"{'PASS' if passed else 'FAIL'}"
        )
    if "raw" in rows and "celery" in rows:
        ratio = rows["celery"].p50_ms / rows["raw"].p50_ms
        print(f"celery p50 / raw p50            = {ratio:5.2f}  (for reference)")
    print(f"machine: {machine()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
