"""What a ModelDeployment's variant accepts (issue 19): a job whose task or reference images its model cannot take
is refused before it is enqueued, by the operator (a Failed condition, reason UnsupportedTask) and by the API (400
``unsupported_task``) alike. Pure; the table is ``zimage_queue.message.VARIANT_DEFAULTS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zimage_queue.message import GenerationParams


def refusal(params: GenerationParams, model: str, spec: Mapping[str, Any]) -> str | None:
    """Why the ModelDeployment ``model`` (its ``spec``) cannot run ``params``, or None. Only the diffusers
    backend runs Z-Image variants; a remote or function pool is judged by its own backend when it runs the job."""
    if (spec.get("backend") or "diffusers") != "diffusers":
        return None
    errors = params.variant_errors((spec.get("model") or {}).get("variant"))
    return f"{'; '.join(errors)} (ModelDeployment {model})" if errors else None
