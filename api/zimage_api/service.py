"""What the endpoints do, written once for the native and the OpenAI-compatible routes.

A job is admitted exactly as the operator admits an ImageJob (``zimage_operator.reconcile.admit``): the API
creates the CR, writes the same Queued status the operator would, and enqueues the same message at once to
save the operator's round trip. The queue drops the operator's own enqueue of that uid.

A bulk job (``mode: bulk``, or a key whose entry says ``bulk``) is admitted the same way into the bulk store
(``zimage_api.redis_store``) instead of an ImageJob: same queue, events and results, no ImageJob. Reads look
in the bulk store first, then at the ImageJobs; lists show the bulk jobs (newest first), then the ImageJobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from zimage_api import aliases
from zimage_api.apikeys import Principal
from zimage_api.errors import ApiError, validation_message
from zimage_api.events import TERMINAL_EVENTS, EventHub
from zimage_api.limits import ConcurrencyQuota, RateLimiter
from zimage_api.metrics import JOBS_SUBMITTED, REJECTED
from zimage_api.redis_store import TOKEN_PREFIX, RedisJobStore, is_bulk
from zimage_api.settings import ApiSettings
from zimage_api.store import (
    MODEL_LABEL,
    REQUEST_HASH_ANNOTATION,
    TENANT_LABEL,
    JobExists,
    JobStore,
    StaleVersion,
    merge_patch,
)
from zimage_history import quotas
from zimage_operator import adapters, reconcile, variants
from zimage_operator.types import TERMINAL_PHASES, ImageJobSpec, Reason
from zimage_queue import JobEvent, JobQueue

log = logging.getLogger(__name__)
# A page token that starts the ImageJob part of a list (after the bulk jobs).
IMAGEJOBS_START = "imagejobs."
# What a stream's first event is called: the phase the job is in when the stream opens.
_PHASE_EVENT = {
    "Pending": "pending",
    "Queued": "queued",
    "Running": "started",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Cancelled": "cancelled",
}
# Resolving an alias reads the ModelDeployments at most this often (a burst of `dall-e-3` requests costs the API
# server one list, not one per request).
MODELS_CACHE_SECONDS = 5.0


@dataclass
class Tracked:
    """One step of a job as a client sees it: the event type and the job's status after it."""

    type: str
    status: dict[str, Any]
    event: JobEvent | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class JobService:
    def __init__(
        self,
        settings: ApiSettings,
        store: JobStore,
        queue: JobQueue,
        hub: EventHub,
        limiter: RateLimiter,
        quota: ConcurrencyQuota,
        bulk: RedisJobStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bulk = bulk
        self.queue = queue
        self.hub = hub
        self.limiter = limiter
        self.quota = quota
        self._models: tuple[float, list[dict[str, Any]]] | None = None

    # -- limits ---------------------------------------------------------------------------------------
    async def check_rate(self, p: Principal) -> None:
        rate = p.rate_per_second or self.settings.rate_per_second
        burst = p.burst or self.settings.rate_burst
        verdict = await asyncio.to_thread(self.limiter.hit, p.key_id, rate, burst)
        if not verdict.allowed:
            REJECTED.labels(reason="rate").inc()
            wait = max(1, round(verdict.retry_after + 0.5))
            raise ApiError(
                429,
                f"rate limit of {rate:g} requests/s (burst {burst}) for this key exceeded; retry in {wait}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )

    # -- jobs -----------------------------------------------------------------------------------------
    async def check_gpu_budget(self, tenant: str) -> None:
        """429 while the tenant is over its GPU-second budget for the day or the month (ZIMAGE_API_TENANT_QUOTAS),
        with Retry-After at the budget's renewal."""
        quota = quotas.quota_for(self.settings.tenant_quotas, tenant)
        if quota is None:
            return
        over = await asyncio.to_thread(quotas.over_budget, self.queue.r, tenant, quota, _now())
        if over is not None:
            REJECTED.labels(reason="gpu_quota").inc()
            message, renews = over
            raise ApiError(
                429,
                f"{message}; new jobs are refused until it renews",
                code="gpu_quota_exceeded",
                headers={"Retry-After": str(max(1, int(renews)))},
            )

    def default_model(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        models = self.store.list_models()
        if len(models) == 1:
            return str(models[0]["metadata"]["name"])
        raise ApiError(400, "model: required (GET /v1/models lists them)", param="model", code="missing_model")

    def _listed_models(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if self._models is None or now - self._models[0] >= MODELS_CACHE_SECONDS:
            self._models = (now, self.store.list_models())
        return self._models[1]

    def model_aliases(self, models: list[dict[str, Any]] | None = None) -> dict[str, str]:
        """Every model alias in force: alias -> ModelDeployment name (sync: call from a thread)."""
        models = self._listed_models() if models is None else models
        default = self.settings.default_model or (str(models[0]["metadata"]["name"]) if len(models) == 1 else None)
        return aliases.aliases(self.settings.model_aliases, models, default)

    def resolve_model(self, name: str) -> str:
        """The ModelDeployment a requested model name means: an alias's target, else the name itself (sync)."""
        if not aliases.may_be_alias(name, self.settings.model_aliases):
            return name
        target = self.model_aliases().get(name)
        if target is None and name in aliases.OPENAI_MODELS:
            raise ApiError(
                404,
                f"model: {name!r} stands for the default model, and this API has none (ZIMAGE_API_DEFAULT_MODEL); "
                "GET /v1/models lists the models",
                param="model",
                code="model_not_found",
            )
        return target or name

    def store_of(self, job: dict[str, Any]) -> JobStore:
        return self.bulk if self.bulk is not None and is_bulk(job) else self.store

    def find(self, name: str) -> dict[str, Any] | None:
        """The job of that name, bulk or ImageJob, whoever's it is (sync: call from a thread)."""
        job = self.bulk.get_job(name) if self.bulk is not None else None
        return job if job is not None else self.store.get_job(name)

    def _bulk_target(self, p: Principal, mode: str | None) -> RedisJobStore | None:
        """The bulk store when this request's job is a bulk job (``mode``, else the key's default)."""
        if (mode or ("bulk" if p.bulk else "imagejob")) != "bulk":
            return None
        if self.bulk is None:
            raise ApiError(400, "mode: bulk jobs are not available on this API", param="mode", code="invalid_value")
        return self.bulk

    async def submit(
        self, p: Principal, fields: dict[str, Any], idempotency_key: str | None = None, mode: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Create (or, for a repeated Idempotency-Key, find) the job. Returns (job, created).

        ``mode``: ``bulk`` or ``imagejob``; None: the key's default."""
        bulk = self._bulk_target(p, mode)
        store: JobStore = bulk or self.store
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields.get("model"):
            fields["model"] = await asyncio.to_thread(self.default_model)
        elif aliases.may_be_alias(fields["model"], self.settings.model_aliases):
            fields["model"] = await asyncio.to_thread(self.resolve_model, fields["model"])
        fields.setdefault("ttlSecondsAfterFinished", self.settings.job_ttl_seconds)
        try:
            spec = ImageJobSpec.model_validate(fields)
        except ValidationError as e:
            message, param = validation_message(list(e.errors()))
            raise ApiError(400, message, param=param, code="invalid_value") from e
        errors = spec.cross_field_errors()
        if errors:
            param = errors[0].split(":", 1)[0].removeprefix("spec.").split("/")[0]
            raise ApiError(400, "; ".join(e.removeprefix("spec.") for e in errors), param=param, code="invalid_value")
        request_hash = hashlib.sha256(json.dumps(spec.wire(), sort_keys=True).encode()).hexdigest()

        if idempotency_key is not None:
            digest = hashlib.sha256(f"{p.tenant}:{idempotency_key}".encode()).hexdigest()
            name = f"{p.tenant}-{digest[:16]}"
            # Where this request's job would be: a bulk retry costs no read of the API server.
            existing = await asyncio.to_thread(store.get_job, name)
            if existing is not None:
                return self._same_request(existing, request_hash), False
        else:
            name = f"{p.tenant}-{uuid.uuid4().hex[:16]}"

        model = await asyncio.to_thread(self.store.get_model, spec.model)
        if model is None:
            raise ApiError(
                404, f"model: no model named {spec.model!r} (GET /v1/models)", param="model", code="model_not_found"
            )
        refused = adapters.resolve(spec.loras, spec.model, model.get("spec") or {})
        if isinstance(refused, adapters.Refusal):  # what the operator's admission would fail the ImageJob with
            code = "unknown_adapter" if refused.reason == Reason.UNKNOWN_ADAPTER else "too_many_adapters"
            raise ApiError(400, refused.message.removeprefix("spec."), param="loras", code=code)
        unsupported = variants.refusal(spec, spec.model, model.get("spec") or {})
        if unsupported:  # the operator's admission would fail it (UnsupportedTask)
            param = unsupported.split(":", 1)[0].removeprefix("spec.")
            raise ApiError(400, unsupported.replace("spec.", ""), param=param, code="unsupported_task")
        if spec.seed is None:  # resolved into the spec, so the operator's admission builds the very same message
            spec.seed = random.SystemRandom().randrange(2**32)

        await self.check_gpu_budget(p.tenant)
        limit = p.max_concurrent_jobs or self.settings.max_concurrent_jobs
        slot = await asyncio.to_thread(self.quota.reserve, p.tenant, limit)
        if slot is None:
            REJECTED.labels(reason="concurrency").inc()
            raise ApiError(
                429,
                f"tenant {p.tenant!r} has {limit} jobs queued or running, its limit; retry when one finishes",
                code="concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            labels = {TENANT_LABEL: p.tenant, MODEL_LABEL: spec.model}
            try:
                job = await asyncio.to_thread(
                    store.create_job, name, spec.wire(), labels, {REQUEST_HASH_ANNOTATION: request_hash}
                )
            except JobExists:  # a concurrent retry with the same Idempotency-Key won
                await asyncio.to_thread(self.quota.release, slot)
                existing = await asyncio.to_thread(store.get_job, name)
                if existing is None:
                    raise ApiError(
                        409, "a job with this Idempotency-Key was just deleted; retry", code="conflict"
                    ) from None
                return self._same_request(existing, request_hash), False
            meta = job["metadata"]
            decision = reconcile.admit(spec=job["spec"], status={}, meta=meta, model=model, now=_now())
            if decision.action != "enqueue" or decision.message is None:  # the models above let nothing else through
                raise RuntimeError(f"admission of {name} said {decision.action}: {decision.patch.get('message')}")
            job_message = decision.message
            if bulk is not None:  # workers copy the marker into their events: the operator leaves them alone
                job_message = job_message.model_copy(update={"bulk": True})
            written = await self._write_admission(store, job, decision.patch)
            try:
                await asyncio.to_thread(self.queue.enqueue, job_message, spec.priority)
            except BaseException:
                if bulk is not None:  # never queued, and no operator will ever admit it: as if never created
                    await asyncio.to_thread(bulk.discard, name)
                raise
            if bulk is not None:
                await asyncio.to_thread(bulk.enqueued, meta["uid"])
            await asyncio.to_thread(self.quota.commit, slot, meta["uid"])
        except BaseException:
            await asyncio.to_thread(self.quota.release, slot)
            raise
        JOBS_SUBMITTED.labels(model=spec.model).inc()
        if written:
            merge_patch(job.setdefault("status", {}), decision.patch)
        log.info("job %s admitted for tenant %s on %s%s", name, p.tenant, spec.model, " (bulk)" if bulk else "")
        return job, True

    async def _write_admission(self, store: JobStore, job: dict[str, Any], patch: dict[str, Any]) -> bool:
        """Queued onto the version just created. If the operator's watch admitted the job first (its worker
        may be reporting already), that status stands: a late Queued must never replace a Running."""
        meta = job["metadata"]
        try:
            return await asyncio.to_thread(store.patch_job_status, meta["name"], patch, meta.get("resourceVersion"))
        except StaleVersion:
            current = await asyncio.to_thread(store.get_job, meta["name"])
            if current is not None:
                job["status"] = current.get("status") or {}
            return False

    @staticmethod
    def _same_request(job: dict[str, Any], request_hash: str) -> dict[str, Any]:
        stored = (job["metadata"].get("annotations") or {}).get(REQUEST_HASH_ANNOTATION)
        if stored and stored != request_hash:
            raise ApiError(
                422,
                "Idempotency-Key was used before with a different request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return job

    async def get(self, p: Principal, name: str) -> dict[str, Any]:
        job = await asyncio.to_thread(self.find, name)
        # Another tenant's job is indistinguishable from a missing one.
        if job is None or (job["metadata"].get("labels") or {}).get(TENANT_LABEL) != p.tenant:
            raise ApiError(404, f"no job {name!r}", param="id", code="job_not_found")
        return job

    async def results(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The job's images, as its status lists them.

        Until the operator has written them there (it writes from the same worker event a moment later), they
        come from the queue's record of the job, which the worker writes before it reports: the images a job's
        response or event stream has shown are readable from the moment they are shown.
        """
        results = (job.get("status") or {}).get("results")
        if results:
            return list(results)
        stored = await asyncio.to_thread(self.queue.result, job["metadata"]["uid"])
        return [r.wire() for r in stored or []]

    def _list_page(
        self, labels: dict[str, str], limit: int, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the whole list: the bulk jobs' pages (tokens ``bulk.``), then the ImageJobs' (their
        store's own tokens; ``imagejobs.`` starts them)."""
        if self.bulk is not None and (token is None or token.startswith(TOKEN_PREFIX)):
            items, token = self.bulk.list_jobs(labels, limit, token)
            return items, token or IMAGEJOBS_START
        if token == IMAGEJOBS_START:
            token = None
        return self.store.list_jobs(labels, limit, token)

    async def list(
        self, p: Principal, phase: str | None, model: str | None, limit: int, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        labels = {TENANT_LABEL: p.tenant}
        if model:
            labels[MODEL_LABEL] = model
        out: list[dict[str, Any]] = []
        # Phase is status, not a label: filter here, reading pages until this one is full or the list ends.
        while True:
            try:
                items, token = await asyncio.to_thread(self._list_page, labels, limit - len(out), token)
            except ValueError as e:
                raise ApiError(400, f"page_token: {e}", param="page_token", code="invalid_page_token") from e
            out.extend(j for j in items if not phase or (j.get("status") or {}).get("phase", "Pending") == phase)
            if len(out) >= limit or not token:
                return out[:limit], token

    async def cancel(self, p: Principal, name: str) -> dict[str, Any]:
        job = await self.get(p, name)
        status = job.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            return job
        await asyncio.to_thread(self.queue.cancel, job["metadata"]["uid"])
        patch = reconcile.cancel_patch(
            status, _now(), job["metadata"].get("generation"), Reason.CANCELLED, "cancelled through the API"
        )
        if patch:
            await asyncio.to_thread(self.store_of(job).patch_job_status, name, patch)
            merge_patch(status, patch)
            job["status"] = status
        return job

    # -- following a job --------------------------------------------------------------------------------
    async def track(self, job: dict[str, Any], keepalive: float | None = None) -> AsyncGenerator[Tracked, None]:
        """The job as it is (the event named by its phase: queued, started, or how it ended), then live events
        until the job ends.

        The status is advanced with the operator's own ``event_patch``, so what a client sees here is what the
        ImageJob's status becomes a moment later.
        """
        meta = job["metadata"]
        uid = meta["uid"]
        async with self.hub.subscribe(uid) as events:
            fresh = await asyncio.to_thread(self.store_of(job).get_job, meta["name"])
            status: dict[str, Any] = dict((fresh or job).get("status") or {})
            phase = status.get("phase") or "Pending"
            yield Tracked(_PHASE_EVENT.get(phase, "queued"), status)
            if phase in TERMINAL_PHASES:
                return
            late = await asyncio.to_thread(self._finished_in_queue, job, status)
            if late is not None:  # finished before we subscribed; its status is not written yet
                merge_patch(status, late)
                yield Tracked(_PHASE_EVENT[status["phase"]], status)
                return
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), keepalive) if keepalive else await events.get()
                except TimeoutError:
                    yield Tracked("keepalive", status)
                    continue
                patch, _ = reconcile.event_patch(status, ev, _now(), min_interval=0)
                if patch is None:
                    continue
                merge_patch(status, patch)
                yield Tracked(ev.type, status, ev)
                if ev.type in TERMINAL_EVENTS:
                    return

    def _finished_in_queue(self, job: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
        meta = job["metadata"]
        uid = meta["uid"]
        results = self.queue.result(uid)
        if results is not None:
            ev = JobEvent(type="succeeded", uid=uid, namespace=meta["namespace"], name=meta["name"], results=results)
            return reconcile.event_patch(status, ev, _now())[0]
        if self.queue.state(uid) == "failed":
            # The reason is in the failure event the operator is writing into the status now: read it back.
            for _ in range(50):
                fresh = self.store_of(job).get_job(meta["name"])
                fresh_status = (fresh or {}).get("status") or {}
                if fresh_status.get("phase") in TERMINAL_PHASES:
                    return fresh_status
                time.sleep(0.1)
            ev = JobEvent(
                type="failed", uid=uid, namespace=meta["namespace"], name=meta["name"], reason=Reason.WORKER_ERROR
            )
            return reconcile.event_patch(status, ev, _now())[0]
        return None

    async def wait(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The job's final status, or ApiError 504 after ``timeout`` seconds (the job keeps running)."""
        try:
            async with asyncio.timeout(timeout):
                async for step in self.track(job):
                    if step.type in TERMINAL_EVENTS:
                        return step.status
        except TimeoutError:
            pass
        name = job["metadata"]["name"]
        raise ApiError(
            504, f"job {name} not finished within {timeout:g}s; it keeps running: GET /v1/jobs/{name}", code="timeout"
        )
