"""What ``zimage`` tells a user when something goes wrong: one line, naming the flag at fault as it is typed.

``UserError`` (exit 2) is for what the user can fix: a flag out of range, an unreadable file, an unknown model,
an unreachable API, a refused key, any other 4xx of the API. ``Failure`` (exit 1) is for what they cannot: a
failed job, an API 5xx. ``zimage.cli.main`` prints either as ``zimage: error: <message>``; anything else is a
bug and exits 1 too. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from annotated_types import Ge, Le, MultipleOf
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    import httpx

USAGE = 2
FAILED = 1


class CliError(Exception):
    exit_code = FAILED


class UserError(CliError):
    """Exit 2: the user can fix it."""

    exit_code = USAGE


class Failure(CliError):
    """Exit 1: a job failed, or the API did."""


# GenerationParams fields (and their camelCase wire names, as the API reports them in `param` and messages)
# spelt as `zimage generate` takes them.
FLAGS = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "size": "--width/--height",
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "num_images": "-n/--num-images",
    "n": "-n/--num-images",
    "strength": "--strength",
    "output_format": "--format",
    "model": "--model",
    "input_image": "--image",
    "image": "--image",
    "mask_image": "--mask",
    "reference_images": "--reference",
    "mask": "--mask",
    "mode": "--bulk",
    "id": "ID",
    "limit": "--limit",
    "phase": "--phase",
    "from": "--from",
    "to": "--to",
    "group_by": "--group-by",
    "tenant": "--tenant",
    "q": "--q",
}
_BY_WIRE_NAME = {to_camel(field): flag for field, flag in FLAGS.items()}
_BOUND_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than", "multiple_of"}


def flag(field: str) -> str:
    """``num_images`` or ``numImages`` -> ``-n/--num-images``; an unknown name stays as it is."""
    return FLAGS.get(field) or _BY_WIRE_NAME.get(field) or field


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds(model: type[BaseModel], field: str) -> str | None:
    """``between 64 and 2048, a multiple of 16`` from the field's own constraints (one source of bounds)."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    lo = next((m.ge for m in info.metadata if isinstance(m, Ge)), None)
    hi = next((m.le for m in info.metadata if isinstance(m, Le)), None)
    step = next((m.multiple_of for m in info.metadata if isinstance(m, MultipleOf)), None)
    if lo is None or hi is None:
        return None
    text = f"between {_number(lo)} and {_number(hi)}"
    return f"{text}, a multiple of {_number(step)}" if step is not None else text


def _describe(err: Any, model: type[BaseModel]) -> str:
    field = str(err["loc"][0]) if err.get("loc") else ""
    name = flag(field)
    kind, ctx = err.get("type"), err.get("ctx") or {}
    if kind in _BOUND_ERRORS and (bounds := _bounds(model, field)):
        return f"{name} must be {bounds}"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return f"{name} must not be empty"
    if kind == "string_too_long":
        return f"{name} must be at most {ctx.get('max_length')} characters"
    if kind == "literal_error" and ctx.get("expected"):
        return f"{name} must be one of {ctx['expected']}"
    return f"{name}: {err.get('msg', 'invalid')}"


def invalid(e: ValidationError, model: type[BaseModel]) -> UserError:
    """A model's validation errors, all on one line, each naming its flag."""
    return UserError("; ".join(_describe(err, model) for err in e.errors()))


def flagged(message: str) -> str:
    """The API's ``"numImages: Input should be ..."; "model: no model named ..."`` with the flags' names."""
    parts = []
    for part in message.split("; "):
        field, sep, rest = part.partition(": ")
        parts.append(f"{flag(field)}{sep}{rest}" if sep and re.fullmatch(r"[A-Za-z_.]+", field) else part)
    return "; ".join(parts)


def from_response(r: httpx.Response) -> CliError:
    """An API error response (OpenAI's ``{"error": {"message", ...}}``, or anything else) as one line."""
    try:
        body = r.json()
        message = str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = r.text.strip() or r.reason_phrase
    message = " ".join(flagged(message).split())  # one line, whatever the server sent
    if r.status_code == 401:
        if "authorization" not in r.request.headers and "x-api-key" not in r.request.headers:
            return UserError("the API wants a key: pass --api-key or set $ZIMAGE_API_KEY")
        return UserError(f"the API refused the key: {message} (check --api-key or $ZIMAGE_API_KEY)")
    if r.status_code == 403:
        return UserError(f"the API key may not do this: {message}")
    if r.status_code < 500:
        return UserError(message)
    return Failure(f"the API failed ({r.status_code}): {message}")


def _os_reason(e: BaseException) -> str:
    """``connection refused``: the operating system's words for a failed connect, from the exception chain."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[0].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    text = str(e) or e.__class__.__name__
    if m := re.match(r"^\[Errno -?\d+\] (.+)$", text):
        text = m[1]
    return text[0].lower() + text[1:]


def unreachable(url: str, e: httpx.TransportError) -> UserError:
    import httpx

    if isinstance(e, httpx.TimeoutException):
        return UserError(f"the API at {url} did not answer in time ({e.__class__.__name__})")
    return UserError(f"cannot reach the API at {url}: {_os_reason(e)}")
