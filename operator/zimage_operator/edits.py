"""An edit of an ImageJob's spec: reported, never acted on.

The CRD refuses spec changes (a CEL transition rule, Kubernetes 1.25 and later). A cluster without CEL stores
the edit; the job already enqueued keeps running with the spec it was admitted with (nothing is re-enqueued),
and the user learns why from a Warning Event (reason ``SpecChanged``) instead of from a result that ignores
their change. Admission records a short digest of every spec field in ``status.specDigest`` (not the spec
itself: the object stays small), so a later spec is compared field by field with what was admitted. Pure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticUndefined

from zimage_operator.types import TERMINAL_PHASES, ImageJobSpec, Reason

MAX_FIELDS_NAMED = 8
DIGEST_CHARS = 12


def _defaults() -> dict[str, Any]:
    """The spec fields the API server defaults, by their camelCase names (as the CRD states them)."""
    out = {}
    for name, field in ImageJobSpec.model_fields.items():
        if field.default is not PydanticUndefined and field.default is not None:
            out[field.alias or name] = field.default
    return out


_DEFAULTS = _defaults()
_ORDER = [f.alias or n for n, f in ImageJobSpec.model_fields.items()]


def spec_digest(spec: Mapping[str, Any]) -> dict[str, str]:
    """A short hash of every spec field's value, defaults filled in (a missing field counts as its default)."""
    out = {}
    for k, v in {**_DEFAULTS, **spec}.items():
        raw = json.dumps(v, sort_keys=True, separators=(",", ":"), default=str).encode()
        out[k] = hashlib.blake2b(raw, digest_size=DIGEST_CHARS // 2).hexdigest()
    return out


_DEFAULT_DIGEST = spec_digest({})


def _differ(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    keys = set(before) | set(after)
    differ = {k for k in keys if before.get(k) != after.get(k)}
    return [k for k in _ORDER if k in differ] + sorted(differ - set(_ORDER))


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """The spec fields whose value differs, in the model's field order (unknown ones after, sorted).

    A field missing on one side counts as its default: a CRD upgrade that adds a defaulted field is no edit.
    """
    return _differ(spec_digest(old or {}), spec_digest(new or {}))


def edited_fields(admitted: Mapping[str, str], new: Mapping[str, Any] | None) -> list[str]:
    """The fields of spec ``new`` that differ from the admitted spec's digest (a field the digest lacks, added
    to the CRD since, counts as its default)."""
    return _differ({**_DEFAULT_DIGEST, **admitted}, spec_digest(new or {}))


def spec_edit_event(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, status: Mapping[str, Any]
) -> tuple[str, str] | None:
    """(reason, message) of the Warning to record for a spec edit, or None when there is nothing to report.

    ``old`` is the admitted spec's digest (``spec_digest``), ``new`` the spec now."""
    if old is None:  # not admitted yet: admission takes the spec as it is
        return None
    fields = edited_fields(old, new)
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
