"""The FastAPI app: wiring, health, metrics. Routes live in routes_jobs, routes_workflows, routes_openai and
routes_usage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from zimage_api import (
    console,
    docs_ui,
    errors,
    routes_account,
    routes_admin,
    routes_jobs,
    routes_openai,
    routes_usage,
    routes_workflows,
)
from zimage_api.apikeys import KeyRing
from zimage_api.bodylimit import BodyLimit
from zimage_api.deps import Parts
from zimage_api.events import EventHub
from zimage_api.history import History
from zimage_api.images import ImageAccess
from zimage_api.limits import ConcurrencyQuota, RateLimiter
from zimage_api.metrics import REQUEST_SECONDS, REQUESTS
from zimage_api.redis_store import RedisJobStore
from zimage_api.service import JobService
from zimage_api.settings import ApiSettings
from zimage_api.signing import UrlSigner
from zimage_api.store import JobStore
from zimage_queue import JobEvent, JobQueue
from zimage_queue.clients import connect, connect_async
from zimage_queue.supervise import widen_thread_pool

log = logging.getLogger(__name__)


def key_ring(settings: ApiSettings) -> KeyRing:
    if settings.dev_key:
        return KeyRing.with_dev_key(
            settings.dev_key, settings.dev_tenant, settings.keys_dir or None, admin=settings.dev_admin
        )
    return KeyRing(directory=settings.keys_dir or None)


def create_app(
    settings: ApiSettings,
    store: JobStore,
    *,
    on_event: Callable[[JobEvent], None] | None = None,
) -> FastAPI:
    """``on_event`` sees every worker event (local mode uses it to play the operator's part)."""
    sync_redis = connect(settings.redis_url, settings.redis_credentials)
    queue = JobQueue(sync_redis)
    async_redis = connect_async(settings.redis_url, settings.redis_credentials)
    hub = EventHub(async_redis)
    if on_event:
        hub.add_listener(on_event)
    bulk = RedisJobStore(
        sync_redis,
        queue,
        store.namespace,
        store,
        retention_seconds=settings.job_retention_seconds,
        max_listed=settings.bulk_list_max,
    )
    service = JobService(
        settings, store, queue, hub, RateLimiter(sync_redis), ConcurrencyQuota(sync_redis, queue), bulk
    )
    parts = Parts(
        settings,
        service,
        key_ring(settings),
        UrlSigner(settings.url_signing_key, settings.url_ttl_seconds),
        ImageAccess(settings.storage_url),
        History(settings.history_url, settings.history_password, store.namespace) if settings.history_url else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        widen_thread_pool(settings.blocking_threads)
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await async_redis.aclose()
            sync_redis.close()
            if parts.history is not None:
                parts.history.close()

    app = FastAPI(
        title="zimage API",
        version="0.1.0",
        description="Image generation jobs (ImageJobs) over HTTP, and OpenAI's images API.",
        lifespan=lifespan,
        docs_url=None,  # served by docs_ui, from this package's assets
        redoc_url=None,
    )
    app.state.parts = parts
    errors.install(app)
    docs_ui.install(app)
    if settings.console:
        console.install(app, settings.console_image_origins)
    app.include_router(routes_jobs.router)
    app.include_router(routes_workflows.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_usage.router)
    app.include_router(routes_account.router)
    app.include_router(routes_admin.router)

    # Inside ``measure``, so its refusals are counted too.
    app.add_middleware(BodyLimit, max_bytes=settings.request_limit)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(request.method, route).observe(time.perf_counter() - t0)
        return response

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Redis or the job store unreachable"}})
    async def readyz() -> JSONResponse:
        try:
            await async_redis.ping()
            await asyncio.to_thread(store.ready)
        except Exception as e:
            return JSONResponse(errors.error_body(503, f"not ready: {e.__class__.__name__}: {e}"), 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
