"""``zimage-forwarder``: serve a remote ModelDeployment's queue by calling its provider (settings.py lists the
environment the operator gives it)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import httpx

from zimage_forwarder.loop import Forwarder, read_keys
from zimage_forwarder.provider import Provider
from zimage_forwarder.settings import ForwarderSettings
from zimage_queue import JobQueue, logs
from zimage_queue.clients import connect_async
from zimage_queue.keypool import KeyLimits, KeyPool, PoolKey

log = logging.getLogger("zimage_forwarder")


def limits(cfg: ForwarderSettings) -> KeyLimits:
    return KeyLimits(
        requests=cfg.remote_requests_per_window,
        per_seconds=cfg.remote_window_seconds + cfg.remote_window_margin_seconds,
        tokens=cfg.remote_tokens_per_window,
        concurrency=cfg.remote_concurrency,
    )


async def serve(cfg: ForwarderSettings, max_jobs: int | None = None, http: bool = True) -> int:
    secrets = read_keys(cfg.remote_keys_dir)
    if not secrets:
        log.error("no provider keys in %s (one file per key)", cfg.remote_keys_dir)
        return 2
    queue = JobQueue.from_url(
        cfg.redis_url,
        cfg.redis_credentials,
        visibility_ms=cfg.visibility_ms,
        result_ttl_seconds=cfg.job_retention_seconds,
    )
    r = connect_async(cfg.redis_url, cfg.redis_credentials)
    pool = KeyPool(
        r,
        cfg.remote_key_pool or cfg.queue,
        [PoolKey(kid, limits(cfg)) for kid in secrets],
        bench_after_failures=cfg.remote_bench_after_failures,
        bench_seconds=cfg.remote_bench_seconds,
    )
    from zimage_worker.storage import open_store

    timeout = httpx.Timeout(cfg.remote_timeout_seconds, connect=min(10.0, cfg.remote_timeout_seconds))
    limits_ = httpx.Limits(max_connections=cfg.concurrency_per_replica, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits_) as client:
        provider = Provider(cfg.remote_api, cfg.remote_base_url, cfg.remote_model, client)
        fw = Forwarder(cfg, queue, pool, provider, open_store(cfg.storage_url), lambda: secrets)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, fw.request_stop)
        server = None
        if http:
            from zimage_worker.health import serve as health

            server = health(cfg.http_port, live=lambda: True, ready=lambda: not fw._stop.is_set())
        log.info(
            "forwarder %s serving queue %s with %s %s at %s (%d keys, %d at once)",
            cfg.worker_name,
            cfg.queue,
            cfg.remote_api,
            cfg.remote_model,
            cfg.remote_base_url,
            len(secrets),
            cfg.concurrency_per_replica,
        )
        try:
            await fw.run(max_jobs=max_jobs)
        finally:
            if server is not None:
                server.shutdown()
            await asyncio.to_thread(queue.worker_gone, cfg.queue, cfg.worker_name)
            await r.aclose()
        log.info("forwarder %s stopped after %d job(s); worst event-loop lag %.3fs", cfg.worker_name,
                 fw.processed, fw.worst_lag)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zimage-forwarder", description=__doc__)
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    p.add_argument("--no-http", action="store_true", help="no /healthz, /readyz, /metrics server")
    args = p.parse_args(argv)
    logs.configure()
    return asyncio.run(serve(ForwarderSettings(), args.max_jobs, http=not args.no_http))


if __name__ == "__main__":
    sys.exit(main())
