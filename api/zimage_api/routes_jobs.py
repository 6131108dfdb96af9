"""The native API: ImageJobs over HTTP."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from zimage_api.deps import App, BaseUrl, Caller, presented_key, principal
from zimage_api.errors import ApiError
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

    ``inputImage``/``maskImage`` must lie in the caller's part of this API's storage (an upload through
    /v1/images/edits, or an earlier result): workers fetch what they are given, and an HTTP client must not
    point them anywhere else.
    """
    for field, uri in (("inputImage", body.input_image), ("maskImage", body.mask_image)):
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


@router.get("/jobs", response_model=JobList)
async def list_jobs(
    caller: Caller,
    app: App,
    base: BaseUrl,
    phase: Phase | None = None,
    model: Annotated[str | None, Query(max_length=253)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
) -> JobList:
    """The caller's tenant's jobs, a page at a time: bulk jobs (newest first), then ImageJobs (by name)."""
    jobs, token = await app.service.list(caller, phase, model, limit, page_token)
    return JobList(data=[job_view(j, app.signer, base) for j in jobs], next_page_token=token)


@router.get("/jobs/{id}", response_model=JobView)
async def get_job(id: JobId, caller: Caller, app: App, base: BaseUrl) -> JobView:
    return job_view(await app.service.get(caller, id), app.signer, base)


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
        if job is None:
            raise ApiError(404, f"no job {id!r}", param="id", code="job_not_found")
    else:
        job = await app.service.get(await principal(key, app), id)
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
