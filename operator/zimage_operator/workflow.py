"""Pure ImageWorkflow decisions: (workflow, its step jobs as observed, now) -> jobs to create, jobs to cancel, status.

No I/O here. The operator (``zimage_operator.workflows``) applies a plan with ImageJobs on the cluster; the
embedded runner (``zimage_api.workflow_local``) applies the same plan with jobs on a local queue.

The workflow's status is its memory: each step job's outcome (text, image URIs, fallback, times) is copied into
``status.steps[].instances[]`` when the job ends, so a step job deleted later (by its TTL) changes nothing.

References (``{{ ... }}`` in a step's params or forEach):
- ``inputs.NAME`` (with ``.field`` or ``[n]`` after it), ``item`` (the forEach item, same accessors), ``index``;
- ``steps.X.text``, ``steps.X.image`` (its first image), ``steps.X.images``: X's job when X has one, or, in a
  fanned-out step with as many jobs as X, the X job of the same index (pairing: instance i waits only for X's
  instance i, so a chain of fanned-out steps is a pipeline, not a series of barriers);
- ``steps.X.all.texts``, ``steps.X.all.images``: every output of every job of X (fan-in; waits for all of X).
A string that is exactly one reference takes the referenced value as it is (a list stays a list); otherwise the
references are put into the string.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from zimage_operator.conditions import iso, parse_iso, set_condition
from zimage_operator.types import API_VERSION, TENANT_LABEL, Cond, ImageJobSpec
from zimage_operator.types import Reason as JobReason
from zimage_operator.workflow_types import (
    MAX_ITEMS,
    STEP_LABEL,
    WORKFLOW_LABEL,
    ImageWorkflowSpec,
    WorkflowStep,
)

FALLBACK_REASON = JobReason.FALLBACK
SPEC_CHANGED_MESSAGE = "spec changed after the workflow started (only cancel may change)"
TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
FINISHED = frozenset({"Succeeded", "Failed", "Cancelled", "Skipped"})
WORKFLOW_TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled"})
# A step job created but not yet seen by the watch is created again (idempotent: same name) after this long.
RECREATE_AFTER_SECONDS = 30.0
MAX_TEXT = 32768
# ImageJob params a step may not set: the workflow decides them.
RESERVED_PARAMS = frozenset({"model", "priority", "timeoutSeconds", "maxRetries"})


class Reason:
    ADMITTED = "Admitted"
    INVALID_SPEC = "InvalidSpec"
    MODEL_NOT_FOUND = "ModelNotFound"
    STEPS_RUNNING = "StepsRunning"
    COMPLETED = "Completed"
    STEP_FAILED = "StepFailed"
    CANCELLED = "Cancelled"
    DELETED = "Deleted"
    SPEC_CHANGED = "SpecChanged"


class NotReady(Exception):
    """A reference to an output that does not exist yet."""


class RefError(Exception):
    """A reference that can never resolve (a user's mistake): the step fails with this message."""


# -- the graph ------------------------------------------------------------------------------------------------


def references(value: Any) -> Iterable[str]:
    """Every ``{{ ... }}`` expression in a JSON value."""
    if isinstance(value, str):
        for m in TEMPLATE.finditer(value):
            yield m.group(1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)


def _parse(expr: str) -> tuple[str, list[str | int]]:
    """``steps.bg.images[0]`` -> ("steps", ["bg", "images", 0])."""
    head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", expr)
    if head is None:
        raise RefError(f"{{{{ {expr} }}}}: not a reference")
    parts: list[str | int] = []
    pos = head.end()
    while pos < len(expr):
        m = _PATH_PART.match(expr, pos)
        if m is None:
            raise RefError(f"{{{{ {expr} }}}}: cannot read {expr[pos:]!r}")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return head.group(0), parts


def step_dependencies(step: WorkflowStep) -> set[str]:
    """dependsOn plus every step its params or forEach refer to."""
    deps = set(step.depends_on)
    for expr in [*references(step.params), *references(step.for_each)]:
        try:
            head, parts = _parse(expr)
        except RefError:
            continue
        if head == "steps" and parts and isinstance(parts[0], str):
            deps.add(parts[0])
    return deps


def spec_errors(spec: ImageWorkflowSpec) -> list[str]:
    """What makes a workflow impossible to run, found before anything runs (cycles included)."""
    errors: list[str] = []
    names = [s.name for s in spec.steps]
    known = set(names)
    if len(known) != len(names):
        errors.append("spec.steps: names must be unique")
    for s in spec.steps:
        where = f"spec.steps[{s.name}]"
        for d in sorted(step_dependencies(s)):
            if d not in known:
                errors.append(f"{where}: refers to no step named {d!r}")
            elif d == s.name:
                errors.append(f"{where}: refers to itself")
        for key in s.params:
            if key in RESERVED_PARAMS:
                errors.append(
                    f"{where}.params.{key}: set by the workflow (the step's model, priority, timeoutSeconds; "
                    "retries are the step's retries)"
                )
            elif key not in ImageJobSpec.model_fields and key not in _ALIASES:
                errors.append(f"{where}.params.{key}: not an ImageJob field")
        for expr in [*references(s.params), *references(s.for_each)]:
            try:
                head, parts = _parse(expr)
            except RefError as e:
                errors.append(f"{where}: {e}")
                continue
            if head == "inputs" and (not parts or parts[0] not in spec.inputs):
                errors.append(f"{where}: {{{{ {expr} }}}} names no input (spec.inputs)")
            elif head in ("item", "index") and s.for_each is None:
                errors.append(f"{where}: {{{{ {expr} }}}} outside a forEach step")
            elif head not in ("inputs", "item", "index", "steps"):
                errors.append(f"{where}: {{{{ {expr} }}}}: only inputs, steps, item and index can be referred to")
        if isinstance(s.for_each, list) and len(s.for_each) > MAX_ITEMS:
            errors.append(f"{where}.forEach: at most {MAX_ITEMS} items")
        elif s.for_each is not None and not isinstance(s.for_each, list | str):
            errors.append(f"{where}.forEach: a list, or a string with one reference")
    if not errors:
        cycle = find_cycle({s.name: step_dependencies(s) for s in spec.steps})
        if cycle:
            errors.append(f"spec.steps: dependency cycle {' -> '.join(cycle)}")
    return errors


_ALIASES = {f.alias for f in ImageJobSpec.model_fields.values() if f.alias}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``step -> its dependencies`` as a path (first == last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in graph:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def topological(spec: ImageWorkflowSpec) -> list[WorkflowStep]:
    graph = {s.name: step_dependencies(s) for s in spec.steps}
    by_name = {s.name: s for s in spec.steps}
    out: list[WorkflowStep] = []
    done: set[str] = set()
    while len(out) < len(spec.steps):
        for s in spec.steps:
            if s.name not in done and graph[s.name] <= done:
                out.append(by_name[s.name])
                done.add(s.name)
    return out


# -- references -------------------------------------------------------------------------------------------------


def _outputs(inst: dict[str, Any]) -> dict[str, Any]:
    images = list(inst.get("images") or [])
    return {"text": inst.get("text"), "images": images, "image": images[0] if images else None}


@dataclass
class Scope:
    """What the references of one job of one step see."""

    inputs: dict[str, Any]
    steps: dict[str, dict[str, Any]]  # step name -> its status (count, instances)
    step: str
    index: int
    count: int | None  # this step's instance count (None: not fanned out)
    item: Callable[[], Any] | None = None

    def value(self, expr: str) -> Any:
        head, parts = _parse(expr)
        if head == "index":
            if parts:
                raise RefError(f"{{{{ {expr} }}}}: index is a number")
            return self.index
        if head == "item":
            if self.item is None:
                raise RefError(f"{{{{ {expr} }}}} outside a forEach step")
            return _walk(self.item(), parts, expr)
        if head == "inputs":
            return _walk(self.inputs, parts, expr)
        if head == "steps":
            return self._step_value(expr, parts)
        raise RefError(f"{{{{ {expr} }}}}: only inputs, steps, item and index can be referred to")

    def _step_value(self, expr: str, parts: list[str | int]) -> Any:
        if not parts or not isinstance(parts[0], str) or parts[0] not in self.steps:
            raise RefError(f"{{{{ {expr} }}}} names no step")
        st = self.steps[parts[0]]
        rest = parts[1:]
        count = st.get("count")
        instances = st.get("instances") or []
        if count is None:
            raise NotReady(parts[0])
        if rest[:1] == ["all"]:
            what = rest[1:2]
            if what not in (["texts"], ["images"]):
                raise RefError(f"{{{{ {expr} }}}}: steps.X.all is followed by .texts or .images")
            if any(i.get("phase") != "Succeeded" for i in instances) or len(instances) < count:
                raise NotReady(parts[0])
            if what == ["texts"]:
                values: list[Any] = [i.get("text") or "" for i in instances]
            else:
                values = [u for i in instances for u in (i.get("images") or [])]
            return _walk(values, rest[2:], expr)
        if count == 1 and not st.get("fannedOut"):
            inst = instances[0] if instances else {}
        elif self.count is not None and self.count == count:
            inst = instances[self.index] if self.index < len(instances) else {}
        else:
            raise RefError(
                f"{{{{ {expr} }}}}: step {parts[0]} has {count} jobs; use steps.{parts[0]}.all.texts / .all.images, "
                "or fan this step out over it (forEach: '{{ steps." + str(parts[0]) + " }}')"
            )
        if inst.get("phase") != "Succeeded":
            raise NotReady(parts[0])
        if not rest:
            return _outputs(inst)
        return _walk(_outputs(inst), rest, expr)


def _walk(value: Any, parts: list[str | int], expr: str) -> Any:
    for p in parts:
        if isinstance(p, int) and isinstance(value, list):
            if p >= len(value):
                raise RefError(f"{{{{ {expr} }}}}: index {p} past the end ({len(value)} values)")
            value = value[p]
        elif isinstance(p, str) and isinstance(value, dict):
            if p not in value:
                raise RefError(f"{{{{ {expr} }}}}: no field {p!r}")
            value = value[p]
        else:
            raise RefError(f"{{{{ {expr} }}}}: cannot take {p!r} of {type(value).__name__}")
    return value


def render(value: Any, scope: Scope) -> Any:
    """The value with its references resolved (NotReady / RefError propagate)."""
    if isinstance(value, str):
        whole = TEMPLATE.fullmatch(value.strip())
        if whole:
            got = scope.value(whole.group(1))
            if got is None:
                raise RefError(f"{value}: has no value (a text step's image, or an image step's text?)")
            return got

        def one(m: re.Match[str]) -> str:
            got = scope.value(m.group(1))
            if got is None:
                raise RefError(f"{m.group(0)}: has no value (a text step's image, or an image step's text?)")
            if isinstance(got, dict | list):
                raise RefError(f"{m.group(0)}: a list or object cannot go inside a string")
            return str(got)

        return TEMPLATE.sub(one, value)
    if isinstance(value, dict):
        return {k: render(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, scope) for v in value]
    return value


def resolve_count(step: WorkflowStep, inputs: dict[str, Any], steps: dict[str, dict[str, Any]]) -> int:
    """How many jobs the step has (NotReady until what its forEach names is known)."""
    fe = step.for_each
    if fe is None:
        return 1
    if isinstance(fe, list):
        return len(fe)
    m = TEMPLATE.fullmatch(str(fe).strip())
    if m is None:
        raise RefError("forEach: a list, or a string with one reference")
    head, parts = _parse(m.group(1))
    if head == "steps" and len(parts) == 1 and isinstance(parts[0], str) and parts[0] in steps:
        count = steps[parts[0]].get("count")
        if count is None:
            raise NotReady(parts[0])
        return int(count)
    items = render(fe, Scope(inputs, steps, step.name, 0, None))
    if not isinstance(items, list):
        raise RefError(f"forEach: {fe} is not a list")
    return len(items)


def item_of(step: WorkflowStep, inputs: dict[str, Any], steps: dict[str, dict[str, Any]], index: int) -> Any:
    fe = step.for_each
    if isinstance(fe, list):
        return fe[index]
    m = TEMPLATE.fullmatch(str(fe).strip())
    if m is None:
        raise RefError("forEach: a list, or a string with one reference")
    head, parts = _parse(m.group(1))
    if head == "steps" and len(parts) == 1 and isinstance(parts[0], str) and parts[0] in steps:
        inst = (steps[parts[0]].get("instances") or [])[index]
        if inst.get("phase") != "Succeeded":
            raise NotReady(parts[0])
        return _outputs(inst)
    items = render(fe, Scope(inputs, steps, step.name, 0, None))
    return items[index]


# -- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)  # ImageJob bodies
    cancel: list[str] = field(default_factory=list)  # ImageJob names to cancel
    status: dict[str, Any] | None = None  # the new status, None when unchanged
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue: bool = False  # look again soon even without a job event (a model may appear)


def spec_digest(spec: ImageWorkflowSpec) -> str:
    data = spec.model_dump(by_alias=True, mode="json", exclude={"cancel"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def job_name(workflow: str, step: str, index: int | None, attempt: int) -> str:
    name = f"{workflow}-{step}" + (f"-{index}" if index is not None else "") + (f"-r{attempt}" if attempt else "")
    if len(name) > 253:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:242]}-{digest}"
    return name


def job_outcome(job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(phase, what the workflow keeps of a step job's status)."""
    status = job.get("status") or {}
    phase = status.get("phase") or "Pending"
    kept: dict[str, Any] = {}
    if phase == "Succeeded":
        text = status.get("text")
        if text is not None:
            kept["text"] = str(text)[:MAX_TEXT]
        kept["images"] = [r["uri"] for r in status.get("results") or [] if r.get("uri")]
    if phase in ("Failed", "Cancelled"):
        kept["message"] = str(status.get("message") or phase)[:4096]
    if status.get("routedTo"):
        kept["routedTo"] = status["routedTo"]
        # Why it moved: the Queued condition the move set keeps it after the job's message moved on.
        moved = next((c for c in status.get("conditions") or [] if c.get("reason") == FALLBACK_REASON), None)
        why = (moved or {}).get("message") or status.get("message") or ""
        kept["message"] = f"{kept['message']}; {why}" if phase in ("Failed", "Cancelled") else why
    if status.get("finishedAt"):
        kept["finishedAt"] = status["finishedAt"]
    return phase, kept


def _seconds(start: str | None, end: str | None) -> float | None:
    a, b = parse_iso(start), parse_iso(end)
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    s = int(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def plan(
    wf: dict[str, Any],
    jobs: dict[str, dict[str, Any]],
    now: datetime,
    model_exists: Callable[[str], bool] | None = None,
) -> Plan:
    """What to do next for one workflow. ``jobs``: its step ImageJobs as last seen, by name (any that exist)."""
    meta = wf.get("metadata") or {}
    old = wf.get("status") or {}
    status = copy.deepcopy(old)
    generation = meta.get("generation")
    out = Plan()

    def condition(type_: str, ok: bool, reason: str, msg: str) -> None:
        status["conditions"], _ = set_condition(status.get("conditions"), type_, ok, reason, msg, now, generation)

    def finish(phase: str, reason: str, msg: str) -> None:
        status["phase"] = phase
        status["message"] = msg
        status["finishedAt"] = iso(now)
        status["duration"] = _duration(_seconds(status.get("startedAt"), status["finishedAt"]))
        condition(Cond.RUNNING, False, reason, msg)
        condition(phase, True, reason, msg)
        out.events.append(("Normal" if phase == "Succeeded" else "Warning", reason, msg))

    if status.get("phase") in WORKFLOW_TERMINAL:
        return out
    try:
        spec = ImageWorkflowSpec.model_validate(wf.get("spec") or {})
    except ValidationError as e:
        msg = "; ".join(f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        condition(Cond.ACCEPTED, False, Reason.INVALID_SPEC, msg)
        finish("Failed", Reason.INVALID_SPEC, msg)
        out.status = status
        return out

    # -- admission (once) ----------------------------------------------------------------------------------
    if not status.get("phase") or status.get("phase") == "Pending":
        errors = spec_errors(spec)
        if errors:
            msg = "; ".join(errors)
            condition(Cond.ACCEPTED, False, Reason.INVALID_SPEC, msg)
            finish("Failed", Reason.INVALID_SPEC, msg)
            out.status = status
            return out
        if spec.cancel:
            finish("Cancelled", Reason.CANCELLED, "cancelled before it started")
            out.status = status
            return out
        missing = sorted({s.model for s in spec.steps if model_exists is not None and not model_exists(s.model)})
        if missing:
            msg = f"no ModelDeployment named {', '.join(missing)} in this namespace (yet)"
            status["phase"] = "Pending"
            status["message"] = msg
            condition(Cond.ACCEPTED, False, Reason.MODEL_NOT_FOUND, msg)
            out.requeue = True
            out.status = status if status != old else None
            if out.status is not None:
                out.events.append(("Warning", Reason.MODEL_NOT_FOUND, msg))
            return out
        status["phase"] = "Running"
        status["specDigest"] = spec_digest(spec)
        status["startedAt"] = iso(now)
        status["message"] = f"{len(spec.steps)} steps"
        condition(Cond.ACCEPTED, True, Reason.ADMITTED, f"{len(spec.steps)} steps, acyclic")
        condition(Cond.RUNNING, True, Reason.STEPS_RUNNING, "steps are running")
        status["steps"] = [{"name": s.name, "model": s.model, "phase": "Pending", "instances": []} for s in spec.steps]
    elif status.get("specDigest") and status["specDigest"] != spec_digest(spec):
        # An edit CEL could not see (inputs, params): the workflow would no longer describe what ran.
        steps = {st["name"]: st for st in status.get("steps") or []}
        return _wind_down(out, status, old, steps, spec, now, finish, (Reason.SPEC_CHANGED, SPEC_CHANGED_MESSAGE))
    if generation is not None:
        status["observedGeneration"] = generation

    steps = {st["name"]: st for st in status.get("steps") or []}
    order = topological(spec)
    name = meta.get("name", "workflow")

    # -- observe every job in flight -------------------------------------------------------------------------
    recreate: set[str] = set()  # step jobs created but never seen (or deleted): create them again
    for s in order:
        st = steps[s.name]
        for inst in st["instances"]:
            if inst.get("phase") != "Running":
                continue
            job = jobs.get(inst["job"])
            if job is None:
                started = parse_iso(inst.get("startedAt"))
                if started is not None and (now - started).total_seconds() > RECREATE_AFTER_SECONDS:
                    recreate.add(inst["job"])
                continue
            phase, kept = job_outcome(job)
            if kept.get("routedTo") and not inst.get("routedTo"):
                out.events.append(
                    ("Warning", "StepRerouted", f"step {s.name} job {inst['job']}: {kept.get('message', '')}")
                )
            inst.update({k: v for k, v in kept.items() if k in ("routedTo", "message")})
            if phase not in FINISHED:
                continue
            inst.update(kept)
            inst["seconds"] = _seconds(inst.get("startedAt"), kept.get("finishedAt") or iso(now))
            if phase == "Succeeded":
                inst["phase"] = "Succeeded"
            elif phase == "Failed" and inst.get("attempt", 0) < s.retries:
                inst["attempt"] = inst.get("attempt", 0) + 1
                inst["phase"] = "Pending"
                out.events.append(
                    (
                        "Warning",
                        "StepRetrying",
                        f"step {s.name} job {inst['job']} failed ({kept.get('message')}); retrying",
                    )
                )
            else:
                inst["phase"] = "Failed" if phase == "Failed" else "Cancelled"
                if phase == "Cancelled":  # cancelled from outside (its job deleted or cancelled): the workflow fails
                    inst["phase"] = "Failed"
                    inst["message"] = f"its job was cancelled: {kept.get('message') or ''}".strip()

    if spec.cancel or _failures(steps):
        return _wind_down(out, status, old, steps, spec, now, finish)

    # -- start what is ready -----------------------------------------------------------------------------------
    unfinished = sum(1 for st in steps.values() for i in st["instances"] if i.get("phase") == "Running")
    labels = {WORKFLOW_LABEL: name}
    tenant = (meta.get("labels") or {}).get(TENANT_LABEL)
    if tenant:
        labels[TENANT_LABEL] = tenant
    for s in order:
        st = steps[s.name]
        if st.get("count") is None:
            try:
                count = resolve_count(s, spec.inputs, steps)
            except NotReady:
                continue
            except RefError as e:
                _fail_step(st, str(e), now)
                continue
            if count > MAX_ITEMS:
                _fail_step(st, f"forEach has {count} items, more than {MAX_ITEMS}", now)
                continue
            st["count"] = count
            st["fannedOut"] = s.for_each is not None
            st["instances"] = [{"index": i, "phase": "Pending", "attempt": 0, "job": ""} for i in range(count)]
        for inst in st["instances"]:
            again = inst.get("phase") == "Running" and inst.get("job") in recreate
            if inst.get("phase") != "Pending" and not again:
                continue
            if not again and unfinished >= spec.max_parallel:
                break
            index = inst["index"]
            scope = Scope(
                spec.inputs,
                steps,
                s.name,
                index,
                st["count"] if st.get("fannedOut") else None,
                item=_item_getter(s, spec.inputs, steps, index) if s.for_each is not None else None,
            )
            try:
                explicit_ready(s, st, steps, index)
                if scope.item is not None:
                    scope.item()  # a job of a step mapped over X waits for its own X job, used or not
                params = render(s.params, scope)
                body = job_body(
                    wf,
                    spec,
                    s,
                    params,
                    job_name(name, s.name, index if st["fannedOut"] else None, inst.get("attempt", 0)),
                    labels,
                )
            except NotReady:
                continue
            except (RefError, ValueError) as e:
                inst["phase"] = "Failed"
                inst["message"] = str(e)[:4096]
                inst["finishedAt"] = iso(now)
                continue
            out.create.append(body)
            if not again:
                unfinished += 1
                inst.update(phase="Running", job=body["metadata"]["name"], startedAt=iso(now))
                for k in ("text", "images", "routedTo", "message", "finishedAt", "seconds"):
                    inst.pop(k, None)
            else:
                inst["startedAt"] = iso(now)

    if _failures(steps):  # a reference that can never resolve: nothing starts, the rest is cancelled
        out.create = []
        return _wind_down(out, status, old, steps, spec, now, finish)

    for st in steps.values():
        _step_phase(st, now)
    if all(st["phase"] == "Succeeded" for st in steps.values()):
        finish("Succeeded", Reason.COMPLETED, f"{len(steps)} steps succeeded")
    _progress(status, steps, spec)
    out.status = status if status != old else None
    return out


def _item_getter(
    s: WorkflowStep, inputs: dict[str, Any], steps: dict[str, dict[str, Any]], index: int
) -> Callable[[], Any]:
    return lambda: item_of(s, inputs, steps, index)


def _failures(steps: dict[str, dict[str, Any]]) -> list[str]:
    found = []
    for name, st in steps.items():
        if st.get("phase") == "Failed" and not st.get("instances"):
            found.append(f"step {name}: {st.get('message') or 'failed'}")
        for inst in st.get("instances") or []:
            if inst.get("phase") == "Failed":
                found.append(
                    f"step {name} job {inst.get('job') or inst.get('index')}: {inst.get('message') or 'failed'}"
                )
    return found


def _wind_down(
    out: Plan,
    status: dict[str, Any],
    old: dict[str, Any],
    steps: dict[str, dict[str, Any]],
    spec: ImageWorkflowSpec,
    now: datetime,
    finish: Callable[[str, str, str], None],
    failure: tuple[str, str] | None = None,
) -> Plan:
    """Cancel (spec.cancel) or fail (a job failed for good, or ``failure``'s reason and message): running jobs are
    cancelled, pending ones skipped."""
    failures = _failures(steps)
    for st in steps.values():
        for inst in st["instances"]:
            if inst.get("phase") == "Running":
                out.cancel.append(inst["job"])
                inst["phase"] = "Cancelled"
                inst["finishedAt"] = iso(now)
            elif inst.get("phase") == "Pending":
                inst["phase"] = "Skipped"
        _step_phase(st, now)
        if st["phase"] in ("Pending", "Running"):
            cancelled = any(i.get("phase") == "Cancelled" for i in st["instances"])
            st["phase"] = "Cancelled" if cancelled else "Skipped"
            st.setdefault("finishedAt", iso(now))
    if failure is not None:
        finish("Failed", *failure)
    elif spec.cancel and not failures:
        finish("Cancelled", Reason.CANCELLED, "cancelled; its running steps were cancelled")
    else:
        finish("Failed", Reason.STEP_FAILED, "; ".join(failures)[:4096])
    _progress(status, steps, spec)
    out.status = status if status != old else None
    return out


def explicit_ready(s: WorkflowStep, st: dict[str, Any], steps: dict[str, dict[str, Any]], index: int) -> None:
    """dependsOn: the dependency's job of the same index (both fanned out alike), else all of its jobs."""
    for d in s.depends_on:
        dep = steps[d]
        count = dep.get("count")
        if count is None:
            raise NotReady(d)
        instances = dep.get("instances") or []
        if st.get("fannedOut") and dep.get("fannedOut") and count == st.get("count"):
            if instances[index].get("phase") != "Succeeded":
                raise NotReady(d)
        elif len(instances) < count or any(i.get("phase") != "Succeeded" for i in instances):
            raise NotReady(d)


def _fail_step(st: dict[str, Any], msg: str, now: datetime) -> None:
    st["phase"] = "Failed"
    st["message"] = msg[:4096]
    st["finishedAt"] = iso(now)
    st["count"] = st.get("count") or 0


def _step_phase(st: dict[str, Any], now: datetime) -> None:
    instances = st.get("instances") or []
    st["succeeded"] = sum(1 for i in instances if i.get("phase") == "Succeeded")
    phases = {i.get("phase") for i in instances}
    if st.get("phase") == "Failed" and not instances:
        return
    if st.get("count") is None:
        st["phase"] = "Pending"
        return
    if "Failed" in phases:
        phase = "Failed"
    elif phases <= {"Succeeded"} and len(instances) == st["count"]:  # (a forEach over nothing: done)
        phase = "Succeeded"
    elif "Running" in phases or "Succeeded" in phases:
        phase = "Running"
    elif phases <= {"Skipped"} and instances:
        phase = "Skipped"
    elif "Cancelled" in phases and not ({"Running", "Pending"} & phases):
        phase = "Cancelled"
    else:
        phase = "Pending"
    if phase == "Running" and not st.get("startedAt"):
        st["startedAt"] = min((i["startedAt"] for i in instances if i.get("startedAt")), default=iso(now))
    if phase in FINISHED and not st.get("finishedAt"):
        st["finishedAt"] = max((i["finishedAt"] for i in instances if i.get("finishedAt")), default=iso(now))
        st.setdefault("startedAt", min((i["startedAt"] for i in instances if i.get("startedAt")), default=iso(now)))
    st["phase"] = phase


def _progress(status: dict[str, Any], steps: dict[str, dict[str, Any]], spec: ImageWorkflowSpec) -> None:
    done = sum(1 for st in steps.values() if st.get("phase") == "Succeeded")
    jobs_total = sum(st.get("count") or 0 for st in steps.values())
    jobs_done = sum(st.get("succeeded", 0) for st in steps.values())
    status["progress"] = {
        "stepsDone": done,
        "stepsTotal": len(spec.steps),
        "jobsDone": jobs_done,
        "jobsTotal": jobs_total,
        "summary": f"{done}/{len(spec.steps)}",
    }


def job_body(
    wf: dict[str, Any],
    spec: ImageWorkflowSpec,
    step: WorkflowStep,
    params: dict[str, Any],
    name: str,
    labels: dict[str, str],
) -> dict[str, Any]:
    """The step job's ImageJob, validated (ValueError with the reason when the params make no valid job)."""
    meta = wf.get("metadata") or {}
    fields: dict[str, Any] = {**params, "model": step.model, "priority": step.priority or spec.priority}
    if step.timeout_seconds is not None:
        fields["timeoutSeconds"] = step.timeout_seconds
    if "prompt" not in fields:
        fields["prompt"] = step.name  # a function step needs none; the schema wants one
    try:
        job_spec = ImageJobSpec.model_validate(fields)
    except ValidationError as e:
        raise ValueError(
            "; ".join(f"params.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        ) from e
    errors = job_spec.cross_field_errors()
    if errors:
        raise ValueError("; ".join(e.replace("spec.", "params.") for e in errors))
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ImageJob",
        "metadata": {
            "name": name,
            "namespace": meta.get("namespace", ""),
            "labels": {**labels, STEP_LABEL: step.name},
        },
        "spec": job_spec.wire(),
    }
    if meta.get("uid"):
        body["metadata"]["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": "ImageWorkflow",
                "name": meta.get("name"),
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": False,
            }
        ]
    return body
