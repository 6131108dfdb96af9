"""What a ModelDeployment's variant accepts (issue 19): a job whose task or reference images its model cannot take
is refused before it is enqueued, by the operator (a Failed condition, reason UnsupportedTask) and by the API (400
``unsupported_task``) alike. Pure; the table is ``zimage_queue.message.VARIANT_DEFAULTS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zimage_queue.message import VARIANT_DEFAULTS, GenerationParams, VariantDefaults


def judged(spec: Mapping[str, Any]) -> bool:
    """Whether a ModelDeployment ``spec``'s variant says what it accepts: only the diffusers backend runs Z-Image
    variants; a remote or function pool is judged by its own backend when it runs the job."""
    return (spec.get("backend") or "diffusers") == "diffusers"


def accepts(spec: Mapping[str, Any]) -> VariantDefaults | None:
    """What the ModelDeployment ``spec``'s variant accepts (tasks, reference images); None where no variant
    judges (another backend, or a variant newer than this release)."""
    if not judged(spec):
        return None
    return VARIANT_DEFAULTS.get((spec.get("model") or {}).get("variant") or "turbo")


def refusal(params: GenerationParams, model: str, spec: Mapping[str, Any]) -> str | None:
    """Why the ModelDeployment ``model`` (its ``spec``) cannot run ``params``, or None (see ``judged``)."""
    if not judged(spec):
        return None
    errors = params.variant_errors((spec.get("model") or {}).get("variant"))
    return f"{'; '.join(errors)} (ModelDeployment {model})" if errors else None
