"""The native API: ImageJobs over HTTP."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from zimage_api.apikeys import Principal
from zimage_api.deps import App, BaseUrl, Caller, Parts, presented_key, principal
from zimage_api.errors import ApiError
from zimage_api.history import HISTORY_PHASES, Source, before_id_of, disabled, history_job, parse_time, scope
from zimage_api.routes_usage import HISTORY_ANSWERS, TenantParam
from zimage_api.schemas import JobList, JobRequest, JobView, ModelList
from zimage_api.views import image_path, job_view, model_view, sse_event
from zimage_operator.types import Phase
from zimage_queue import keys

router = APIRouter(prefix="/v1", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?$", max_length=253)]


@router.post("/jobs", status_code=202, response_model=JobView, responses={200: {"model": JobView}})
async def create_job(
    body: JobRequest,
    caller: Caller,
    app: App,
    base: BaseUrl,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobView:
    """Submit a job (202). Repeating a request with the same Idempotency-Key returns the same job (200).

    ``mode``: ``imagejob`` (an ImageJob, visible to kubectl) or ``bulk`` (no ImageJob: its state in Redis for
    the job retention); left out, the API key's default (``imagejob`` unless its entry says ``bulk``).

    ``inputImage``, each of ``referenceImages`` and ``maskImage`` must lie in the caller's part of this API's
    storage (an upload through /v1/uploads or /v1/images/edits, or an earlier result): workers fetch what they
    are given, and an HTTP client must not point them anywhere else.
    """
    given = [("inputImage", body.input_image), ("maskImage", body.mask_image)]
    given += [(f"referenceImages.{i}", uri) for i, uri in enumerate(body.reference_images or [])]
    for field, uri in given:
        if uri and not app.images.owns(uri, caller.tenant):
            raise ApiError(
                400,
                f"{field}: must be one of your objects in this API's image storage",
                param=field,
                code="invalid_value",
            )
    fields = body.model_dump(by_alias=True, exclude={"mode"})
    job, created = await app.service.submit(caller, fields, idempotency_key, body.mode)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job['metadata']['name']}"
    return job_view(job, app.signer, base)


HISTORY_ONLY = "only with source=history"


@router.get("/jobs", response_model=JobList, responses=HISTORY_ANSWERS)
async def list_jobs(
    caller: Caller,
    app: App,
    base: BaseUrl,
    phase: Phase | None = None,
    model: Annotated[str | None, Query(max_length=253)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
    source: Annotated[
        Source, Query(description="live: the jobs in the job store; history: finished jobs from the history store.")
    ] = "live",
    since: Annotated[
        str | None, Query(max_length=64, description="source=history: finished at or after (ISO 8601).")
    ] = None,
    until: Annotated[
        str | None, Query(max_length=64, description="source=history: finished before (ISO 8601).")
    ] = None,
    q: Annotated[
        str | None, Query(min_length=1, max_length=500, description="source=history: words all in the prompt.")
    ] = None,
    tenant: TenantParam = None,
) -> JobList:
    """The caller's tenant's jobs, a page at a time: bulk jobs (newest first), then ImageJobs (by name).

    ``source=history``: finished jobs (Succeeded, Failed, Cancelled) from the history store, newest first, also
    those gone from the job store past their TTL; ``since``, ``until`` and ``q`` (words of the prompt) filter
    them, and an admin key sees every tenant's (``tenant`` narrows)."""
    if source == "history":
        return await list_history(caller, app, base, phase, model, limit, page_token, since, until, q, tenant)
    for name, value in (("since", since), ("until", until), ("q", q)):
        if value is not None:
            raise ApiError(400, f"{name}: {HISTORY_ONLY}", param=name, code="invalid_value")
    if tenant not in (None, caller.tenant):
        raise ApiError(400, f"tenant: another tenant's jobs: {HISTORY_ONLY}", param="tenant", code="invalid_value")
    jobs, token = await app.service.list(caller, phase, model, limit, page_token)
    return JobList(data=[job_view(j, app.signer, base) for j in jobs], next_page_token=token)


async def list_history(
    caller: Principal,
    app: Parts,
    base: str,
    phase: str | None,
    model: str | None,
    limit: int,
    token: str | None,
    since: str | None,
    until: str | None,
    text: str | None,
    tenant: str | None,
) -> JobList:
    if app.history is None:
        raise disabled()
    who = scope(caller, tenant)
    for name, value in (("model", model), ("q", text)):
        if value is not None and "\x00" in value:  # PostgreSQL's text takes no NUL
            raise ApiError(400, f"{name}: contains a NUL character", param=name, code="invalid_value")
    if phase is not None and phase not in HISTORY_PHASES:
        raise ApiError(
            400,
            f"phase: the history holds finished jobs ({', '.join(HISTORY_PHASES)}), not {phase}",
            param="phase",
            code="invalid_value",
        )
    rows, next_token = await app.history.list_jobs(
        who,
        model=model,
        outcome=HISTORY_PHASES[phase] if phase else None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        text=text,
        limit=limit,
        before_id=before_id_of(token),
    )
    return JobList(data=[job_view(history_job(r), app.signer, base) for r in rows], next_page_token=next_token)


async def find_job(app: Parts, caller: Principal, name: str) -> dict[str, Any]:
    """The caller's job: from the job store, else (gone past its TTL) its last outcome in the history store."""
    try:
        return await app.service.get(caller, name)
    except ApiError as e:
        if e.status != 404 or app.history is None:
            raise
        row = await app.history.get_job(name, caller.tenant)
        if row is None:
            raise
        return history_job(row)


@router.get("/jobs/{id}", response_model=JobView)
async def get_job(id: JobId, caller: Caller, app: App, base: BaseUrl) -> JobView:
    """The job; one gone from the job store (past its TTL) comes from the history store, when the API has one."""
    return job_view(await find_job(app, caller, id), app.signer, base)


@router.delete("/jobs/{id}", response_model=JobView)
async def cancel_job(id: JobId, caller: Caller, app: App, base: BaseUrl) -> JobView:
    """Cancel: a queued job never runs, a running one stops at its next step. A finished job is left as is."""
    return job_view(await app.service.cancel(caller, id), app.signer, base)


@router.get(
    "/jobs/{id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(id: JobId, caller: Caller, app: App, base: BaseUrl) -> StreamingResponse:
    """Server-Sent Events: ``queued``, ``started``, one ``progress`` per step, then ``succeeded``, ``failed`` or
    ``cancelled`` carrying the whole job, and the stream ends. ``retrying``/``rerouted`` may come in between.
    The first event is the job as it is, named by its phase: a stream opened while the job runs starts with
    ``started``, one opened after it finished is its last event alone."""
    job = await app.service.get(caller, id)

    async def stream() -> AsyncIterator[str]:
        async for step in app.service.track(job, keepalive=15.0):
            if step.type == "keepalive":
                yield ": keepalive\n\n"
            elif step.type == "progress":
                p = step.status.get("progress") or {}
                yield sse_event("progress", {"id": id, "step": p.get("step", 0), "totalSteps": p.get("totalSteps", 0)})
            else:
                yield sse_event(
                    step.type, job_view(job, app.signer, base, step.status).model_dump(by_alias=True, mode="json")
                )

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get(
    "/jobs/{id}/images/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        307: {"description": "to a presigned URL"},
    },
)
async def get_image(
    id: JobId,
    index: Annotated[int, Path(ge=0, le=63)],
    key: Annotated[str | None, Depends(presented_key)],
    app: App,
    expires: int | None = None,
    signature: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    """One image: with the API key, or with the signed link from the job (``expires`` and ``signature``)."""
    if app.signer.verify(image_path(id, index), expires, signature):
        job = await asyncio.to_thread(app.service.find, id)
        if job is None:  # gone past its TTL: the link was handed out, so the job's images stay readable
            row = await app.history.get_job(id, None) if app.history is not None else None
            if row is None:
                raise ApiError(404, f"no job {id!r}", param="id", code="job_not_found")
            job = history_job(row)
    else:
        job = await find_job(app, await principal(key, app), id)
    results = await app.service.results(job)
    if index >= len(results):
        raise ApiError(404, f"job {id!r} has no image {index}", param="index", code="image_not_found")
    uri = results[index]["uri"]
    url = await asyncio.to_thread(app.images.presigned, uri, app.settings.url_ttl_seconds)
    if url:
        return RedirectResponse(url, status_code=307)
    path = app.images.local_path(uri)
    if path is None:
        raise ApiError(404, "the image is not reachable from this API", code="image_not_found")
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")


@router.get("/models", response_model=ModelList, tags=["models"])
async def list_models(caller: Caller, app: App) -> ModelList:
    """ModelDeployments (OpenAI's model list shape), with readiness and queue length; then the aliases that stand
    for one of them (``alias_of``): OpenAI's model names, the variants' names, ZIMAGE_API_MODEL_ALIASES."""
    models = await asyncio.to_thread(app.service.store.list_models)
    out = {}
    for md in models:
        stats = await asyncio.to_thread(
            app.service.queue.stats, keys.queue_name(app.service.store.namespace, md["metadata"]["name"])
        )
        out[md["metadata"]["name"]] = model_view(md, stats)
    aliases = await asyncio.to_thread(app.service.model_aliases, models)
    listed = [
        view.model_copy(update={"id": alias, "alias_of": target})
        for alias, target in aliases.items()
        if (view := out.get(target)) is not None
    ]
    return ModelList(data=[*out.values(), *listed])
