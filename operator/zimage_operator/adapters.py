"""LoRA adapters at admission: a job's ``spec.loras`` against its ModelDeployment's ``spec.adapters`` (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from zimage_operator.types import ModelDeploymentSpec, Reason
from zimage_queue.message import AdapterSpec, LoraRef

PER_JOB_DEFAULT: int = ModelDeploymentSpec.model_fields["max_adapters_per_job"].default


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def resolve(loras: list[LoraRef] | None, model_name: str, model_spec: dict[str, Any]) -> list[LoraRef] | Refusal:
    """The job's adapters with every scale resolved (the job's, else the adapter's defaultScale), or why the
    model cannot run them: an adapter it does not serve, or more than its maxAdaptersPerJob."""
    if not loras:
        return []
    # Only the fields this needs: a ModelDeployment wrong elsewhere reports that on itself.
    served = {}
    for raw in model_spec.get("adapters") or []:
        try:
            adapter = AdapterSpec.model_validate(raw)
        except ValidationError:
            continue
        served[adapter.name] = adapter
    limit = model_spec.get("maxAdaptersPerJob", PER_JOB_DEFAULT)
    unknown = [lora.name for lora in loras if lora.name not in served]
    if unknown:
        offered = ", ".join(sorted(served)) or "none"
        return Refusal(
            Reason.UNKNOWN_ADAPTER,
            f"spec.loras: ModelDeployment {model_name} has no adapter {', '.join(map(repr, unknown))} "
            f"(its adapters: {offered})",
        )
    if len(loras) > limit:
        return Refusal(
            Reason.TOO_MANY_ADAPTERS,
            f"spec.loras: {len(loras)} adapters; ModelDeployment {model_name} allows "
            f"{limit} per job (spec.maxAdaptersPerJob)",
        )
    return [
        LoraRef(name=lora.name, scale=lora.scale if lora.scale is not None else served[lora.name].default_scale)
        for lora in loras
    ]


def status(served: list[AdapterSpec] | None, loaded: dict[str, list[str]]) -> list[dict[str, Any]] | None:
    """``status.adapters``: each served adapter and the live workers holding it (``JobQueue.loaded_adapters``)."""
    if not served:
        return None
    return [{"name": a.name, "workers": loaded.get(a.name, [])[:100]} for a in served]
