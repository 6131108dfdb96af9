"""An edit of an ImageJob's spec: reported, never acted on.

The CRD refuses spec changes (a CEL transition rule, Kubernetes 1.25 and later). A cluster without CEL stores
the edit; the job already enqueued keeps running with the spec it was admitted with (nothing is re-enqueued),
and the user learns why from a Warning Event (reason ``SpecChanged``) instead of from a result that ignores
their change. kopf keeps the last handled spec in ``status.kopf`` (see ``__main__``), so ``old`` is there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic_core import PydanticUndefined

from zimage_operator.runtime import Runtime
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, TERMINAL_PHASES, VERSION, ImageJobSpec, Reason

RESOURCE = (GROUP, VERSION, IMAGEJOB_PLURAL)
MAX_FIELDS_NAMED = 8


def _defaults() -> dict[str, Any]:
    """The spec fields the API server defaults, by their camelCase names (as the CRD states them)."""
    out = {}
    for name, field in ImageJobSpec.model_fields.items():
        if field.default is not PydanticUndefined and field.default is not None:
            out[field.alias or name] = field.default
    return out


_DEFAULTS = _defaults()
_ORDER = [f.alias or n for n, f in ImageJobSpec.model_fields.items()]


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """The spec fields whose value differs, in the model's field order (unknown ones after, sorted).

    A field missing on one side counts as its default: a CRD upgrade that adds a defaulted field is no edit.
    """
    before, after = {**_DEFAULTS, **(old or {})}, {**_DEFAULTS, **(new or {})}
    keys = set(before) | set(after)
    differ = {k for k in keys if before.get(k) != after.get(k)}
    return [k for k in _ORDER if k in differ] + sorted(differ - set(_ORDER))


def spec_edit_event(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, status: Mapping[str, Any]
) -> tuple[str, str] | None:
    """(reason, message) of the Warning to record for a spec edit, or None when there is nothing to report."""
    if old is None:  # no spec handled before: a creation, which admission handles
        return None
    fields = changed_fields(old, new)
    if not fields:
        return None
    named = ", ".join(f"spec.{f}" for f in fields[:MAX_FIELDS_NAMED])
    if len(fields) > MAX_FIELDS_NAMED:
        named += f" and {len(fields) - MAX_FIELDS_NAMED} more"
    phase = status.get("phase")
    if phase in TERMINAL_PHASES:
        outcome = f"the job has already finished ({phase}) and is not run again"
    else:
        outcome = "the job keeps the spec it was admitted with and is not enqueued again"
    message = f"spec is immutable once created: {named} changed; {outcome}. Create a new ImageJob instead."
    return Reason.SPEC_CHANGED, message


@kopf.on.update(*RESOURCE, field="spec")
async def spec_changed(old: Any, new: Any, status: kopf.Status, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Record a Warning Event for an edit the API server let through (no CEL); change nothing else."""
    rt: Runtime = memo.runtime
    event = spec_edit_event(old, new, dict(status))
    if event is not None:
        involved = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": dict(body.metadata)}
        await asyncio.to_thread(rt.kube.post_event, involved, "Warning", *event)
