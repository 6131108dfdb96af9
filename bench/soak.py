"""Soak: bounded state. Many jobs through the whole system; what Redis and the operator hold afterwards.

A private ``redis-server``, the Kubernetes test bed (or ``KUBECONFIG``) with the CRDs, the operator process
with short retentions, the example ModelDeployment and no-op worker processes (``ZIMAGE_MODEL_SOURCE=noop``).
Jobs go in in waves, two ways:

* the CR path: ``--cr-share`` of them as ImageJobs created through the Kubernetes API (``kubectl create`` of a
  List per batch); the operator admits and enqueues them, writes their status and deletes them
  ``ttlSecondsAfterFinished`` (the operator's default) after they finish;
* the queue path: the rest as ``JobQueue.enqueue`` of a ``JobMessage`` straight onto the model's queue, as the
  API's local mode or any other producer does.

After each wave has drained it samples Redis ``INFO memory`` used_memory, ``DBSIZE``, the job records
(``zimage:job:*``), the ``XLEN`` of every zimage stream (the model's job streams, events, dead-letter), the
ImageJobs left and the operator's RSS (``/proc/<pid>/status`` VmRSS). The baseline is sampled after a warm-up
wave (``--warmup-share`` of the jobs) has drained and the retentions have elapsed, the end after the last wave
has drained, every ImageJob is gone by its TTL and the retentions have elapsed again. The summary gives each
figure's growth per 1,000 jobs from baseline to end, end/baseline, and whether it stayed flat within 5 %, and
counts the job records Redis still holds for ImageJobs that are gone.

A benchmark, not a test: it prints figures (``tests/integration/test_bench_soak.py`` runs a short form and
checks the properties). Run from the repository root: ``.venv/bin/python -m bench.soak [--jobs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # conftest (the test bed helpers) lives at the repository root
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from conftest import REPO, Kube, Processes, install_crds, kube_cluster, start_operator, start_worker, wait_for  # noqa: E402
from zimage_queue import GenerationParams, JobMessage, JobQueue, QueueStats, keys  # noqa: E402
from zimage_queue.server import RedisServer  # noqa: E402

MODEL = "z-image-turbo"
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
FLAT_WITHIN = 0.05
# Figures compared between baseline and end: attribute of Sample -> label.
FIGURES = {
    "used_memory": "redis used_memory (bytes)",
    "dbsize": "redis keys (DBSIZE)",
    "job_records": "job records (zimage:job:*)",
    "job_stream_entries": "job stream entries (XLEN, all priorities)",
    "events": "events stream (XLEN)",
    "dead_letter": "dead-letter stream (XLEN)",
    "operator_rss_kb": "operator RSS (KiB)",
}


# What operator/Dockerfile sets for the operator process beyond the chart's ZIMAGE_* settings.
OPERATOR_IMAGE_ENV = {"MALLOC_ARENA_MAX": "2"}


@dataclass(frozen=True)
class Plan:
    jobs: int = 20_000
    cr_share: float = 0.1  # of the jobs, created as ImageJobs; the rest enqueued straight onto the queue
    workers: int = 2
    waves: int = 10  # the warm-up wave included
    # The warm-up wave's share of the jobs; 0: the baseline is the idle system before the first job (one
    # retention wait less, for the smoke test; memory and RSS then include the warm-up's one-off growth).
    warmup_share: float = 0.1
    job_retention_seconds: int = 60  # ZIMAGE_JOB_RETENTION_SECONDS (the operator's minimum)
    events_retention_seconds: float = 5.0
    events_trim_seconds: float = 1.0
    ttl_seconds_after_finished: int = 5  # the operator's default, so ImageJobs carry none of their own
    cr_batch: int = 200  # ImageJobs per kubectl create
    wave_timeout_seconds: float = 1800.0
    retention_margin_seconds: float = 3.0
    worker_env: tuple[tuple[str, str], ...] = ()  # extra environment of the worker processes
    state_dir: Path | None = None  # where the test bed, logs and images go (default: a temporary directory)
    verbose: bool = True

    @property
    def retention_seconds(self) -> float:
        """How long after the last job finished every record, event and ImageJob has had time to go."""
        return (
            max(self.job_retention_seconds, self.events_retention_seconds + self.events_trim_seconds)
            + self.retention_margin_seconds
        )

    def wave_sizes(self) -> list[int]:
        warmup = round(self.jobs * self.warmup_share)
        rest = self.jobs - warmup
        main = self.waves - 1 if warmup else self.waves
        sizes = [rest // main + (1 if i < rest % main else 0) for i in range(main)]
        return ([warmup] if warmup else []) + [s for s in sizes if s]


@dataclass(frozen=True)
class Sample:
    label: str
    jobs_done: int
    seconds: float
    used_memory: int
    dbsize: int
    job_records: int
    streams: dict[str, int]  # XLEN by stream name (zimage_queue.keys)
    operator_rss_kb: int
    imagejobs: int

    @property
    def job_stream_entries(self) -> int:
        return sum(n for s, n in self.streams.items() if s not in (keys.EVENTS_STREAM, keys.DEAD_LETTER_STREAM))

    @property
    def events(self) -> int:
        return self.streams.get(keys.EVENTS_STREAM, 0)

    @property
    def dead_letter(self) -> int:
        return self.streams.get(keys.DEAD_LETTER_STREAM, 0)

    def figure(self, name: str) -> int:
        return int(getattr(self, name))


@dataclass(frozen=True)
class Growth:
    figure: str
    baseline: int
    end: int
    per_1000_jobs: float
    ratio: float | None  # end / baseline; None when the baseline is 0

    @property
    def flat(self) -> bool:
        return abs(self.end - self.baseline) <= FLAT_WITHIN * self.baseline


@dataclass
class Report:
    plan: Plan
    samples: list[Sample] = field(default_factory=list)
    baseline: Sample | None = None
    end: Sample | None = None
    cr_jobs: int = 0
    queue_jobs: int = 0
    # Job records Redis still holds, after the retention, for ImageJobs that are gone / for queue-path jobs.
    leftover_deleted_job_records: int = 0
    leftover_queue_job_records: int = 0
    # Records still held at the end: the least and most TTL Redis has on them (seconds; -1: none), and states.
    leftover_ttl_range: tuple[int, int] | None = None
    leftover_states: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def growth(self) -> list[Growth]:
        assert self.baseline is not None and self.end is not None
        jobs = max(self.end.jobs_done - self.baseline.jobs_done, 1)
        out = []
        for name in FIGURES:
            b, e = self.baseline.figure(name), self.end.figure(name)
            out.append(Growth(name, b, e, (e - b) * 1000 / jobs, e / b if b else None))
        return out

    def format(self) -> str:
        p = self.plan
        lines = [
            f"soak: {p.jobs} jobs ({self.cr_jobs} as ImageJobs, {self.queue_jobs} straight onto the queue), "
            f"{p.workers} no-op workers, waves {p.wave_sizes()}",
            f"retention: job records {p.job_retention_seconds} s, events {p.events_retention_seconds:g} s "
            f"(trimmed every {p.events_trim_seconds:g} s), ImageJobs {p.ttl_seconds_after_finished} s after finishing",
            "",
            "| sample | jobs done | t (s) | used_memory (KiB) | keys | job records | job streams | events "
            "| dead-letter | ImageJobs | operator RSS (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.samples:
            lines.append(
                f"| {s.label} | {s.jobs_done} | {s.seconds:.0f} | {s.used_memory / 1024:.0f} | {s.dbsize} "
                f"| {s.job_records} | {s.job_stream_entries} | {s.events} | {s.dead_letter} | {s.imagejobs} "
                f"| {s.operator_rss_kb / 1024:.1f} |"
            )
        if self.baseline is not None and self.end is not None:
            jobs = self.end.jobs_done - self.baseline.jobs_done
            lines += [
                "",
                f"growth from baseline ({self.baseline.label}, {self.baseline.jobs_done} jobs) to end "
                f"({self.end.label}, {self.end.jobs_done} jobs): {jobs} jobs",
                "",
                "| figure | baseline | end | growth per 1,000 jobs | end / baseline | verdict |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for g in self.growth():
                ratio = "n/a" if g.ratio is None else f"{g.ratio:.3f}"
                verdict = "flat within 5 %" if g.flat else "NOT flat within 5 %"
                lines.append(
                    f"| {FIGURES[g.figure]} | {g.baseline} | {g.end} | {g.per_1000_jobs:+.1f} | {ratio} | {verdict} |"
                )
        lines += [
            "",
            f"leftover job records for deleted jobs: {self.leftover_deleted_job_records} (of {self.cr_jobs} ImageJobs)",
            f"leftover job records of queue-path jobs: {self.leftover_queue_job_records} (of {self.queue_jobs})",
        ]
        if self.leftover_ttl_range is not None:
            low, high = self.leftover_ttl_range
            states = ", ".join(f"{k} {v}" for k, v in sorted(self.leftover_states.items()))
            lines.append(f"job records left at the end: TTL {low}..{high} s (-1: none); by state: {states}")
        lines.append(f"wall time: {self.seconds:.0f} s")
        return "\n".join(lines)


class Soak:
    """One run: the stack is up, jobs go in wave by wave."""

    def __init__(self, plan: Plan, kube: Kube, ns: str, url: str, ps: Processes, operator_pid: int) -> None:
        self.plan = plan
        self.kube = kube
        self.ns = ns
        self.ps = ps
        self.operator_pid = operator_pid
        self.r: Any = redis.Redis.from_url(url)
        self.q = JobQueue.from_url(url)
        self.queue = keys.queue_name(ns, MODEL)
        self.t0 = time.monotonic()
        self.report = Report(plan)
        self.cr_uids: dict[str, str] = {}  # name -> uid
        self.queue_uids: list[str] = []
        self.done = 0
        self.seq = 0

    def log(self, msg: str) -> None:
        if self.plan.verbose:
            print(f"[soak {time.monotonic() - self.t0:6.0f} s] {msg}", flush=True)

    # -- submitting -------------------------------------------------------------------------------------
    def create_imagejobs(self, names: list[str]) -> None:
        items = [
            {
                "apiVersion": "zimage.dev/v1alpha1",
                "kind": "ImageJob",
                "metadata": {"name": n},
                "spec": {"model": MODEL, "prompt": n, "width": 64, "height": 64, "steps": 1},
            }
            for n in names
        ]
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        out = self.kube.kubectl(
            "create", "-n", self.ns, "-f", "-", "-o", 'jsonpath={.metadata.name} {.metadata.uid}{"\\n"}',
            input=doc, timeout=300,
        )  # fmt: skip
        for line in out.stdout.split("\n"):
            if line.strip():
                name, uid = line.split()
                self.cr_uids[name] = uid

    def enqueue(self, count: int) -> list[str]:
        uids = []
        for _ in range(count):
            self.seq += 1
            uid = str(uuid.uuid4())
            params = GenerationParams(prompt=f"soak {self.seq}", width=64, height=64, steps=1, seed=self.seq)
            self.q.enqueue(
                JobMessage(uid=uid, namespace=self.ns, name=f"q-{self.seq}", queue=self.queue, params=params)
            )
            uids.append(uid)
        self.queue_uids += uids
        return uids

    def wave(self, size: int) -> tuple[list[str], list[str]]:
        """Submit ``size`` jobs: ImageJobs in batches, the queue-path jobs between the batches."""
        crs = round(size * self.plan.cr_share)
        queued = size - crs
        names = [f"soak-{self.seq + i}" for i in range(crs)]
        self.seq += crs
        batches = max(1, -(-crs // self.plan.cr_batch))
        queue_uids: list[str] = []
        for b in range(batches):
            batch = names[b * self.plan.cr_batch : (b + 1) * self.plan.cr_batch]
            if batch:
                self.create_imagejobs(batch)
            queue_uids += self.enqueue(queued * (b + 1) // batches - len(queue_uids))
        self.report.cr_jobs += crs
        self.report.queue_jobs += queued
        return names, queue_uids

    # -- observing --------------------------------------------------------------------------------------
    def imagejob_phases(self) -> dict[str, str]:
        out = self.kube.kubectl(
            "get", "ij", "-n", self.ns, "-o",
            'jsonpath={range .items[*]}{.metadata.name} {.status.phase}{"\\n"}{end}', timeout=120,
        )  # fmt: skip
        phases = {}
        for line in out.stdout.split("\n"):
            name, _, phase = line.strip().partition(" ")
            if name:
                phases[name] = phase
        return phases

    def queue_states(self, uids: list[str]) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(uids), 1000):
            pipe = self.r.pipeline(transaction=False)
            for uid in uids[i : i + 1000]:
                pipe.hget(keys.job(uid), keys.F_STATE)
            out += [None if v is None else v.decode() for v in pipe.execute()]
        return out

    def drained(self, names: list[str], queue_uids: list[str]) -> bool:
        # A queue-path record exists from its enqueue on; gone (None) means it expired after finishing.
        states = self.queue_states(queue_uids)
        if any(s not in (None, "succeeded", "failed", "cancelled") for s in states):
            return False
        phases = self.imagejob_phases()
        if any(n in phases and phases[n] not in TERMINAL for n in names):
            return False
        return self.q.stats(self.queue) == QueueStats(queued=0, in_flight=0)

    def events_settled(self) -> bool:
        return events_settled(self.r)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.operator_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def job_record_keys(self) -> list[bytes]:
        return list(self.r.scan_iter(match=keys.job("*"), count=1000))

    def sample(self, label: str) -> Sample:
        streams = {s: int(self.r.xlen(s)) for s in (*keys.streams(self.queue), keys.EVENTS_STREAM)}
        streams[keys.DEAD_LETTER_STREAM] = int(self.r.xlen(keys.DEAD_LETTER_STREAM))
        s = Sample(
            label=label,
            jobs_done=self.done,
            seconds=time.monotonic() - self.t0,
            used_memory=int(self.r.info("memory")["used_memory"]),
            dbsize=int(self.r.dbsize()),
            job_records=len(self.job_record_keys()),
            streams=streams,
            operator_rss_kb=self.rss_kb(),
            imagejobs=len(self.imagejob_phases()),
        )
        self.report.samples.append(s)
        self.log(
            f"sample {label}: {s.jobs_done} done, used_memory {s.used_memory / 1024:.0f} KiB, {s.dbsize} keys, "
            f"{s.job_records} job records, job streams {s.job_stream_entries}, events {s.events}, "
            f"{s.imagejobs} ImageJobs, operator RSS {s.operator_rss_kb / 1024:.1f} MiB"
        )
        return s

    def check_alive(self) -> None:
        for name, proc, _log in self.ps.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n{self.ps.logs()}")

    # -- the run ------------------------------------------------------------------------------------------
    def run_wave(self, index: int, size: int) -> None:
        t = time.monotonic()
        names, queue_uids = self.wave(size)
        self.log(f"wave {index}: {len(names)} ImageJobs + {len(queue_uids)} queue jobs submitted")

        def drained() -> bool:
            self.check_alive()
            return self.drained(names, queue_uids)

        wait_for(drained, self.plan.wave_timeout_seconds, interval=1.0, what=f"wave {index} to drain")
        self.done += size
        self.log(f"wave {index}: drained, {size / (time.monotonic() - t):.0f} jobs/s")

    def settle(self, label: str) -> Sample:
        """Every ImageJob gone by its TTL, every event acked, then the retentions: sample."""
        wait_for(
            lambda: not self.imagejob_phases(),
            self.plan.ttl_seconds_after_finished + 600,
            interval=1.0,
            what="every ImageJob deleted by its ttlSecondsAfterFinished",
        )
        wait_for(self.events_settled, 300, interval=0.5, what="every event read and acked")
        settled = time.monotonic()
        self.log(f"{label}: ImageJobs gone, events acked; waiting {self.plan.retention_seconds:.0f} s of retention")
        time.sleep(max(0.0, settled + self.plan.retention_seconds - time.monotonic()))  # no event marks its end
        return self.sample(label)

    def leftovers(self) -> None:
        left = self.imagejob_phases()
        gone = [uid for name, uid in self.cr_uids.items() if name not in left]
        rep = self.report
        rep.leftover_deleted_job_records = self.count_existing(gone)
        rep.leftover_queue_job_records = self.count_existing(self.queue_uids)
        records = self.job_record_keys()
        pipe = self.r.pipeline(transaction=False)
        for key in records:
            pipe.ttl(key)
            pipe.hget(key, keys.F_STATE)
        replies = pipe.execute()
        ttls = [int(t) for t in replies[::2]]
        states: dict[str, int] = {}
        for state in replies[1::2]:
            st = "?" if state is None else state.decode()
            states[st] = states.get(st, 0) + 1
        rep.leftover_ttl_range = (min(ttls), max(ttls)) if ttls else None
        rep.leftover_states = states

    def count_existing(self, uids: list[str]) -> int:
        n = 0
        for i in range(0, len(uids), 1000):
            pipe = self.r.pipeline(transaction=False)
            for uid in uids[i : i + 1000]:
                pipe.exists(keys.job(uid))
            n += sum(int(x) for x in pipe.execute())
        return n

    def run(self) -> Report:
        waves = self.plan.wave_sizes()
        if self.plan.warmup_share > 0:
            self.run_wave(0, waves[0])
            self.sample("warm-up drained")
            self.report.baseline = self.settle("baseline")
            waves = waves[1:]
        else:
            self.report.baseline = self.sample("baseline (idle)")
        first = 1 if self.plan.warmup_share > 0 else 0
        for i, size in enumerate(waves, start=first):
            self.run_wave(i, size)
            self.sample(f"wave {i} drained")
        self.report.end = self.settle("end")
        self.leftovers()
        self.report.seconds = time.monotonic() - self.t0
        return self.report


def _get(info: dict[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def events_settled(r: redis.Redis) -> bool:
    """Every group has read and acked every event (what the trim waits for)."""
    try:
        groups = r.xinfo_groups(keys.EVENTS_STREAM)
    except redis.ResponseError:
        return True
    return all(int(_get(g, "lag") or 0) == 0 and int(_get(g, "pending") or 0) == 0 for g in groups)


def operator_image_env() -> dict[str, str]:
    """What operator/Dockerfile sets for the operator process (a caller's MALLOC_ARENA_MAX wins)."""
    return {k: os.environ.get(k, v) for k, v in OPERATOR_IMAGE_ENV.items()}


@contextmanager
def cluster_with_crds(state: Path, kube: Kube | None) -> Iterator[Kube]:
    """``kube`` as given (CRDs installed), else KUBECONFIG's cluster or a fresh test bed in ``state``."""
    if kube is not None:
        yield kube
        return
    with kube_cluster(state / "kube") as k:
        yield install_crds(k)


def run(plan: Plan, kube: Kube | None = None) -> Report:
    """Run the soak on ``kube`` (CRDs installed), else on KUBECONFIG's cluster or a fresh test bed."""
    with tempfile.TemporaryDirectory(prefix="zimage-soak-") as tmp:
        state = plan.state_dir or Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        with cluster_with_crds(state, kube) as k, RedisServer() as srv:
            ns = f"soak-{os.getpid()}-{random.randrange(10**4)}"
            k.kubectl("create", "namespace", ns)
            ps = Processes(state)
            try:
                k.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
                operator = start_operator(
                    ps, k, srv.url, ns,
                    ZIMAGE_JOB_RETENTION_SECONDS=str(plan.job_retention_seconds),
                    ZIMAGE_EVENTS_RETENTION_SECONDS=str(plan.events_retention_seconds),
                    ZIMAGE_EVENTS_TRIM_SECONDS=str(plan.events_trim_seconds),
                    ZIMAGE_DEFAULT_TTL_SECONDS_AFTER_FINISHED=str(plan.ttl_seconds_after_finished),
                    **operator_image_env(),
                )  # fmt: skip
                queue = keys.queue_name(ns, MODEL)
                for _ in range(plan.workers):
                    # With the operator's retention, as the worker Deployment the operator builds sets it.
                    retention = {"ZIMAGE_JOB_RETENTION_SECONDS": str(plan.job_retention_seconds)}
                    start_worker(
                        ps,
                        srv.url,
                        queue,
                        state / "images",
                        ZIMAGE_MODEL_SOURCE="noop",
                        **{**retention, **dict(plan.worker_env)},
                    )
                q = JobQueue.from_url(srv.url)
                wait_for(lambda: len(q.workers(queue)) >= plan.workers, 120, what=f"{plan.workers} workers up")
                r = redis.Redis.from_url(srv.url)
                wait_for(lambda: r.exists(keys.OPERATOR_LEASE), 120, what="the operator to take its lease")
                wait_for(lambda: r.exists(keys.EVENTS_STREAM), 120, what="the operator to read events")
                return Soak(plan, k, ns, srv.url, ps, operator.pid).run()
            except BaseException:
                print(ps.logs(), file=sys.stderr)
                raise
            finally:
                ps.stop_all()
                k.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=None, help="jobs in all (default 20000; --quick 1000)")
    p.add_argument("--cr-share", type=float, default=0.1, help="share of the jobs created as ImageJobs")
    p.add_argument("--workers", type=int, default=2, help="no-op worker processes")
    p.add_argument("--waves", type=int, default=10, help="waves, the warm-up wave included")
    p.add_argument("--warmup-share", type=float, default=0.1, help="share of the jobs in the warm-up wave")
    p.add_argument("--job-retention", type=int, default=60, help="ZIMAGE_JOB_RETENTION_SECONDS (min 60)")
    p.add_argument(
        "--worker-env", type=_env_pair, action="append", default=[], metavar="K=V", help="extra worker environment"
    )
    p.add_argument("--quick", action="store_true", help="the short form: 1000 jobs")
    p.add_argument("--state-dir", type=Path, default=None, help="keep the test bed state and logs here")
    args = p.parse_args(argv)
    plan = Plan(
        jobs=args.jobs or (1000 if args.quick else 20_000),
        cr_share=args.cr_share,
        workers=args.workers,
        waves=args.waves,
        warmup_share=args.warmup_share,
        job_retention_seconds=args.job_retention,
        worker_env=tuple(args.worker_env),
        state_dir=args.state_dir,
    )
    if not 0 <= plan.cr_share <= 1 or not 0 <= plan.warmup_share < 1 or plan.jobs < plan.waves:
        p.error("--cr-share in [0, 1], --warmup-share in [0, 1), at least one job per wave")
    report = run(plan)
    print()
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
