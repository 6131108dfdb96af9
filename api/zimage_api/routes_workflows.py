"""ImageWorkflows over HTTP: a DAG of steps, each step's jobs ImageJobs owned by the workflow.

In a cluster the API only creates, reads and cancels ImageWorkflow objects (labelled with the caller's tenant);
the operator runs them (``zimage_operator.workflows``). In local mode (``zimage serve``) the same planner runs
them in-process (``zimage_api.local.LocalWorkflows``). A store without workflows answers 501.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, ValidationError

from zimage_api import aliases
from zimage_api.apikeys import Principal
from zimage_api.deps import App, BaseUrl, Caller, Parts
from zimage_api.errors import ApiError, error_body, validation_message
from zimage_api.signing import UrlSigner
from zimage_api.store import REQUEST_HASH_ANNOTATION, TENANT_LABEL, JobExists, WorkflowStore
from zimage_api.views import image_path, phase_reason, sse_event
from zimage_operator import workflow
from zimage_operator.workflow_types import (
    STEP_NAME,
    ImageWorkflowSpec,
    StepPhase,
    WorkflowPhase,
    WorkflowProgress,
    WorkflowStep,
)
from zimage_queue.message import CamelModel

router = APIRouter(prefix="/v1", tags=["workflows"])
# A workflow's name is also the label value on its step jobs (zimage.dev/workflow): at most 63 characters.
MAX_ID = 63
WorkflowId = Annotated[str, Path(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", max_length=MAX_ID)]
POLL_SECONDS = 0.5  # how often an event stream reads the workflow
KEEPALIVE_SECONDS = 15.0
NO_STORE = "workflows need a cluster or `zimage workflow run` (this API's job store has no workflows)"
# A string that is a URI as a whole: workers fetch what they are given (see _check_uris).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S*$")


class WorkflowRequest(ImageWorkflowSpec):
    """``POST /v1/workflows``: an ImageWorkflow's spec, its fields at the top level (as ``POST /v1/jobs`` takes an
    ImageJob's), plus an optional ``name``."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        pattern=STEP_NAME,
        description="Unique within your tenant; the workflow's id is then <tenant>-<name> and repeating the same "
        "request returns it (200). Left out: a generated id (or one from the Idempotency-Key header).",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=30 * 86400,
        description="Delete it (and its step jobs) this long after it finished; default: the API's job TTL.",
    )


class InstanceView(CamelModel):
    """One job of a step (one per forEach item), its current attempt."""

    index: int
    job: str = Field(description="Its ImageJob (GET /v1/jobs/{job} while it exists).")
    attempt: int = 0
    phase: StepPhase
    text: str | None = None
    images: list[str] = Field(default_factory=list, description="Storage URIs, as {{ steps.X.images }} gives them.")
    image_urls: list[str] = Field(
        default_factory=list, description="Signed, short-lived links to the images (while the job exists)."
    )
    routed_to: str | None = None
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None


class StepView(CamelModel):
    name: str
    model: str
    phase: StepPhase
    depends_on: list[str] = Field(
        default_factory=list, description="The steps it waits for: its dependsOn and the steps its fields refer to."
    )
    count: int | None = Field(None, description="How many jobs the step has, once its forEach resolved.")
    succeeded: int = 0
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    instances: list[InstanceView] = Field(default_factory=list)


class WorkflowLinks(CamelModel):
    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    events: str
    cancel: str


class WorkflowView(CamelModel):
    id: str
    object: Literal["image.workflow"] = "image.workflow"
    phase: WorkflowPhase
    reason: str | None = Field(None, description="Why it ended (Completed, StepFailed, Cancelled, InvalidSpec...).")
    message: str | None = None
    cancel_requested: bool = False
    progress: WorkflowProgress
    steps: list[StepView]
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration: str | None = None
    request: dict[str, Any] = Field(description="The spec, as stored.")
    links: WorkflowLinks


class WorkflowList(CamelModel):
    object: Literal["list"] = "list"
    data: list[WorkflowView]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; absent at the end.")


# -- views ------------------------------------------------------------------------------------------------------


def workflow_path(name: str) -> str:
    return f"/v1/workflows/{name}"


def dependencies(step: dict[str, Any]) -> list[str]:
    """The steps a stored step waits for (none when it no longer parses: a view never fails on a spec)."""
    try:
        return sorted(workflow.step_dependencies(WorkflowStep.model_validate(step)))
    except ValidationError:
        return []


def workflow_view(wf: dict[str, Any], signer: UrlSigner, base_url: str = "") -> WorkflowView:
    meta, spec = wf["metadata"], wf.get("spec") or {}
    status = wf.get("status") or {}
    name = meta["name"]
    phase = status.get("phase") or "Pending"
    seen = {st.get("name"): st for st in status.get("steps") or []}
    steps = []
    for s in spec.get("steps") or []:
        st = seen.get(s.get("name")) or {}
        instances = []
        for inst in st.get("instances") or []:
            job, images = inst.get("job") or "", list(inst.get("images") or [])
            links = [base_url + signer.sign(image_path(job, i)) for i in range(len(images))] if job else []
            instances.append(
                InstanceView(
                    index=inst.get("index", 0),
                    job=job,
                    attempt=inst.get("attempt", 0),
                    phase=inst.get("phase") or "Pending",
                    text=inst.get("text"),
                    images=images,
                    image_urls=links,
                    routed_to=inst.get("routedTo"),
                    message=inst.get("message"),
                    started_at=inst.get("startedAt"),
                    finished_at=inst.get("finishedAt"),
                    seconds=inst.get("seconds"),
                )
            )
        steps.append(
            StepView(
                name=s.get("name", ""),
                model=st.get("model") or s.get("model", ""),
                phase=st.get("phase") or "Pending",
                depends_on=dependencies(s),
                count=st.get("count"),
                succeeded=st.get("succeeded", 0),
                message=st.get("message"),
                started_at=st.get("startedAt"),
                finished_at=st.get("finishedAt"),
                instances=instances,
            )
        )
    progress = status.get("progress") or {"stepsTotal": len(steps), "summary": f"0/{len(steps)}"}
    return WorkflowView(
        id=name,
        phase=phase,
        reason=phase_reason(status) if phase in workflow.WORKFLOW_TERMINAL else None,
        message=status.get("message"),
        cancel_requested=bool(spec.get("cancel")),
        progress=WorkflowProgress.model_validate(progress),
        steps=steps,
        created_at=meta.get("creationTimestamp"),
        started_at=status.get("startedAt"),
        finished_at=status.get("finishedAt"),
        duration=status.get("duration"),
        request=spec,
        links=WorkflowLinks(
            self_=workflow_path(name), events=f"{workflow_path(name)}/events", cancel=f"{workflow_path(name)}/cancel"
        ),
    )


# -- what the routes do -------------------------------------------------------------------------------------------


def workflow_store(app: Parts) -> WorkflowStore:
    store = app.service.store
    if not isinstance(store, WorkflowStore):
        raise ApiError(501, NO_STORE, code="not_implemented")
    return store


async def find(app: Parts, p: Principal, name: str) -> dict[str, Any]:
    wf = await asyncio.to_thread(workflow_store(app).get_workflow, name)
    # Another tenant's workflow is indistinguishable from a missing one.
    if wf is None or (wf["metadata"].get("labels") or {}).get(TENANT_LABEL) != p.tenant:
        raise ApiError(404, f"no workflow {name!r}", param="id", code="workflow_not_found")
    return wf


def _bad(errors: list[str]) -> ApiError:
    param = errors[0].split(":", 1)[0].removeprefix("spec.")
    return ApiError(400, "; ".join(e.removeprefix("spec.") for e in errors), param=param, code="invalid_value")


def _uris(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(where, value)] if _URI.match(value) else []
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in _uris(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in _uris(v, f"{where}[{i}]")]
    return []


def _check_uris(app: Parts, spec: ImageWorkflowSpec, tenant: str) -> None:
    """A URI anywhere in the inputs, a forEach or the params must be one of the caller's objects in this API's
    storage, as ``inputImage`` must be for a job: step jobs' workers fetch what they are given."""
    found = _uris(spec.inputs, "inputs")
    for s in spec.steps:
        found += _uris(s.for_each, f"steps[{s.name}].forEach") + _uris(s.params, f"steps[{s.name}].params")
    for where, uri in found:
        if not app.images.owns(uri, tenant):
            raise ApiError(
                400,
                f"{where}: must be one of your objects in this API's image storage",
                param=where,
                code="invalid_value",
            )


async def _resolve_models(app: Parts, spec: ImageWorkflowSpec) -> None:
    """Aliases (``turbo``, ``dall-e-3``, ...) become the ModelDeployment they stand for; every model must exist."""
    store = app.service.store
    for s in spec.steps:
        if aliases.may_be_alias(s.model, app.settings.model_aliases):
            s.model = await asyncio.to_thread(app.service.resolve_model, s.model)
    for s in spec.steps:
        if await asyncio.to_thread(store.get_model, s.model) is None:
            raise ApiError(
                404,
                f"steps[{s.name}].model: no model named {s.model!r} (GET /v1/models)",
                param=f"steps[{s.name}].model",
                code="model_not_found",
            )


def _same_request(wf: dict[str, Any], request_hash: str, by_name: bool) -> dict[str, Any]:
    stored = (wf["metadata"].get("annotations") or {}).get(REQUEST_HASH_ANNOTATION)
    if stored and stored != request_hash:
        if by_name:
            raise ApiError(
                409,
                f"a workflow named {wf['metadata']['name']!r} exists with another spec",
                param="name",
                code="workflow_exists",
            )
        raise ApiError(
            422,
            "Idempotency-Key was used before with a different request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return wf


async def create(
    app: Parts, p: Principal, body: WorkflowRequest, idempotency_key: str | None
) -> tuple[dict[str, Any], bool]:
    store = workflow_store(app)
    fields = body.model_dump(by_alias=True, exclude={"name"}, mode="json")
    if fields.get("ttlSecondsAfterFinished") is None:
        fields["ttlSecondsAfterFinished"] = app.settings.job_ttl_seconds
    try:
        spec = ImageWorkflowSpec.model_validate(fields)
    except ValidationError as e:  # (the body was one already: only a bug lands here)
        message, param = validation_message(list(e.errors()))
        raise ApiError(400, message, param=param, code="invalid_value") from e
    errors = workflow.spec_errors(spec)
    if errors:
        raise _bad(errors)
    _check_uris(app, spec, p.tenant)
    await _resolve_models(app, spec)
    wire = spec.wire()
    request_hash = hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()

    by_name = body.name is not None
    if body.name is not None:
        name = f"{p.tenant}-{body.name}"
    elif idempotency_key is not None:
        digest = hashlib.sha256(f"{p.tenant}:workflow:{idempotency_key}".encode()).hexdigest()
        name = f"{p.tenant}-{digest[:16]}"
    else:
        name = f"{p.tenant}-{uuid.uuid4().hex[:16]}"
    if len(name) > MAX_ID or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ApiError(
            400,
            f"name: the workflow's id {name!r} would be longer than {MAX_ID} characters",
            param="name",
            code="invalid_value",
        )
    if by_name or idempotency_key is not None:
        existing = await asyncio.to_thread(store.get_workflow, name)
        if existing is not None:
            return _same_request(existing, request_hash, by_name), False
    labels = {TENANT_LABEL: p.tenant}
    try:
        wf = await asyncio.to_thread(store.create_workflow, name, wire, labels, {REQUEST_HASH_ANNOTATION: request_hash})
    except JobExists:  # a concurrent request with the same name or key won
        existing = await asyncio.to_thread(store.get_workflow, name)
        if existing is None:
            raise ApiError(409, "a workflow of that name was just deleted; retry", code="conflict") from None
        return _same_request(existing, request_hash, by_name), False
    except ValueError as e:  # the API server refused it (its CEL rules)
        raise ApiError(400, str(e), code="invalid_value") from e
    return wf, True


# -- routes -------------------------------------------------------------------------------------------------------


@router.post(
    "/workflows",
    status_code=201,
    response_model=WorkflowView,
    responses={
        200: {"model": WorkflowView, "description": "The workflow this name or Idempotency-Key made before"},
        409: {"description": "A workflow of that name exists with another spec"},
        501: {"description": "This API runs no workflows (no cluster, no local runner)"},
    },
)
async def create_workflow(
    body: WorkflowRequest,
    caller: Caller,
    app: App,
    base: BaseUrl,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> WorkflowView:
    """Create an ImageWorkflow (201): the spec's fields at the top level, plus an optional ``name``.

    Checked before anything is created (each a 400 naming the field): the fields and their bounds, step names,
    references (``{{ steps.X }}`` to a step that does not exist, ``{{ inputs.N }}`` to no input), dependency cycles,
    params that are no ImageJob field; every step's model must exist (404 ``model_not_found``). A URI in the inputs,
    a forEach or the params must be one of your objects in this API's image storage. Repeating a request with the
    same ``name`` or Idempotency-Key returns the same workflow (200)."""
    wf, created = await create(app, caller, body, idempotency_key)
    if not created:
        response.status_code = 200
    response.headers["Location"] = workflow_path(wf["metadata"]["name"])
    return workflow_view(wf, app.signer, base)


@router.get("/workflows", response_model=WorkflowList)
async def list_workflows(
    caller: Caller,
    app: App,
    base: BaseUrl,
    phase: WorkflowPhase | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
) -> WorkflowList:
    """The caller's tenant's workflows, by id, a page at a time."""
    store = workflow_store(app)
    labels = {TENANT_LABEL: caller.tenant}
    out: list[dict[str, Any]] = []
    token = page_token
    while True:  # phase is status, not a label: filter here, reading pages until this one is full or the list ends
        try:
            items, token = await asyncio.to_thread(store.list_workflows, labels, limit - len(out), token)
        except ValueError as e:
            raise ApiError(400, f"page_token: {e}", param="page_token", code="invalid_page_token") from e
        out.extend(w for w in items if not phase or ((w.get("status") or {}).get("phase") or "Pending") == phase)
        if len(out) >= limit or not token:
            break
    return WorkflowList(data=[workflow_view(w, app.signer, base) for w in out[:limit]], next_page_token=token)


@router.get("/workflows/{id}", response_model=WorkflowView)
async def get_workflow(id: WorkflowId, caller: Caller, app: App, base: BaseUrl) -> WorkflowView:
    """The workflow: phase, progress, every step with its jobs and their outputs (texts, images)."""
    return workflow_view(await find(app, caller, id), app.signer, base)


@router.post("/workflows/{id}/cancel", response_model=WorkflowView)
async def cancel_workflow(id: WorkflowId, caller: Caller, app: App, base: BaseUrl) -> WorkflowView:
    """Cancel (``spec.cancel: true``): running step jobs are cancelled, pending steps skipped; the phase becomes
    Cancelled a moment later. A finished workflow is left as it is."""
    wf = await find(app, caller, id)
    phase = (wf.get("status") or {}).get("phase")
    if phase in workflow.WORKFLOW_TERMINAL or (wf.get("spec") or {}).get("cancel"):
        return workflow_view(wf, app.signer, base)
    patched = await asyncio.to_thread(workflow_store(app).patch_workflow, id, {"spec": {"cancel": True}})
    if patched is None:
        raise ApiError(404, f"no workflow {id!r}", param="id", code="workflow_not_found")
    return workflow_view(patched, app.signer, base)


@router.get(
    "/workflows/{id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def workflow_events(id: WorkflowId, caller: Caller, app: App, base: BaseUrl) -> StreamingResponse:
    """Server-Sent Events: the whole workflow (as ``GET /v1/workflows/{id}``) each time its status changes, the
    event named by its phase (``pending``, ``running``, then ``succeeded``, ``failed`` or ``cancelled``, after which
    the stream ends). The first event is the workflow as it is. ``: keepalive`` comments every 15 s; an ``error``
    event if the workflow is deleted meanwhile."""
    wf = await find(app, caller, id)
    store = workflow_store(app)

    async def stream() -> AsyncIterator[str]:
        current: dict[str, Any] | None = wf
        last: str | None = None
        quiet = 0.0
        while True:
            if current is None or (current["metadata"].get("labels") or {}).get(TENANT_LABEL) != caller.tenant:
                yield sse_event("error", error_body(404, f"workflow {id!r} was deleted", "id", "workflow_not_found"))
                return
            view = workflow_view(current, app.signer, base)
            seen = json.dumps([current.get("status") or {}, view.cancel_requested], sort_keys=True)
            if seen != last:
                last, quiet = seen, 0.0
                yield sse_event(view.phase.lower(), view.model_dump(by_alias=True, mode="json"))
                if view.phase in workflow.WORKFLOW_TERMINAL:
                    return
            elif quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            current = await asyncio.to_thread(store.get_workflow, id)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
