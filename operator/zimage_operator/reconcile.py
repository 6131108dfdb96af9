"""Pure ImageJob decisions: (spec, observed state, now) -> status patch or action. No I/O here."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from zimage_operator import adapters, variants
from zimage_operator.conditions import iso, parse_iso, set_condition
from zimage_operator.edits import spec_digest
from zimage_operator.housekeeping import ttl_after_finished
from zimage_operator.types import (
    TERMINAL_PHASES,
    Cond,
    ImageJobSpec,
    ModelDeploymentSpec,
    Reason,
    tenant_of,
    variant_defaults,
)
from zimage_queue import GenerationParams, JobEvent, JobMessage
from zimage_queue.keys import queue_name

PROGRESS_MIN_INTERVAL = 1.0


@dataclass
class Admission:
    action: Literal["enqueue", "wait", "fail", "skip"]
    patch: dict[str, Any] = field(default_factory=dict)
    message: JobMessage | None = None
    event: tuple[str, str, str] | None = None  # (type, reason, message) for a Kubernetes Event


def _status_patch(
    status: dict[str, Any],
    now: datetime,
    generation: int | None,
    phase: str,
    conds: list[tuple[str, bool, str, str]],
    **fields: Any,
) -> dict[str, Any]:
    conditions = status.get("conditions")
    for type_, ok, reason, msg in conds:
        conditions, _ = set_condition(conditions, type_, ok, reason, msg, now, generation)
    patch: dict[str, Any] = {"phase": phase, "conditions": conditions, **fields}
    if generation is not None:
        patch["observedGeneration"] = generation
    return patch


def _validation_message(e: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def admit(
    *,
    spec: dict[str, Any],
    status: dict[str, Any],
    meta: dict[str, Any],
    model: dict[str, Any] | None,
    now: datetime,
    rng: random.Random | None = None,
    over_quota: str | None = None,
) -> Admission:
    """Decide what a new (or resumed) ImageJob needs: enqueue it, wait for its model, or fail it.

    ``over_quota``: why the job's tenant is over its GPU-second budget (the caller reads the counters); such a job
    fails unless it was admitted already (Queued: a resumed admission never fails what it once let in)."""
    gen = meta.get("generation")
    phase = status.get("phase")
    if phase in TERMINAL_PHASES or phase == "Running":
        # A Queued job is enqueued again on resume: it may have been marked Queued by a handler that died
        # before its XADD, and the queue drops the duplicate by uid.
        return Admission("skip")
    try:
        parsed = ImageJobSpec.model_validate(spec)
        errors = parsed.cross_field_errors()
    except ValidationError as e:
        errors = [_validation_message(e)]

    def fail(reason: str, msg: str) -> Admission:
        patch = _status_patch(
            status, now, gen, "Failed", [(Cond.FAILED, True, reason, msg)], message=msg, finishedAt=iso(now)
        )
        return Admission("fail", patch, event=("Warning", reason, msg))

    if errors:
        return fail(Reason.INVALID_SPEC, "; ".join(errors))
    if over_quota and phase != "Queued":
        return fail(Reason.GPU_QUOTA_EXCEEDED, f"{over_quota}; not run")
    if model is None:
        msg = f"ModelDeployment {parsed.model!r} not found in namespace {meta.get('namespace')}; waiting for it"
        patch = _status_patch(
            status, now, gen, "Pending", [(Cond.QUEUED, False, Reason.MODEL_NOT_FOUND, msg)], message=msg
        )
        return Admission("wait", patch, event=("Warning", Reason.MODEL_NOT_FOUND, msg))

    loras = adapters.resolve(parsed.loras, parsed.model, model.get("spec") or {})
    if isinstance(loras, adapters.Refusal):
        return fail(loras.reason, loras.message)
    variant = (model.get("spec") or {}).get("model", {}).get("variant")
    unsupported = variants.refusal(parsed, parsed.model, model.get("spec") or {})
    if unsupported:
        return fail(Reason.UNSUPPORTED_TASK, unsupported)
    defaults = variant_defaults(variant)
    seed = parsed.seed if parsed.seed is not None else status.get("seed")
    if seed is None:  # chosen once, recorded in status, so a retried handler enqueues the same job
        seed = (rng or random.SystemRandom()).randrange(2**32)
    steps, guidance = parsed.steps_and_guidance(defaults)
    params = GenerationParams.model_validate(
        {
            **parsed.model_dump(include=set(GenerationParams.model_fields)),
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "loras": loras or None,
        }
    )
    message = JobMessage(
        uid=meta["uid"],
        namespace=meta["namespace"],
        name=meta["name"],
        tenant=tenant_of(meta),
        queue=queue_name(meta["namespace"], parsed.model),
        params=params,
        max_retries=parsed.max_retries,
        timeout_seconds=parsed.timeout_seconds,
        enqueued_at=now.timestamp(),
    )
    msg = f"enqueued on {parsed.model} ({parsed.priority} priority)"
    patch = _status_patch(
        status,
        now,
        gen,
        "Queued",
        [(Cond.QUEUED, True, Reason.ENQUEUED, msg)],
        queuedAt=iso(now),
        seed=seed,
        steps=steps,
        message=msg,
        progress=_progress(0, steps),
        specDigest=spec_digest(spec),
        **({"adapters": [lora.wire() for lora in loras]} if loras else {}),
    )
    return Admission("enqueue", patch, message, event=("Normal", Reason.ENQUEUED, msg))


def modeldeployment_errors(spec: dict[str, Any], name: str | None = None) -> list[str]:
    """Why the operator refuses a ModelDeployment spec (schema and cross-field rules); empty when it is fine.
    ``name``: the ModelDeployment's, for the rules that need it (a fallback may not be itself)."""
    try:
        return ModelDeploymentSpec.model_validate(spec).cross_field_errors(name)
    except ValidationError as e:
        return [_validation_message(e)]


def progress_throttled(event: JobEvent, last_progress_at: float | None, min_interval: float) -> bool:
    """At most one progress patch per job per min_interval, so thousands of jobs don't flood the API server."""
    return event.type == "progress" and last_progress_at is not None and event.ts - last_progress_at < min_interval


def _progress(step: int, total: int) -> dict[str, Any]:
    return {"step": step, "totalSteps": total, "summary": f"{step}/{total}"}


def _duration(run: float | None) -> str | None:
    return None if run is None else f"{run:.1f}s"


def _seconds(start: str | None, end: datetime) -> float | None:
    t0 = parse_iso(start)
    return None if t0 is None else round(max(0.0, (end - t0).total_seconds()), 3)


def event_patch(
    status: dict[str, Any],
    event: JobEvent,
    now: datetime,
    *,
    last_progress_at: float | None = None,
    min_interval: float = PROGRESS_MIN_INTERVAL,
    generation: int | None = None,
) -> tuple[dict[str, Any] | None, tuple[str, str, str] | None]:
    """The status patch (or None) and Kubernetes Event (or None) for one worker event.

    Terminal phases are final; a late or duplicate event never moves a job backwards.
    """
    phase = status.get("phase")
    if phase in TERMINAL_PHASES:
        return None, None
    ev_time = datetime.fromtimestamp(event.ts, now.tzinfo)
    total = event.total_steps or (status.get("progress") or {}).get("totalSteps") or 0

    if event.type == "progress":
        if progress_throttled(event, last_progress_at, min_interval):
            return None, None
        step = event.step or 0
        patch: dict[str, Any] = {"progress": _progress(step, total)}
        if phase != "Running":
            patch["phase"] = "Running"
        return patch, None

    if event.type == "started":
        msg = f"running on {event.worker} (attempt {event.attempt})"
        patch = _status_patch(
            status,
            ev_time,
            generation,
            "Running",
            [(Cond.RUNNING, True, Reason.STARTED, msg)],
            worker=event.worker,
            attempts=event.attempt,
            startedAt=iso(ev_time),
            message=msg,
            progress=_progress(0, total),
        )
        if not status.get("queueSeconds"):
            patch["queueSeconds"] = _seconds(status.get("queuedAt"), ev_time)
        return patch, ("Normal", Reason.STARTED, msg)

    if event.type == "rerouted":
        why = {
            "ProviderUnavailable": "its provider was unavailable",
            "ProviderRateLimited": "its provider's keys stayed rate-limited",
            "ProviderFailed": "its provider failed it",
        }.get(event.reason or "", "its own model had no ready worker in time")
        msg = f"moved to the fallback model {event.message}: {why}"
        patch = _status_patch(
            status,
            ev_time,
            generation,
            "Queued",
            [(Cond.QUEUED, True, Reason.FALLBACK, msg)],
            routedTo=event.message,
            message=msg,
        )
        return patch, ("Warning", Reason.FALLBACK, msg)

    if event.type == "retrying":
        msg = f"attempt {event.attempt} failed ({event.reason}: {event.message}); requeued"
        patch = _status_patch(
            status,
            ev_time,
            generation,
            "Queued",
            [(Cond.RUNNING, False, Reason.RETRYING, msg)],
            attempts=event.attempt,
            message=msg,
        )
        return patch, ("Warning", Reason.RETRYING, msg)

    if event.type == "succeeded":
        results = [r.wire() for r in event.results or []]
        msg = f"{len(results)} image(s) stored"
        run = event.run_seconds if event.run_seconds is not None else _seconds(status.get("startedAt"), ev_time)
        patch = _status_patch(
            status,
            ev_time,
            generation,
            "Succeeded",
            [(Cond.RUNNING, False, Reason.COMPLETED, msg), (Cond.SUCCEEDED, True, Reason.COMPLETED, msg)],
            results=results,
            finishedAt=iso(ev_time),
            runSeconds=run,
            message=msg,
            duration=_duration(run),
            attempts=event.attempt or status.get("attempts"),
            progress=_progress(total, total),
        )
        if event.worker:
            patch["worker"] = event.worker
        if event.text is not None:
            patch["text"] = event.text
            patch["message"] = msg = f"answered {len(event.text)} characters"
            patch["conditions"] = _status_patch(
                status,
                ev_time,
                generation,
                "Succeeded",
                [(Cond.RUNNING, False, Reason.COMPLETED, msg), (Cond.SUCCEEDED, True, Reason.COMPLETED, msg)],
            )["conditions"]
        return patch, ("Normal", Reason.COMPLETED, msg)

    if event.type in ("failed", "cancelled"):
        failed = event.type == "failed"
        reason = event.reason or (Reason.WORKER_ERROR if failed else Reason.CANCELLED)
        msg = event.message or reason
        run = event.run_seconds
        patch = _status_patch(
            status,
            ev_time,
            generation,
            "Failed" if failed else "Cancelled",
            [(Cond.RUNNING, False, reason, msg), (Cond.FAILED if failed else Cond.CANCELLED, True, reason, msg)],
            finishedAt=iso(ev_time),
            message=msg,
            attempts=event.attempt or status.get("attempts"),
            runSeconds=run,
            duration=_duration(run),
        )
        return patch, ("Warning" if failed else "Normal", reason, msg)

    return None, None


_FINAL_PHASE = {"succeeded": "Succeeded", "failed": "Failed", "cancelled": "Cancelled"}


def event_key(event: JobEvent) -> str:
    """What makes a worker event's Kubernetes Event unique: one per attempt for starts and retries, one final."""
    if event.type in _FINAL_PHASE:
        return "final"
    if event.type in ("started", "retrying"):
        return f"{event.type}-{event.attempt}"
    return event.type


def replayed_event(status: dict[str, Any], event: JobEvent, now: datetime) -> tuple[str, str, str] | None:
    """The Kubernetes Event of a final transition already in the status (written by a writer that may have
    died before recording it): the same one ``event_patch`` gave then, to record under the same key."""
    if status.get("phase") not in TERMINAL_PHASES or _FINAL_PHASE.get(event.type) != status.get("phase"):
        return None
    return event_patch({**status, "phase": "Running"}, event, now)[1]


@dataclass
class Folded:
    """What a run of one job's worker events comes to: one status patch (None: nothing to write), the status
    it leaves, the Kubernetes Events to record with their keys, and the time of the last progress written."""

    patch: dict[str, Any] | None
    status: dict[str, Any]
    events: list[tuple[tuple[str, str, str], str]]
    progress_at: float | None


def fold_events(
    status: dict[str, Any],
    events: list[JobEvent],
    now: datetime,
    *,
    last_progress_at: float | None = None,
    min_interval: float = PROGRESS_MIN_INTERVAL,
    generation: int | None = None,
) -> Folded:
    """Apply a job's events in order to its status in memory, for one write: a job that started and finished
    within one batch gets a single status patch (merge-patch of every field any of the events set)."""
    current, total, k8s_events = dict(status), {}, []
    keys: set[str] = set()
    progress_at = last_progress_at
    for ev in events:
        patch, k8s_event = event_patch(
            current, ev, now, last_progress_at=progress_at, min_interval=min_interval, generation=generation
        )
        if patch:
            current.update(patch)
            total.update(patch)
            if ev.type == "progress":
                progress_at = ev.ts
        elif k8s_event is None and not total:  # already final: its writer may have died before the Event
            k8s_event = replayed_event(current, ev, now)
        key = event_key(ev)
        if k8s_event and key not in keys:
            keys.add(key)
            k8s_events.append((k8s_event, key))
    return Folded(total or None, current, k8s_events, progress_at)


def timeout_patch(
    spec: dict[str, Any], status: dict[str, Any], meta: dict[str, Any], now: datetime
) -> dict[str, Any] | None:
    """Fail a job that has not finished within timeoutSeconds of its creation."""
    limit = spec.get("timeoutSeconds")
    if not limit or status.get("phase") in TERMINAL_PHASES:
        return None
    created = parse_iso(meta.get("creationTimestamp"))
    if created is None or (now - created).total_seconds() < limit:
        return None
    msg = f"not finished within timeoutSeconds={limit}"
    return _status_patch(
        status,
        now,
        meta.get("generation"),
        "Failed",
        [(Cond.RUNNING, False, Reason.TIMEOUT, msg), (Cond.FAILED, True, Reason.TIMEOUT, msg)],
        finishedAt=iso(now),
        message=msg,
    )


def seconds_until_expiry(
    spec: dict[str, Any], status: dict[str, Any], now: datetime, default_ttl: int | None = None
) -> float | None:
    """For ttlSecondsAfterFinished (or the operator's default): how long until the finished job may be
    deleted (<= 0: now)."""
    ttl = ttl_after_finished(spec, default_ttl)
    finished = parse_iso(status.get("finishedAt"))
    if ttl is None or finished is None or status.get("phase") not in TERMINAL_PHASES:
        return None
    return ttl - (now - finished).total_seconds()


def cancel_patch(
    status: dict[str, Any],
    now: datetime,
    generation: int | None,
    reason: str = Reason.DELETED,
    msg: str = "cancelled: the ImageJob was deleted",
) -> dict[str, Any] | None:
    if status.get("phase") in TERMINAL_PHASES:
        return None
    return _status_patch(
        status,
        now,
        generation,
        "Cancelled",
        [(Cond.CANCELLED, True, reason, msg)],
        finishedAt=iso(now),
        message=msg,
    )
