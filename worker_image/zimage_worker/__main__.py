"""``zimage-worker``: serve one model queue until SIGTERM."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
from types import FrameType

from zimage_queue import JobQueue, logs
from zimage_worker import metrics
from zimage_worker.engine import NOOP, TINY_RANDOM, Engine, load_engine, warm_up
from zimage_worker.health import serve
from zimage_worker.loop import Worker
from zimage_worker.settings import WorkerSettings
from zimage_worker.storage import open_store

log = logging.getLogger("zimage_worker")


def structured_library_logs() -> None:
    """transformers and diffusers print through handlers of their own (lines like "[transformers] ..."); send their
    records to the root logger instead, so the worker's stderr stays one JSON object per line."""
    for name in ("transformers", "diffusers"):
        try:
            library = importlib.import_module(f"{name}.utils.logging")
        except ImportError:  # the worker extra is not installed: nothing of theirs will log
            continue
        library.disable_default_handler()
        library.enable_propagation()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zimage-worker", description="Run Z-Image jobs from a Redis queue.")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (burst mode)")
    p.add_argument("--no-http", action="store_true", help="no /healthz, /readyz, /metrics server")
    args = p.parse_args(argv)
    logs.configure()
    structured_library_logs()
    cfg = WorkerSettings()
    ready = False
    worker: Worker | None = None

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal ready
        ready = False
        log.info("signal %d: draining", signum)
        if worker:
            worker.request_stop()
        else:
            sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Live while loading (a slow download is not a hang: the startup probe covers it), then per the watchdog.
    server = (
        None
        if args.no_http
        else serve(cfg.http_port, live=lambda: worker is None or worker.watchdog.live(), ready=lambda: ready)
    )
    t0 = time.perf_counter()
    engine: Engine
    if cfg.engine == "function":
        # A CPU step: no model, no torch (a function worker's image may not have it), nothing to warm up.
        from zimage_worker.functions import FunctionEngine

        engine = FunctionEngine(cfg.function)
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - t0)
        log.info("function engine: %s", cfg.function)
    else:
        engine = load_engine(
            cfg.model_source,
            variant=cfg.variant,
            device=cfg.device,
            dtype=cfg.dtype,
            models_dir=cfg.models_dir,
            revision=cfg.revision,
            compile=cfg.compile,
            attention_backend=cfg.attention_backend,
            adapters=cfg.adapters,
            max_resident_adapters=cfg.max_resident_adapters,
            adapter_cache_dir=cfg.adapter_cache_dir,
        )
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - t0)
        if cfg.warmup:
            size = cfg.warmup_size or (64 if cfg.model_source in (TINY_RANDOM, NOOP) else 1024)
            seconds = warm_up(engine, size, batch=cfg.max_batch_size)
            metrics.WARMUP_SECONDS.set(seconds)
            log.info("warm-up at %dx%d (batch %d) took %.2fs", size, size, cfg.max_batch_size, seconds)
    queue = JobQueue.from_url(
        cfg.redis_url,
        cfg.redis_credentials,
        visibility_ms=cfg.visibility_ms,
        result_ttl_seconds=cfg.job_retention_seconds,
    )
    worker = Worker(
        queue,
        engine,
        open_store(cfg.storage_url),
        cfg.queue,
        cfg.worker_name,
        heartbeat_seconds=cfg.heartbeat_seconds,
        max_batch_size=1 if cfg.engine == "function" else cfg.max_batch_size,  # a function: one job at a time
        max_wait_ms=cfg.max_wait_milliseconds,
        stuck_base_seconds=cfg.stuck_base_seconds,
        stuck_step_seconds=cfg.stuck_step_seconds,
        fetch_allowed_hosts=cfg.fetch_allowed_hosts,
        loop_max_failures=cfg.loop_max_failures,
        adapter_affinity_max_wait_ms=cfg.adapter_affinity_max_wait_ms,
        adapter_affinity_max_passes=cfg.adapter_affinity_max_passes,
    )
    ready = True
    worker.run(max_jobs=args.max_jobs)
    if server:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
