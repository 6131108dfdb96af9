"""CR-path scale: N ImageJobs through the API server next to N jobs on the bulk path, no-op workers.

A private ``redis-server``, the Kubernetes test bed (or ``KUBECONFIG``) with the CRDs, the operator process as
the image starts it (``MALLOC_ARENA_MAX=2``) with short retentions, the example ModelDeployment and no-op
worker processes (``ZIMAGE_MODEL_SOURCE=noop``). Then, side by side in one run:

* the CR path: N ImageJobs, each labelled ``zimage.dev/bench=<run id>``, POSTed as raw JSON by an async
  HTTP/1.1 keep-alive pool (``--concurrency`` in flight) with the kubeconfig's credentials, so creation is not
  the bottleneck. A watch on the namespace's ImageJobs, opened before the first create, records when each job
  was first seen Queued and Succeeded; the worker's finish time comes from the job's Redis record (the final
  event's ``ts``; ``status.finishedAt`` has whole seconds only and is the fallback). End-to-end jobs/s =
  N / (last Succeeded seen - first create); status lag = Succeeded seen - worker finished. After the run every
  job is deleted by label (``deletecollection``, retried, falling back to batched deletes), timed;
* the bulk path: today the queue path (``JobQueue.enqueue`` of a ``JobMessage`` straight onto the model's
  queue, as ``bench/soak.py`` does); done when the job's Redis record holds its final event. ``BULK_PATHS`` is
  the hook to switch it to the API's bulk mode once that exists.

Around each path it scrapes the API server's ``/metrics`` (``apiserver_request_total``) and diffs it by
(verb, resource, subresource): per job, with the bench's own requests (counted by its client) and the
background rate (measured in an idle window before the first job: leases, controllers, the idle operator)
taken out, what is left is the operator's. The operator's RSS (``/proc/<pid>/status`` VmRSS) is sampled
every 0.2 s (start, peak, end); after the jobs are gone and the retentions have elapsed Redis ``used_memory``,
``DBSIZE``, the streams' ``XLEN`` and the job records left are sampled.

``--hold``: the N (default 10,000) ImageJobs are created with no worker running; once the operator has
admitted all of them (phase Queued) the operator's RSS is sampled with them live, then the workers start and
drain them. ``--rounds R`` repeats the CR path (create, finish, delete, retention) R times and prints the RSS
at the end of each round.

A benchmark, not a test: it measures and prints (``tests/integration/test_bench_crs.py`` runs a short form
and checks the properties). Run from the repository root: ``.venv/bin/python -m bench.crs [--jobs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import math
import os
import queue as queue_mod
import random
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # conftest (the test bed helpers) lives at the repository root
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402
from kubernetes import client as kclient  # noqa: E402
from kubernetes import config as kconfig  # noqa: E402

from bench.soak import cluster_with_crds, events_settled, operator_image_env  # noqa: E402
from conftest import REPO, Kube, Processes, start_operator, start_worker, wait_for  # noqa: E402
from zimage_queue import GenerationParams, JobMessage, JobQueue, keys  # noqa: E402
from zimage_queue.server import RedisServer  # noqa: E402

MODEL = "z-image-turbo"
LABEL = "zimage.dev/bench"
GROUP, VERSION, PLURAL = "zimage.dev", "v1alpha1", "imagejobs"
ADMITTED = {"Queued", "Running", "Succeeded", "Failed", "Cancelled"}  # phases an admitted job can be in
FAILED = {"Failed", "Cancelled"}
# The resources whose requests the operator makes per job; the settle wait watches them go quiet.
JOB_RESOURCES = {"imagejobs", "events", "modeldeployments"}
Key = tuple[str, str, str]  # (verb, resource, subresource) as apiserver_request_total labels them


@dataclass(frozen=True)
class Plan:
    jobs: int = 5000
    workers: int = 2
    hold: bool = False  # create with no worker running, sample RSS once all are admitted, then drain
    rounds: int = 1  # CR-path rounds (create, finish, delete, retention)
    bulk: tuple[str, ...] = ("queue",)  # the paths next to the CR path (BULK_PATHS keys), run after it
    concurrency: int = 48  # creates in flight (HTTP/1.1 keep-alive connections)
    # ImageJob creates per second (0: as fast as the API server answers). Below the API server's ceiling the
    # status lag is the operator's own; at the ceiling it is mostly the API server's queue.
    rate: float = 0.0
    job_retention_seconds: int = 60  # ZIMAGE_JOB_RETENTION_SECONDS (the operator's minimum)
    events_retention_seconds: float = 5.0
    events_trim_seconds: float = 1.0
    retention_margin_seconds: float = 3.0
    # "each": the retentions are waited out after every round and path (clean per-path Redis figures);
    # "end": once, after the last path (one 60 s wait instead of one per path); "none": never (no Redis figures
    # after the retention; the default test's short form, bench/soak.py checks the retention).
    settle: str = "each"
    idle_window_seconds: float = 5.0  # the background request rate is measured over this
    run_timeout_seconds: float = 1800.0
    stall_seconds: float = 120.0  # give up when no job moved on for this long
    delete_timeout_seconds: float = 600.0
    state_dir: Path | None = None  # where the test bed, logs and images go (default: a temporary directory)
    verbose: bool = True
    # Before the operator starts: the same creates into a namespace nobody watches, to measure what the API
    # server alone takes (the ceiling the CR path's end-to-end rate is bound by on this machine).
    ceiling: bool = True

    @property
    def retention_seconds(self) -> float:
        """How long after a job finished its record and events have had time to go."""
        return (
            max(self.job_retention_seconds, self.events_retention_seconds + self.events_trim_seconds)
            + self.retention_margin_seconds
        )


# -- pure figures ------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, min(len(s), math.ceil(q / 100 * len(s))))
    return s[rank - 1]


@dataclass(frozen=True)
class RequestTotals:
    """``apiserver_request_total`` summed by (verb, resource, subresource)."""

    clients: dict[Key, float]  # requests of every client that is not the control plane's own
    errors: dict[Key, float]  # of those, answered with a code >= 400
    system: dict[Key, float]  # the control plane's own (label system_client: kube-apiserver, -controller-manager)


_SAMPLE = re.compile(r"^apiserver_request_total\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_request_totals(text: str) -> RequestTotals:
    """From the API server's /metrics text (some MB: only the ``apiserver_request_total`` lines are parsed)."""
    out = RequestTotals({}, {}, {})
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m[1]))
        k = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        value = float(m[2])
        into = out.system if labels.get("system_client") else out.clients
        into[k] = into.get(k, 0.0) + value
        if into is out.clients and labels.get("code", "").isdigit() and int(labels["code"]) >= 400:
            out.errors[k] = out.errors.get(k, 0.0) + value
    return out


def diff(after: dict[Key, float], before: dict[Key, float]) -> dict[Key, float]:
    out = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
    return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class RequestRow:
    verb: str
    resource: str
    subresource: str
    total: float  # every request in the window but the control plane's own
    errors: float  # of which answered >= 400
    system: float  # the control plane's own (kube-apiserver, kube-controller-manager): not in `total`
    bench: float  # the bench's own (counted by its client)
    background: float  # the idle rate (the idle operator) x the window
    per_job: float  # what is left (the operator's), per job

    @property
    def label(self) -> str:
        return key_label((self.verb, self.resource, self.subresource))


def key_label(k: Key) -> str:
    verb, resource, sub = k
    return f"{verb} {resource}{'/' if resource and sub else ''}{sub}"


@dataclass(frozen=True)
class Window:
    """A scrape of the API server's request counters and the bench's own count just after it; with the CPU
    seconds the processes had used by then."""

    at: float
    totals: RequestTotals
    own: dict[Key, float]
    cpu: dict[str, float] = field(default_factory=dict)


def cpu_per_job(start: Window, end: Window, jobs: int) -> dict[str, float]:
    """CPU milliseconds per job of each process measured at both ends."""
    return {p: (end.cpu[p] - start.cpu[p]) * 1000 / max(jobs, 1) for p in end.cpu if p in start.cpu}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (``/proc/<pid>/stat``); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def local_control_plane(server: str) -> dict[str, int]:
    """The pids of a kube-apiserver on this machine serving ``server`` and of the etcd it uses (the test bed);
    empty for a remote cluster."""
    url = urlparse(server)
    if url.hostname not in ("127.0.0.1", "localhost", "::1") or not url.port:
        return {}
    cmdlines: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError):
                cmdlines[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
    out: dict[str, int] = {}
    etcd_port = ""
    for pid, argv in cmdlines.items():
        if argv and argv[0].endswith("kube-apiserver") and f"--secure-port={url.port}" in argv:
            out["kube-apiserver"] = pid
            etcd = next((a.split("=", 1)[1] for a in argv if a.startswith("--etcd-servers=")), "")
            etcd_port = str(urlparse(etcd.split(",")[0]).port or "")
    if etcd_port:
        for pid, argv in cmdlines.items():
            if (
                argv
                and argv[0].endswith("etcd")
                and any(a.endswith(f":{etcd_port}") for a in argv)  # its client URL, as one argument or two
            ):
                out["etcd"] = pid
    return out


def request_rows(
    start: Window, end: Window, background_rate: dict[Key, float], jobs: int
) -> tuple[list[RequestRow], float]:
    """Per (verb, resource, subresource): the window's requests, and per job what neither the bench, the
    control plane nor the idle rate explains. The window's own scrapes are in both counts: the API server
    counts a request once answered, so a scrape is in the next scrape's figures and the bench's count."""
    seconds = end.at - start.at
    total = diff(end.totals.clients, start.totals.clients)
    errors = diff(end.totals.errors, start.totals.errors)
    system = diff(end.totals.system, start.totals.system)
    bench = diff(end.own, start.own)
    rows = []
    for k in sorted(set(total) | set(bench) | set(system)):
        t, own, bg = total.get(k, 0.0), bench.get(k, 0.0), background_rate.get(k, 0.0) * seconds
        per_job = max(0.0, t - own - bg) / max(jobs, 1)
        rows.append(RequestRow(*k, t, errors.get(k, 0.0), system.get(k, 0.0), own, bg, per_job))
    return rows, seconds


@dataclass(frozen=True)
class RedisSample:
    used_memory: int
    dbsize: int
    job_records: int  # zimage:job:* keys
    streams: dict[str, int]  # XLEN by stream
    records_left: int  # of this path's own jobs


@dataclass
class PathResult:
    """One run of N jobs through one path."""

    path: str  # "CR path", "queue path", ...
    jobs: int
    round: int = 1
    succeeded: int = 0
    failed: int = 0
    create_seconds: float = 0.0  # first create sent .. last create answered
    e2e_seconds: float = 0.0  # first create (or, with --hold, the workers up) .. last job seen done
    e2e_from: str = "first create"
    latency_p50: float | None = None  # submit answered .. seen done, per job
    latency_p99: float | None = None
    lag_p50: float | None = None  # seen done - worker finished, per job
    lag_p99: float | None = None
    lag_max: float | None = None
    lag_fallbacks: int = 0  # jobs whose finish time came from status.finishedAt (record gone)
    requests: list[RequestRow] = field(default_factory=list)
    cpu_ms_per_job: dict[str, float] = field(default_factory=dict)  # operator, kube-apiserver, etcd, bench
    delete_requests: list[RequestRow] = field(default_factory=list)
    window_seconds: float = 0.0
    delete_seconds: float | None = None
    delete_method: str = ""
    rss_start_kb: int = 0
    rss_peak_kb: int = 0
    rss_held_kb: int | None = None  # --hold: with every job admitted and none run
    rss_end_kb: int = 0
    redis_after: RedisSample | None = None
    watch_events: int = 0
    watch_restarts: int = 0
    create_retries: int = 0

    @property
    def creation_per_s(self) -> float:
        return self.jobs / self.create_seconds if self.create_seconds else 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.succeeded / self.e2e_seconds if self.e2e_seconds else 0.0

    def operator_per_job(self, resource: str | None = None, verb: str | None = None) -> float:
        return sum(
            r.per_job
            for r in self.requests
            if (resource is None or r.resource == resource) and (verb is None or r.verb == verb)
        )

    def api_total_per_job(self) -> float:
        return sum(r.total for r in self.requests) / max(self.jobs, 1)


@dataclass
class Ceiling:
    """The API server alone: the same creates with no operator, no watch and no worker."""

    jobs: int
    seconds: float
    cpu_ms_per_create: dict[str, float]  # kube-apiserver, etcd (a local test bed only)

    @property
    def creates_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        cpu = ", ".join(f"{p} {ms:.1f} CPU-ms" for p, ms in sorted(self.cpu_ms_per_create.items()))
        return (
            f"API server alone (no operator, no watch, no worker): {self.jobs} creates in {self.seconds:.1f} s = "
            f"{self.creates_per_s:.0f}/s" + (f"; per create {cpu}" if cpu else "")
        )


def measure_ceiling(kube: Kube, plan: Plan) -> Ceiling:
    """Create ``plan.jobs`` ImageJobs into a fresh namespace nobody watches, time it, then delete them."""
    api = Api(kube.env["KUBECONFIG"])
    ns = f"crs-ceiling-{os.getpid()}-{random.randrange(10**4)}"
    kube.kubectl("create", "namespace", ns)
    try:
        pids = local_control_plane(api.base)
        names = [f"c-{i}" for i in range(plan.jobs)]
        before = {p: cpu_seconds(pid) or 0.0 for p, pid in pids.items()}
        t0 = time.monotonic()
        create_imagejobs(api, ns, names, "ceiling", plan.concurrency, {})
        seconds = time.monotonic() - t0
        cpu = {p: ((cpu_seconds(pid) or 0.0) - before[p]) * 1000 / plan.jobs for p, pid in pids.items()}
        return Ceiling(plan.jobs, seconds, cpu)
    finally:
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@dataclass
class Report:
    plan: Plan
    run_id: str = ""
    cr: list[PathResult] = field(default_factory=list)  # one per round
    bulk: list[PathResult] = field(default_factory=list)
    rss_idle_kb: int = 0
    redis_idle: RedisSample | None = None  # before the first job, the workers up (unless --hold)
    background_rate: dict[str, float] = field(default_factory=dict)  # "VERB resource/sub" -> requests/s
    seconds: float = 0.0
    ceiling: Ceiling | None = None

    def to_json(self) -> dict[str, Any]:
        def path(p: PathResult) -> dict[str, Any]:
            d = asdict(p)
            d["creation_per_s"] = p.creation_per_s
            d["jobs_per_s"] = p.jobs_per_s
            d["operator_requests_per_job"] = p.operator_per_job()
            d["event_posts_per_job"] = p.operator_per_job("events", "POST")
            d["api_requests_per_job"] = p.api_total_per_job()
            return d

        plan = asdict(self.plan)
        plan["state_dir"] = str(self.plan.state_dir) if self.plan.state_dir else None
        return {
            "plan": plan,
            "run_id": self.run_id,
            "cr": [path(p) for p in self.cr],
            "bulk": [path(p) for p in self.bulk],
            "rss_idle_kb": self.rss_idle_kb,
            "redis_idle": asdict(self.redis_idle) if self.redis_idle else None,
            "background_rate": self.background_rate,
            "seconds": self.seconds,
            "ceiling": asdict(self.ceiling) if self.ceiling else None,
        }

    def format(self) -> str:
        p = self.plan
        cols = [*self.cr[:1], *self.bulk]
        ratio_to = f"CR / {cols[1].path}" if len(cols) > 1 else ""
        lines = [
            f"crs: {p.jobs} jobs per path, {p.workers} no-op workers, {p.concurrency} creates in flight"
            + (f", paced at {p.rate:g}/s" if p.rate else "")
            + (", --hold (created with no worker running)" if p.hold else "")
            + (f", {p.rounds} CR rounds" if p.rounds > 1 else ""),
            f"retention: job records {p.job_retention_seconds} s, events {p.events_retention_seconds:g} s; "
            f"idle, before the first job: operator RSS {self.rss_idle_kb / 1024:.1f} MiB"
            + (
                f", redis used_memory {self.redis_idle.used_memory / 1024:.0f} KiB, {self.redis_idle.dbsize} keys"
                if self.redis_idle
                else ""
            ),
            *([self.ceiling.line()] if self.ceiling else []),
            "",
            "| figure | " + " | ".join(c.path for c in cols) + (f" | {ratio_to} |" if ratio_to else " |"),
            "|---|" + "---:|" * len(cols) + ("---:|" if ratio_to else ""),
        ]

        def row(label: str, fn: Callable[[PathResult], float | None], fmt: str = "{:.1f}", ratio: bool = True) -> None:
            vals = [fn(c) for c in cols]
            cells = ["n/a" if v is None else fmt.format(v) for v in vals]
            if ratio_to:
                a, b = vals[:2]
                cells.append(f"{a / b:.2f}" if ratio and a is not None and b else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        rss = "{:.1f}"
        row("jobs succeeded", lambda c: c.succeeded, "{:.0f}", ratio=False)
        row("creation/s (submits answered)", lambda c: c.creation_per_s)
        row(f"end-to-end jobs/s (from {cols[0].e2e_from})", lambda c: c.jobs_per_s)
        row("job latency p50 (s, submit to seen done)", lambda c: c.latency_p50, "{:.2f}")
        row("job latency p99 (s)", lambda c: c.latency_p99, "{:.2f}")
        row("status lag p50 (s, seen Succeeded - worker finished)", lambda c: c.lag_p50, "{:.3f}")
        row("status lag p99 (s)", lambda c: c.lag_p99, "{:.3f}")
        row("status lag max (s)", lambda c: c.lag_max, "{:.3f}")
        row("API requests per job, all", lambda c: c.api_total_per_job(), "{:.2f}")
        row("API requests per job, operator's", lambda c: c.operator_per_job(), "{:.2f}")
        row("  of which Event POSTs", lambda c: c.operator_per_job("events", "POST"), "{:.2f}")
        for proc in ("operator", "kube-apiserver", "etcd", "bench"):
            if any(proc in c.cpu_ms_per_job for c in cols):
                row(f"CPU ms per job, {proc}", lambda c, p=proc: c.cpu_ms_per_job.get(p), "{:.1f}")  # type: ignore[misc]
        row("operator RSS start (MiB)", lambda c: c.rss_start_kb / 1024, rss)
        row("operator RSS with all admitted, none run (MiB)", lambda c: _kb(c.rss_held_kb), rss)
        row("operator RSS peak (MiB)", lambda c: c.rss_peak_kb / 1024, rss)
        row("operator RSS end, after delete + retention (MiB)", lambda c: c.rss_end_kb / 1024, rss)
        row("delete all by label (s)", lambda c: c.delete_seconds, "{:.1f}", ratio=False)
        row("redis used_memory after (KiB)", lambda c: _red(c, lambda r: r.used_memory / 1024), "{:.0f}")
        row("redis keys (DBSIZE) after", lambda c: _red(c, lambda r: r.dbsize), "{:.0f}")
        row("redis stream entries (XLEN, all) after", lambda c: _red(c, lambda r: sum(r.streams.values())), "{:.0f}")
        row("job records left after, of these jobs", lambda c: _red(c, lambda r: r.records_left), "{:.0f}")
        lines.append("")
        for c in cols:
            lines += _request_table(c)
        if len(self.cr) > 1:
            lines += [
                "",
                "CR rounds:",
                "",
                "| round | creation/s | jobs/s | status lag p50 / p99 (s) | delete (s) | RSS start | RSS all admitted "
                "| RSS peak | RSS end (MiB) | used_memory (KiB) | keys |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for c in self.cr:
                r = c.redis_after
                held = "n/a" if c.rss_held_kb is None else f"{c.rss_held_kb / 1024:.1f}"
                lines.append(
                    f"| {c.round} | {c.creation_per_s:.1f} | {c.jobs_per_s:.1f} "
                    f"| {c.lag_p50 or 0:.2f} / {c.lag_p99 or 0:.2f} "
                    f"| {c.delete_seconds or 0:.1f} | {c.rss_start_kb / 1024:.1f} "
                    f"| {held} | {c.rss_peak_kb / 1024:.1f} | {c.rss_end_kb / 1024:.1f} "
                    f"| {r.used_memory / 1024 if r else 0:.0f} | {r.dbsize if r else 0} |"
                )
        if self.background_rate:
            bg = ", ".join(f"{k} {v:.2f}/s" for k, v in sorted(self.background_rate.items()))
            lines += ["", f"background (idle window, taken out above): {bg}"]
        if any(c.lag_fallbacks for c in cols):
            lines.append(
                "status lag from status.finishedAt (whole seconds) for: "
                + ", ".join(f"{c.path} {c.lag_fallbacks}" for c in cols)
            )
        lines.append(f"wall time: {self.seconds:.0f} s")
        return "\n".join(lines)


def _kb(v: int | None) -> float | None:
    return None if v is None else v / 1024


def _red(c: PathResult, fn: Callable[[RedisSample], float]) -> float | None:
    return None if c.redis_after is None else fn(c.redis_after)


def _request_table(c: PathResult) -> list[str]:
    lines = [
        "",
        f"{c.path} (round {c.round}), API requests per job by verb and resource ({c.window_seconds:.0f} s window; "
        f"bench and background taken out of the last column):",
        "",
        "| request | total | of which >= 400 | bench's own | idle rate x window | operator's per job "
        "| control plane's (not in total) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c.requests:
        if r.total or r.bench or r.system >= c.jobs / 100:
            lines.append(
                f"| {r.label} | {r.total:.0f} | {r.errors:.0f} | {r.bench:.0f} | {r.background:.1f} "
                f"| {r.per_job:.3f} | {r.system:.0f} |"
            )
    lines.append(f"| **operator's, all** | | | | | **{c.operator_per_job():.2f}** | |")
    if c.delete_requests:
        dl = ", ".join(f"{r.label} {r.total:.0f}" for r in c.delete_requests if r.total)
        lines.append(f"delete phase ({c.delete_method}): {dl}")
    return lines


# -- the API server, as the kubeconfig reaches it ------------------------------------------------------------
class Api:
    """Raw HTTP to the API server with the kubeconfig's credentials; counts the bench's own requests."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = kclient.Configuration()
        kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.base = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json", "User-Agent": "zimage-bench-crs"}
        token = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
        if token:
            self.headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        self.ssl = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        )
        if cfg.cert_file:
            self.ssl.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        self._lock = threading.Lock()
        self._own: Counter[Key] = Counter()

    def count(self, verb: str, resource: str, subresource: str = "") -> None:
        with self._lock:
            self._own[(verb, resource, subresource)] += 1

    def own(self) -> dict[Key, float]:
        with self._lock:
            return {k: float(v) for k, v in self._own.items()}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base, verify=self.ssl, headers=self.headers, timeout=timeout)

    def async_client(self, connections: int, timeout: float = 60.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=self.base, verify=self.ssl, headers=self.headers, timeout=timeout, limits=limits
        )

    def jobs_path(self, ns: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"

    def request_totals(self) -> RequestTotals:
        with self.client(30) as c:
            r = c.get("/metrics")
        r.raise_for_status()
        return parse_request_totals(r.text)

    def list_jobs(self, ns: str, selector: str, limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every ImageJob with the label (paged); and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        cont = ""
        with self.client(120) as c:
            while True:
                params = {"labelSelector": selector, "limit": str(limit)}
                if cont:
                    params["continue"] = cont
                r = c.get(self.jobs_path(ns), params=params)
                self.count("LIST", PLURAL)
                r.raise_for_status()
                body = r.json()
                items += body.get("items") or []
                cont = (body.get("metadata") or {}).get("continue") or ""
                if not cont:
                    return items, str(body["metadata"]["resourceVersion"])


# -- observing the CR path --------------------------------------------------------------------------------------
@dataclass
class Seen:
    """What the watch saw of one ImageJob (wall-clock seconds)."""

    uid: str = ""
    added: float | None = None
    admitted: float | None = None
    done: float | None = None
    phase: str = ""
    finished_at: str = ""  # status.finishedAt (whole seconds)
    deleted: float | None = None


class Watcher(threading.Thread):
    """A watch on the bench's ImageJobs (by label) from before the first create to the end of the round."""

    def __init__(self, api: Api, ns: str, selector: str, on_done: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name="crs-watch")
        self.api, self.ns, self.selector, self.on_done = api, ns, selector, on_done
        self.jobs: dict[str, Seen] = {}
        self.lock = threading.Lock()
        self.events = 0
        self.restarts = 0  # watches the server ended (timeouts, a slow reader) or that failed, resumed
        self.connected = threading.Event()
        self._halt = threading.Event()
        self._resp: httpx.Response | None = None
        self.error: BaseException | None = None

    def counts(self) -> tuple[int, int, int, int]:
        """Jobs added, admitted, done (terminal), deleted."""
        with self.lock:
            js = list(self.jobs.values())
        return (
            sum(j.added is not None for j in js),
            sum(j.admitted is not None for j in js),
            sum(j.done is not None for j in js),
            sum(j.deleted is not None for j in js),
        )

    def snapshot(self) -> dict[str, Seen]:
        with self.lock:
            return dict(self.jobs)

    def stop(self) -> None:
        self._halt.set()
        resp = self._resp
        if resp is not None:  # closing the response does not wake a blocked read: shut its socket down
            with suppress(Exception):
                resp.extensions["network_stream"].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        self.join(10)

    def run(self) -> None:
        rv = ""
        while not self._halt.is_set():
            try:
                if not rv:
                    items, rv = self.api.list_jobs(self.ns, self.selector)
                    now = time.time()
                    for obj in items:
                        self._observe("ADDED", obj, now)
                rv = self._watch(rv)
            except Exception as e:
                if self._halt.is_set():
                    return
                self.error = e
                rv = ""
                time.sleep(0.5)
            self.restarts += 1

    def _watch(self, rv: str) -> str:
        params = {
            "labelSelector": self.selector,
            "watch": "1",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "1800",
        }
        with (
            self.api.client(timeout=1900) as c,
            c.stream("GET", self.api.jobs_path(self.ns), params=params) as resp,
        ):
            self._resp = resp
            try:
                resp.raise_for_status()
                self.connected.set()
                for line in resp.iter_lines():
                    if not line:
                        continue
                    ev = json.loads(line)
                    typ, obj = ev.get("type"), ev.get("object") or {}
                    if typ == "ERROR":  # 410 Gone: too old a resourceVersion; list again
                        return ""
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if typ != "BOOKMARK":
                        self.events += 1
                        self._observe(str(typ), obj, time.time())
            finally:
                self._resp = None
                self.api.count("WATCH", PLURAL)  # apiserver_request_total counts a watch when it ends
        return rv

    def _observe(self, typ: str, obj: dict[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        status = obj.get("status") or {}
        phase = status.get("phase") or ""
        newly_done = False
        with self.lock:
            s = self.jobs.setdefault(name, Seen())
            s.uid = meta.get("uid", s.uid)
            if s.added is None:
                s.added = now
            if phase:
                s.phase = phase
            if phase in ADMITTED and s.admitted is None:
                s.admitted = now
            if phase in ("Succeeded", *FAILED) and s.done is None:
                s.done = now
                s.finished_at = status.get("finishedAt") or ""
                newly_done = True
            if typ == "DELETED" and s.deleted is None:
                s.deleted = now
        if newly_done:
            self.on_done(s.uid)


class FinishTimes(threading.Thread):
    """The worker's finish time of each job, read from its Redis record (the final event's ``ts``) soon after
    it is done, well within the record's retention."""

    def __init__(self, q: JobQueue, interval: float = 0.3) -> None:
        super().__init__(daemon=True, name="crs-finish-times")
        self.q = q
        self.interval = interval
        self.inbox: queue_mod.SimpleQueue[str] = queue_mod.SimpleQueue()
        self.pending: set[str] = set()
        self.ts: dict[str, float] = {}
        self.done_at: dict[str, float] = {}  # when the bench first saw the record final (the bulk path's "seen")
        # The final event's type, kept here: a bulk job's record may expire (the retention runs from its
        # enqueue) before the last jobs of a long submit are done.
        self.outcome: dict[str, str] = {}
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, uid: str) -> None:
        self.inbox.put(uid)

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending) + self.inbox.qsize()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        while True:
            stopping = self._halt.is_set()
            with suppress(queue_mod.Empty):
                while True:
                    uid = self.inbox.get_nowait()
                    if uid not in self.ts:
                        self.pending.add(uid)
            if self.pending:
                try:
                    finals = self.q.finals(sorted(self.pending))
                except redis.RedisError:
                    finals = {}
                now = time.time()
                with self.lock:
                    for uid, f in finals.items():
                        self.ts[uid] = f.event.ts
                        self.done_at[uid] = now
                        self.outcome[uid] = f.event.type
                        self.pending.discard(uid)
            if stopping:
                return
            self._halt.wait(self.interval)


class RssSampler(threading.Thread):
    """The operator's VmRSS every ``interval`` seconds; the peak since the last ``take_peak``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="crs-rss")
        self.pid, self.interval = pid, interval
        self.lock = threading.Lock()
        self.peak = 0
        self._halt = threading.Event()

    def now(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def take_peak(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, self.now()
        return max(peak, self.now())

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            v = self.now()
            with self.lock:
                self.peak = max(self.peak, v)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# -- submitting ------------------------------------------------------------------------------------------------
def imagejob(name: str, run_id: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageJob",
        "metadata": {"name": name, "labels": {LABEL: run_id}},
        "spec": {"model": MODEL, "prompt": name, "width": 64, "height": 64, "steps": 1},
    }


RETRIED_STATUS = (429, 500, 502, 503, 504)  # throttles and server errors: the same request again


async def post_retrying(
    c: httpx.AsyncClient,
    path: str,
    *,
    ok: Callable[[int, int], bool],
    what: str,
    answered: Callable[[], None] | None = None,
    attempts: int = 8,
    **request: Any,
) -> tuple[httpx.Response, int]:
    """POST until ``ok(status, attempt)``, retrying dropped connections and RETRIED_STATUS with jittered
    backoff; the response and the attempt it took (0: the first). ``answered`` is called for every answer."""
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        try:
            r = await c.post(path, **request)
        except httpx.TransportError:
            continue
        if answered is not None:
            answered()
        if ok(r.status_code, attempt):
            return r, attempt
        if r.status_code not in RETRIED_STATUS:
            raise RuntimeError(f"{what}: {r.status_code} {r.text[:500]}")
    raise RuntimeError(f"{what}: gave up after {attempts} attempts")


async def _create_all(
    api: Api,
    ns: str,
    names: list[str],
    run_id: str,
    concurrency: int,
    answered: dict[str, float],
    rate: float = 0.0,
) -> int:
    """POST every ImageJob, ``concurrency`` in flight; retries throttles, 5xx and transport errors. Returns
    the retries made."""
    path = api.jobs_path(ns)
    todo = iter(names)
    retries = 0

    async def one(c: httpx.AsyncClient, name: str) -> None:
        nonlocal retries
        body = json.dumps(imagejob(name, run_id)).encode()
        _, attempt = await post_retrying(
            c,
            path,
            # 409 on a retry: the first went in
            ok=lambda code, attempt: code == 201 or (code == 409 and attempt > 0),
            what=f"creating ImageJob {name}",
            answered=lambda: api.count("POST", PLURAL),
            content=body,
            headers={"Content-Type": "application/json"},
        )
        retries += attempt
        answered[name] = time.time()

    t0 = time.monotonic()
    started = 0

    async def lane(c: httpx.AsyncClient) -> None:
        nonlocal started
        for name in todo:  # the lanes share one iterator
            if rate > 0:  # paced: the i-th create starts no earlier than i/rate seconds in
                started += 1
                await asyncio.sleep(max(0.0, t0 + (started - 1) / rate - time.monotonic()))
            await one(c, name)

    async with api.async_client(concurrency) as c:
        await asyncio.gather(*(lane(c) for _ in range(concurrency)))
    return retries


def create_imagejobs(
    api: Api,
    ns: str,
    names: list[str],
    run_id: str,
    concurrency: int,
    answered: dict[str, float],
    rate: float = 0.0,
) -> int:
    return asyncio.run(_create_all(api, ns, names, run_id, concurrency, answered, rate))


def enqueue_on_queue(bench: Bench, count: int, submitted: Callable[[str], None], bulk: bool = False) -> list[str]:
    """The queue path: ``JobQueue.enqueue`` of a ``JobMessage`` straight onto the model's queue (what the API's
    local mode or any other producer does); with ``bulk`` marked as the API's bulk mode marks its jobs (no
    ImageJob behind them: the operator skips their events). Returns the job uids, in order."""
    uids = []
    for i in range(count):
        uid = str(uuid.uuid4())
        params = GenerationParams(prompt=f"crs {i}", width=64, height=64, steps=1, seed=i)
        bench.q.enqueue(
            JobMessage(uid=uid, namespace=bench.ns, name=f"q-{i}", queue=bench.queue, params=params, bulk=bulk)
        )
        submitted(uid)
        uids.append(uid)
    return uids


def enqueue_bulk_marked(bench: Bench, count: int, submitted: Callable[[str], None]) -> list[str]:
    return enqueue_on_queue(bench, count, submitted, bulk=True)


def submit_via_api(bench: Bench, count: int, submitted: Callable[[str], None]) -> list[str]:
    """The API's bulk mode: ``POST /v1/jobs`` with ``"mode": "bulk"`` to a ``zimage-api`` process (its own
    process, as in the chart; rate limit and per-tenant cap out of the way), ``--concurrency`` in flight."""
    from zimage_queue.server import free_port

    port, key = free_port(), f"zk_bench_{uuid.uuid4().hex}"
    env = {
        **bench.kube.env,
        "ZIMAGE_REDIS_URL": bench.url,
        "ZIMAGE_API_NAMESPACE": bench.ns,
        "ZIMAGE_API_PORT": str(port),
        "ZIMAGE_API_HOST": "127.0.0.1",
        "ZIMAGE_API_DEV_KEY": key,
        "ZIMAGE_API_DEV_TENANT": "bench",
        "ZIMAGE_API_RATE_PER_SECOND": "1000000",
        "ZIMAGE_API_RATE_BURST": "1000000",
        "ZIMAGE_API_MAX_CONCURRENT_JOBS": str(10 * count),
        "ZIMAGE_JOB_RETENTION_SECONDS": str(bench.plan.job_retention_seconds),
    }
    proc = bench.ps.start("api", [str(Path(sys.executable).parent / "zimage-api")], env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError(f"zimage-api exited with {proc.returncode}") from None
            return False

    wait_for(ready, 60, 0.2, "the API to be ready")
    names: list[str] = []

    async def all_jobs() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=bench.plan.concurrency)
        todo = iter(range(count))
        async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as c:

            async def lane() -> None:
                for i in todo:
                    body = {"model": MODEL, "prompt": f"b-{i}", "width": 64, "height": 64, "steps": 1, "mode": "bulk"}
                    # A retried submit (a dropped keep-alive connection, a 5xx) is the same job: Idempotency-Key.
                    headers = {"Idempotency-Key": f"{bench.run_id}-{i}"}
                    r, _ = await post_retrying(
                        c, "/v1/jobs", ok=lambda code, _a: code in (200, 202), what="POST /v1/jobs", json=body,
                        headers=headers,
                    )  # fmt: skip
                    name = r.json()["id"]
                    obj = json.loads(bench.r.hget(keys.bulk_job(bench.ns, name), "object"))
                    names.append(obj["metadata"]["uid"])
                    submitted(obj["metadata"]["uid"])

            await asyncio.gather(*(lane() for _ in range(bench.plan.concurrency)))

    try:
        asyncio.run(all_jobs())
    finally:
        proc.terminate()
    return names


BulkSubmit = Callable[["Bench", int, Callable[[str], None]], list[str]]
# The bulk path next to the CR path: name -> (label in the table, submitter). A submitter puts ``count`` jobs
# in without an ImageJob, calls ``submitted(uid)`` as each submit is answered and returns their uids;
# the bench then waits for each job's Redis record to hold its final event. "api" is the API's bulk mode
# (``POST /v1/jobs`` with ``"mode": "bulk"``); "queue-bulk" is its queue side without the HTTP front door.
BULK_PATHS: dict[str, tuple[str, BulkSubmit]] = {
    "queue": ("queue path", enqueue_on_queue),
    "queue-bulk": ("queue path, bulk-marked", enqueue_bulk_marked),
    "api": ("API bulk mode", submit_via_api),
}


# -- the run ---------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, plan: Plan, kube: Kube, ns: str, url: str, ps: Processes, operator_pid: int) -> None:
        self.plan, self.kube, self.ns, self.url, self.ps = plan, kube, ns, url, ps
        self.api = Api(kube.env["KUBECONFIG"])
        self.r: Any = redis.Redis.from_url(url)
        self.q = JobQueue.from_url(url)
        self.queue = keys.queue_name(ns, MODEL)
        self.operator_pid = operator_pid
        self.rss = RssSampler(operator_pid)
        self.cpu_pids = {"operator": operator_pid, **local_control_plane(self.api.base)}
        self.t0 = time.monotonic()
        self.run_id = f"crs-{os.getpid()}-{random.randrange(10**6)}"
        self.report = Report(plan, run_id=self.run_id)
        self.workers: list[Any] = []  # live worker processes
        self.bg_rate: dict[Key, float] = {}
        self.settle_until = 0.0  # when the retentions of every job so far have elapsed (wall clock)
        self.unsettled: list[tuple[PathResult, list[str]]] = []  # paths whose Redis sample is still to take

    def log(self, msg: str) -> None:
        if self.plan.verbose:
            print(f"[crs {time.monotonic() - self.t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    # -- processes
    def start_workers(self) -> None:
        before = set(self.q.workers(self.queue))
        images = (self.plan.state_dir or Path(self.ps.tmp)) / "images"
        retention = str(self.plan.job_retention_seconds)
        for _ in range(self.plan.workers):
            proc = start_worker(
                self.ps,
                self.url,
                self.queue,
                images,
                ZIMAGE_MODEL_SOURCE="noop",
                ZIMAGE_JOB_RETENTION_SECONDS=retention,
            )
            self.workers.append(proc)
        wait_for(
            lambda: len(set(self.q.workers(self.queue)) - before) >= self.plan.workers,
            120,
            interval=0.1,
            what=f"{self.plan.workers} workers up",
        )

    def stop_workers(self) -> None:
        for p in self.workers:
            p.terminate()
        for p in self.workers:
            try:
                p.wait(30)
            except Exception:
                p.kill()
        self.workers = []

    def wait_progress(self, count: Callable[[], int], target: int, what: str) -> None:
        """Wait until ``count()`` reaches ``target``; fail when a process died, nothing moved on for
        ``stall_seconds`` or the whole wait ran past ``run_timeout_seconds``."""
        deadline = time.monotonic() + self.plan.run_timeout_seconds
        last, moved = -1, time.monotonic()
        while True:
            self.check_alive()
            n = count()
            if n >= target:
                return
            now = time.monotonic()
            if n != last:
                last, moved = n, now
            if now - moved > self.plan.stall_seconds or now > deadline:
                tail = self.ps.logs()[-3000:]
                raise RuntimeError(f"waiting for {what}: {n} of {target} after {now - moved:.0f} s still\n{tail}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        for name, proc, _log in self.ps.procs:
            if (name == "operator" or proc in self.workers) and proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n{self.ps.logs()}")

    # -- API server figures
    def measure_background(self, windows: int = 4) -> None:
        """The rate of requests nobody's jobs make (the idle operator: its pool loop's reads), over an idle
        window; windows in which the operator still wrote anything (its start: the pool's Deployment, Service,
        PodDisruptionBudget, status) are measured again, at most ``windows`` times."""
        if self.plan.idle_window_seconds <= 0:
            return
        for _ in range(windows):
            start = self.window()
            time.sleep(self.plan.idle_window_seconds)  # an idle window: nothing to await
            rows, seconds = request_rows(start, self.window(), {}, 1)
            self.bg_rate = {(r.verb, r.resource, r.subresource): r.per_job / seconds for r in rows if r.per_job}
            if not any(verb in ("POST", "PUT", "PATCH", "DELETE") for verb, _, _ in self.bg_rate):
                break
        self.report.background_rate = {key_label(k): v for k, v in self.bg_rate.items()}

    def settle_requests(self, timeout: float = 60.0) -> None:
        """Wait until the operator has acked every event and its per-job requests have stopped for a second
        (it posts an Event after the status write the watch saw)."""
        wait_for(self.events_settled, timeout, interval=0.2, what="every worker event read and acked")
        last: dict[Key, float] | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clients = self.api.request_totals().clients
            now = {k: v for k, v in clients.items() if k[1] in JOB_RESOURCES and k[0] not in ("WATCH", "LIST")}
            if now == last:
                return
            last = now
            time.sleep(1.0)  # quiet means no change over this window: nothing to await

    def events_settled(self) -> bool:
        return events_settled(self.r)

    def window(self) -> Window:
        totals = self.api.request_totals()
        cpu = {name: cpu_seconds(pid) for name, pid in self.cpu_pids.items()}
        cpu["bench"] = sum(os.times()[:2])
        return Window(time.monotonic(), totals, self.api.own(), {k: v for k, v in cpu.items() if v is not None})

    # -- Redis figures
    def redis_sample(self, uids: list[str]) -> RedisSample:
        streams = {s: int(self.r.xlen(s)) for s in (*keys.streams(self.queue), keys.EVENTS_STREAM)}
        streams[keys.DEAD_LETTER_STREAM] = int(self.r.xlen(keys.DEAD_LETTER_STREAM))
        left = 0
        for i in range(0, len(uids), 1000):
            pipe = self.r.pipeline(transaction=False)
            for uid in uids[i : i + 1000]:
                pipe.exists(keys.job(uid))
            left += sum(int(x) for x in pipe.execute())
        return RedisSample(
            used_memory=int(self.r.info("memory")["used_memory"]),
            dbsize=int(self.r.dbsize()),
            job_records=sum(1 for _ in self.r.scan_iter(match=keys.job("*"), count=1000)),
            streams=streams,
            records_left=left,
        )

    def after_retention(self, res: PathResult, uids: list[str], last_finish: float, final: bool) -> None:
        """Wait out the retentions after the path's last finish, then sample Redis and the operator's RSS. With
        ``settle=end`` only the final path waits, and every path so far is sampled then."""
        self.settle_until = max(self.settle_until, last_finish + self.plan.retention_seconds)
        self.unsettled.append((res, uids))
        res.rss_end_kb = self.rss.now()
        if self.plan.settle == "none" or (self.plan.settle == "end" and not final):
            return
        wait_for(self.events_settled, 300, interval=0.5, what="every event read and acked")
        wait = max(0.0, self.settle_until - time.time())
        self.log(f"{res.path}: waiting {wait:.0f} s for the retentions")
        time.sleep(wait)  # no event marks the end of a retention
        rss = self.rss.now()
        for r, u in self.unsettled:
            r.redis_after = s = self.redis_sample(u)
            r.rss_end_kb = rss
            self.log(
                f"{r.path} (round {r.round}): after the retentions used_memory {s.used_memory / 1024:.0f} KiB, "
                f"{s.dbsize} keys, {s.job_records} job records ({s.records_left} of these jobs), streams "
                f"{s.streams}; operator RSS {rss / 1024:.1f} MiB"
            )
        self.unsettled = []

    # -- deleting
    def delete_all(self, watcher: Watcher, names: list[str]) -> tuple[float, str]:
        """Every ImageJob of this run gone: ``deletecollection`` by label, retried; batched deletes if that
        keeps failing. Returns the seconds until the watch saw the last one go, and the method."""
        t0 = time.monotonic()
        selector = f"{LABEL}={self.run_id}"
        method = "deletecollection"
        ok = False
        for attempt in range(3):
            try:
                with self.api.client(timeout=180) as c:
                    r = c.delete(self.api.jobs_path(self.ns), params={"labelSelector": selector})
                self.api.count("DELETE", PLURAL)  # the API server counts a deletecollection as a DELETE
                if r.is_success:
                    ok = True
                    break
                self.log(f"deletecollection answered {r.status_code} (attempt {attempt + 1}): {r.text[:200]}")
            except httpx.TransportError as e:
                self.log(f"deletecollection failed (attempt {attempt + 1}): {e!r}")
            if self.remaining(selector) == 0:
                ok = True
                break
            time.sleep(1.0 * (attempt + 1))
        if not ok or self.remaining(selector):
            method = "deletecollection, then batched deletes"
            self.delete_batched(selector)

        def gone() -> bool:
            self.check_alive()
            return watcher.counts()[3] >= len(names)

        try:
            wait_for(gone, self.plan.delete_timeout_seconds, interval=0.2, what="the watch to see every job deleted")
        except AssertionError:
            if self.remaining(selector):
                raise
            method += " (the watch missed some DELETED; the list is empty)"
        return time.monotonic() - t0, method

    def remaining(self, selector: str) -> int:
        with self.api.client(60) as c:
            r = c.get(self.api.jobs_path(self.ns), params={"labelSelector": selector, "limit": "1"})
        self.api.count("LIST", PLURAL)
        r.raise_for_status()
        body = r.json()
        return len(body.get("items") or []) + int((body.get("metadata") or {}).get("remainingItemCount") or 0)

    def delete_batched(self, selector: str) -> None:
        items, _ = self.api.list_jobs(self.ns, selector)
        names = [i["metadata"]["name"] for i in items]

        async def go() -> None:
            todo = iter(names)
            async with self.api.async_client(self.plan.concurrency) as c:

                async def lane() -> None:
                    for name in todo:
                        for attempt in range(6):
                            if attempt:
                                await asyncio.sleep(0.2 * 2**attempt)
                            try:
                                r = await c.delete(f"{self.api.jobs_path(self.ns)}/{name}")
                            except httpx.TransportError:
                                continue
                            self.api.count("DELETE", PLURAL)
                            if r.is_success or r.status_code == 404:
                                break

                await asyncio.gather(*(lane() for _ in range(self.plan.concurrency)))

        asyncio.run(go())

    # -- the CR path
    def cr_round(self, rnd: int, jobs: int, final: bool) -> PathResult:
        res = PathResult("CR path", jobs, round=rnd)
        names = [f"crs-{rnd}-{i}" for i in range(jobs)]
        selector = f"{LABEL}={self.run_id}"
        finish = FinishTimes(self.q)
        watcher = Watcher(self.api, self.ns, selector, finish.add)
        finish.start()
        watcher.start()
        if not watcher.connected.wait(60):
            raise RuntimeError(f"the watch did not connect: {watcher.error!r}")
        if self.plan.hold:
            self.stop_workers()
        elif not self.workers:
            self.start_workers()
        res.rss_start_kb = self.rss.now()
        self.rss.take_peak()
        start = self.window()
        answered: dict[str, float] = {}
        t_first = time.time()
        self.log(f"CR round {rnd}: creating {jobs} ImageJobs, {self.plan.concurrency} in flight")
        res.create_retries = create_imagejobs(
            self.api, self.ns, names, self.run_id, self.plan.concurrency, answered, self.plan.rate
        )
        res.create_seconds = max(answered.values()) - t_first
        self.log(f"CR round {rnd}: created in {res.create_seconds:.1f} s ({res.creation_per_s:.0f}/s)")
        e2e_start = t_first
        if self.plan.hold:
            self.wait_progress(lambda: watcher.counts()[1], jobs, f"the operator to admit {jobs} ImageJobs")
            time.sleep(1.0)  # let the admission's last writes (Events) land before sampling: nothing to await
            res.rss_held_kb = self.rss.now()
            self.log(
                f"CR round {rnd}: all {jobs} admitted after {time.time() - t_first:.1f} s; operator RSS "
                f"{res.rss_held_kb / 1024:.1f} MiB; starting workers"
            )
            self.start_workers()
            e2e_start, res.e2e_from = time.time(), "workers up"

        self.wait_progress(lambda: watcher.counts()[2], jobs, f"{jobs} ImageJobs to finish")
        seen = watcher.snapshot()
        last_done = max(s.done for s in seen.values() if s.done is not None)
        res.e2e_seconds = last_done - e2e_start
        res.succeeded = sum(s.phase == "Succeeded" for s in seen.values())
        res.failed = sum(s.phase in FAILED for s in seen.values())
        self.log(f"CR round {rnd}: {res.succeeded} succeeded, {res.jobs_per_s:.1f} jobs/s; settling")
        self.settle_requests()
        end = self.window()
        res.requests, res.window_seconds = request_rows(start, end, self.bg_rate, jobs)
        res.cpu_ms_per_job = cpu_per_job(start, end, jobs)
        res.rss_peak_kb = self.rss.take_peak()
        wait_for(lambda: finish.outstanding() == 0, 10, interval=0.1, what="the finish times read from Redis")
        finish.stop()
        self._lags(res, seen, answered, finish.ts)
        res.watch_events = watcher.events
        res.watch_restarts = watcher.restarts

        del_start = self.window()
        res.delete_seconds, res.delete_method = self.delete_all(watcher, names)
        self.log(f"CR round {rnd}: deleted {jobs} in {res.delete_seconds:.1f} s ({res.delete_method})")
        watcher.stop()
        res.delete_requests, _ = request_rows(del_start, self.window(), self.bg_rate, jobs)
        uids = [s.uid for s in seen.values()]
        last_finish = max([*finish.ts.values(), last_done])
        self.after_retention(res, uids, last_finish, final)
        return res

    def _lags(self, res: PathResult, seen: dict[str, Seen], answered: dict[str, float], ts: dict[str, float]) -> None:
        lags, latencies = [], []
        for name, s in seen.items():
            if s.done is None:
                continue
            if name in answered:
                latencies.append(s.done - answered[name])
            finished = ts.get(s.uid)
            if finished is None and s.finished_at:
                res.lag_fallbacks += 1
                finished = float(calendar.timegm(time.strptime(s.finished_at, "%Y-%m-%dT%H:%M:%SZ")))
            if finished is not None:
                lags.append(s.done - finished)
        res.latency_p50, res.latency_p99 = percentile(latencies, 50), percentile(latencies, 99)
        res.lag_p50, res.lag_p99 = percentile(lags, 50), percentile(lags, 99)
        res.lag_max = max(lags) if lags else None

    # -- the bulk path
    def bulk_run(self, bulk: str, jobs: int, final: bool) -> PathResult:
        label, submit = BULK_PATHS[bulk]
        res = PathResult(label, jobs, e2e_from="first submit")
        if not self.workers:
            self.start_workers()
        finish = FinishTimes(self.q, interval=0.2)
        finish.start()
        res.rss_start_kb = self.rss.now()
        self.rss.take_peak()
        start = self.window()
        answered: dict[str, float] = {}
        t_first = time.time()
        self.log(f"{label}: submitting {jobs} jobs")

        def submitted(uid: str) -> None:
            answered[uid] = time.time()
            finish.add(uid)

        uids = submit(self, jobs, submitted)
        res.create_seconds = max(answered.values()) - t_first

        self.wait_progress(lambda: jobs - finish.outstanding(), jobs, f"{jobs} {label} jobs to finish")
        finish.stop()
        states = [finish.outcome.get(u) for u in uids]
        res.succeeded = sum(s == "succeeded" for s in states)
        res.failed = len(states) - res.succeeded
        res.e2e_seconds = max(finish.done_at.values()) - t_first
        latencies = [finish.done_at[u] - answered[u] for u in uids]
        lags = [finish.done_at[u] - finish.ts[u] for u in uids]
        res.latency_p50, res.latency_p99 = percentile(latencies, 50), percentile(latencies, 99)
        res.lag_p50, res.lag_p99, res.lag_max = percentile(lags, 50), percentile(lags, 99), max(lags)
        self.log(f"{label}: {res.succeeded} succeeded, {res.jobs_per_s:.1f} jobs/s; settling")
        self.settle_requests()
        end = self.window()
        res.requests, res.window_seconds = request_rows(start, end, self.bg_rate, jobs)
        res.cpu_ms_per_job = cpu_per_job(start, end, jobs)
        res.rss_peak_kb = self.rss.take_peak()
        self.after_retention(res, uids, max(finish.ts.values()), final)
        return res

    def run(self) -> Report:
        self.rss.start()
        try:
            if not self.plan.hold:
                self.start_workers()
            self.measure_background()
            self.report.rss_idle_kb = self.rss.now()
            self.report.redis_idle = self.redis_sample([])
            for rnd in range(1, self.plan.rounds + 1):
                final = rnd == self.plan.rounds and not self.plan.bulk
                self.report.cr.append(self.cr_round(rnd, self.plan.jobs, final))
            for i, bulk in enumerate(self.plan.bulk):
                self.report.bulk.append(self.bulk_run(bulk, self.plan.jobs, final=i == len(self.plan.bulk) - 1))
        finally:
            self.rss.stop()
            self.stop_workers()
        self.report.seconds = time.monotonic() - self.t0
        return self.report


def run(plan: Plan, kube: Kube | None = None) -> Report:
    """Run the bench on ``kube`` (CRDs installed), else on KUBECONFIG's cluster or a fresh test bed."""
    with tempfile.TemporaryDirectory(prefix="zimage-crs-") as tmp:
        state = plan.state_dir or Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        with cluster_with_crds(state, kube) as k, RedisServer() as srv:
            ns = f"crs-{os.getpid()}-{random.randrange(10**4)}"
            k.kubectl("create", "namespace", ns)
            ps = Processes(state)
            try:
                ceiling = measure_ceiling(k, plan) if plan.ceiling else None
                k.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
                operator = start_operator(
                    ps, k, srv.url, ns,
                    ZIMAGE_JOB_RETENTION_SECONDS=str(plan.job_retention_seconds),
                    ZIMAGE_EVENTS_RETENTION_SECONDS=str(plan.events_retention_seconds),
                    ZIMAGE_EVENTS_TRIM_SECONDS=str(plan.events_trim_seconds),
                    **operator_image_env(),
                )  # fmt: skip
                r = redis.Redis.from_url(srv.url)
                wait_for(lambda: r.exists(keys.OPERATOR_LEASE), 120, what="the operator to take its lease")
                wait_for(lambda: r.exists(keys.EVENTS_STREAM), 120, what="the operator to read events")
                report = Bench(plan, k, ns, srv.url, ps, operator.pid).run()
                report.ceiling = ceiling
                return report
            except BaseException:
                print(ps.logs(), file=sys.stderr)
                raise
            finally:
                ps.stop_all()
                k.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=None, help="jobs per path and round (default 5000; --hold 10000)")
    p.add_argument("--workers", type=int, default=2, help="no-op worker processes")
    p.add_argument("--hold", action="store_true", help="create with no worker running; RSS with every job admitted")
    p.add_argument("--rounds", type=int, default=1, help="CR-path rounds: create, finish, delete, retention")
    p.add_argument(
        "--bulk",
        default="queue",
        help=f"comma-separated paths next to the CR path, of {', '.join(BULK_PATHS)}; 'none': the CR path only",
    )
    p.add_argument("--concurrency", type=int, default=48, help="ImageJob creates in flight")
    p.add_argument("--rate", type=float, default=0.0, help="ImageJob creates per second (default: unpaced)")
    p.add_argument("--job-retention", type=int, default=60, help="ZIMAGE_JOB_RETENTION_SECONDS (min 60)")
    p.add_argument(
        "--settle", choices=["each", "end", "none"], default="each", help="wait out retentions per path, once or never"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--state-dir", type=Path, default=None, help="keep the test bed state and logs here")
    p.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the first phase: the same creates with no operator (what the API server alone takes)",
    )
    args = p.parse_args(argv)
    plan = Plan(
        jobs=args.jobs or (10_000 if args.hold else 5000),
        workers=args.workers,
        hold=args.hold,
        rounds=args.rounds,
        bulk=() if args.bulk == "none" else tuple(b.strip() for b in args.bulk.split(",") if b.strip()),
        concurrency=args.concurrency,
        rate=args.rate,
        job_retention_seconds=args.job_retention,
        settle=args.settle,
        state_dir=args.state_dir,
        ceiling=not args.no_ceiling,
    )
    if plan.jobs < 1 or plan.rounds < 1 or plan.workers < 1 or plan.concurrency < 1:
        p.error("--jobs, --rounds, --workers and --concurrency must be at least 1")
    if unknown := [b for b in plan.bulk if b not in BULK_PATHS]:
        p.error(f"unknown --bulk path(s) {unknown}: choose from {', '.join(BULK_PATHS)} or 'none'")
    report = run(plan)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
