"""Model names clients already send, and what ModelDeployment each one means.

Built in: OpenAI's image model names (``dall-e-2``, ``dall-e-3``, ``gpt-image-1``, ``gpt-image-1-mini``,
``gpt-image-1.5``) mean the API's default model; a variant's name (``turbo``, ``base``, ``edit``) means a
ModelDeployment of that variant: the default model when it is one, else the first by name. A ModelDeployment's
own name wins over a built-in alias.

Configured (``ZIMAGE_API_MODEL_ALIASES``, the chart's ``api.modelAliases``): alias -> ModelDeployment name. They
add names and override the built-in ones, and win over a ModelDeployment of the same name; mapped to "", a
built-in alias is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

from zimage_operator.types import Variant

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
VARIANTS: tuple[str, ...] = get_args(Variant)
BUILT_IN = frozenset(OPENAI_MODELS) | frozenset(VARIANTS)


def variant_of(model: Mapping[str, Any]) -> str:
    """A ModelDeployment's variant, as its spec says (turbo when it says nothing, like the CRD's default)."""
    return str(((model.get("spec") or {}).get("model") or {}).get("variant") or "turbo")


def may_be_alias(name: str, configured: Mapping[str, str]) -> bool:
    """Whether resolving ``name`` needs the model list at all (every other name is a ModelDeployment's)."""
    return name in configured or name in BUILT_IN


def aliases(configured: Mapping[str, str], models: list[dict[str, Any]], default: str | None) -> dict[str, str]:
    """Every alias in force: alias -> ModelDeployment name (in this order: OpenAI's, the variants', the
    configured ones). ``default``: the API's default model, None when it has none."""
    names = {str(m["metadata"]["name"]) for m in models}
    out: dict[str, str] = {}
    if default:
        out.update(dict.fromkeys(OPENAI_MODELS, default))
    for variant in VARIANTS:
        of_variant = sorted(str(m["metadata"]["name"]) for m in models if variant_of(m) == variant)
        if of_variant:
            out[variant] = default if default in of_variant else of_variant[0]
    for name in names & out.keys():
        del out[name]
    for name, target in configured.items():
        if target:
            out[name] = target
        else:
            out.pop(name, None)
    return out
