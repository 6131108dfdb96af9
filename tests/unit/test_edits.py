"""An ImageJob spec edit that got past the API server (no CEL): what is reported, table-driven; and the handler."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

import zimage_operator.handlers  # noqa: F401  (the package registers the edits handler)
from zimage_operator.handlers.edits import MAX_FIELDS_NAMED, changed_fields, spec_changed, spec_edit_event
from zimage_operator.types import GROUP, IMAGEJOB_PLURAL, VERSION, Reason


def spec(**kw: Any) -> dict[str, Any]:
    return {"model": "z-image-turbo", "prompt": "a red fox", **kw}


@pytest.mark.parametrize(
    ("old", "new", "fields"),
    [
        (spec(), spec(), []),
        (spec(), spec(prompt="a blue fox"), ["prompt"]),
        (spec(), spec(model="other", steps=4, prompt="x"), ["prompt", "steps", "model"]),  # the CRD's field order
        (spec(seed=3), spec(), ["seed"]),  # a field taken away
        (spec(), spec(seed=3), ["seed"]),  # a field added
        # a field missing on one side is its default: a CRD upgrade that defaults a new field is no edit
        (spec(), spec(width=1024, priority="normal", maxRetries=3), []),
        (spec(), spec(width=512), ["width"]),
        (spec(), spec(priority="high"), ["priority"]),
        (spec(), {**spec(), "zzUnknown": 1, "aaUnknown": 2}, ["aaUnknown", "zzUnknown"]),
        (None, spec(), ["prompt", "model"]),
    ],
)
def test_changed_fields(old: dict[str, Any] | None, new: dict[str, Any], fields: list[str]) -> None:
    assert changed_fields(old, new) == fields


@pytest.mark.parametrize(
    ("old", "new", "status", "expected"),
    [
        (None, spec(), {}, None),  # a creation: admission's business
        (spec(), spec(), {"phase": "Queued"}, None),
        (spec(), spec(width=1024), {"phase": "Queued"}, None),  # only a default made explicit
        (
            spec(),
            spec(prompt="a blue fox"),
            {"phase": "Queued"},
            "spec is immutable once created: spec.prompt changed; the job keeps the spec it was admitted with "
            "and is not enqueued again. Create a new ImageJob instead.",
        ),
        (
            spec(),
            spec(prompt="b", steps=3),
            {"phase": "Running"},
            "spec is immutable once created: spec.prompt, spec.steps changed; the job keeps the spec it was "
            "admitted with and is not enqueued again. Create a new ImageJob instead.",
        ),
        (
            spec(),
            spec(prompt="b"),
            {"phase": "Succeeded"},
            "spec is immutable once created: spec.prompt changed; the job has already finished (Succeeded) and "
            "is not run again. Create a new ImageJob instead.",
        ),
        (
            spec(task="image-to-image"),
            spec(task="image-to-image", inputImage="s3://b/tenants/ns/in.png"),
            {"phase": "Failed"},  # fixing an InvalidSpec job in place does not run it either
            "spec is immutable once created: spec.inputImage changed; the job has already finished (Failed) and "
            "is not run again. Create a new ImageJob instead.",
        ),
    ],
)
def test_spec_edit_event(
    old: dict[str, Any] | None, new: dict[str, Any], status: dict[str, Any], expected: str | None
) -> None:
    event = spec_edit_event(old, new, status)
    assert event == (None if expected is None else (Reason.SPEC_CHANGED, expected))


def test_many_changed_fields_are_counted_not_listed() -> None:
    new = spec(prompt="b", negativePrompt="n", width=64, height=64, steps=2, seed=1, numImages=2, strength=0.5,
               guidanceScale=1.0, outputFormat="webp")  # fmt: skip
    event = spec_edit_event(spec(), new, {})
    assert event is not None
    fields = changed_fields(spec(), new)
    assert len(fields) == 10 > MAX_FIELDS_NAMED
    named = ", ".join(f"spec.{f}" for f in fields[:MAX_FIELDS_NAMED])
    assert f"{named} and 2 more changed" in event[1] and "spec.outputFormat" not in event[1]


def test_reason_is_camel_case() -> None:
    assert Reason.SPEC_CHANGED == "SpecChanged"


def test_the_handler_is_registered_for_spec_updates_of_imagejobs() -> None:
    handlers = [h for h in kopf.get_default_registry()._changing.get_all_handlers() if h.fn is spec_changed]
    assert len(handlers) == 1
    (h,) = handlers
    assert h.reason == kopf.Reason.UPDATE and h.field == ("spec",)
    assert (h.selector.group, h.selector.version, h.selector.any_name) == (GROUP, VERSION, IMAGEJOB_PLURAL)


class RecordingKube:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, Any], str, str, str]] = []

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((obj, type_, reason, message))


def call(old: dict[str, Any], new: dict[str, Any], status: dict[str, Any]) -> RecordingKube:
    kube = RecordingKube()
    raw = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageJob",
        "metadata": {"name": "fox", "namespace": "ns", "uid": "u-1", "resourceVersion": "7"},
        "spec": new,
        "status": status,
    }
    body = kopf.Body(raw)
    memo = SimpleNamespace(runtime=SimpleNamespace(kube=kube))
    asyncio.run(spec_changed(old=old, new=new, status=body.status, body=body, memo=memo))  # type: ignore[arg-type]
    return kube


def test_the_handler_posts_one_warning_on_the_job_and_changes_nothing() -> None:
    kube = call(spec(), spec(prompt="b"), {"phase": "Queued"})
    [(obj, type_, reason, message)] = kube.events
    assert (type_, reason) == ("Warning", "SpecChanged") and "spec.prompt" in message
    assert obj["kind"] == "ImageJob" and obj["apiVersion"] == f"{GROUP}/{VERSION}"
    assert obj["metadata"]["uid"] == "u-1" and obj["metadata"]["namespace"] == "ns"


def test_the_handler_is_quiet_when_only_defaults_appear() -> None:
    assert call(spec(), spec(width=1024), {"phase": "Queued"}).events == []
