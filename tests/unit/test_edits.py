"""An ImageJob spec edit that got past the API server (no CEL): what is reported, table-driven; and the handler."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest

from zimage_operator.edits import MAX_FIELDS_NAMED, changed_fields, edited_fields, spec_digest, spec_edit_event
from zimage_operator.handlers.imagejob import report_edit
from zimage_operator.types import GROUP, VERSION, Reason


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
    event = spec_edit_event(None if old is None else spec_digest(old), new, status)
    assert event == (None if expected is None else (Reason.SPEC_CHANGED, expected))


def test_many_changed_fields_are_counted_not_listed() -> None:
    new = spec(prompt="b", negativePrompt="n", width=64, height=64, steps=2, seed=1, numImages=2, strength=0.5,
               guidanceScale=1.0, outputFormat="webp")  # fmt: skip
    event = spec_edit_event(spec_digest(spec()), new, {})
    assert event is not None
    fields = changed_fields(spec(), new)
    assert len(fields) == 10 > MAX_FIELDS_NAMED
    named = ", ".join(f"spec.{f}" for f in fields[:MAX_FIELDS_NAMED])
    assert f"{named} and 2 more changed" in event[1] and "spec.outputFormat" not in event[1]


def test_reason_is_camel_case() -> None:
    assert Reason.SPEC_CHANGED == "SpecChanged"


def test_a_field_added_to_the_crd_since_admission_is_no_edit() -> None:
    """The digest admitted before the CRD knew ``width`` lacks it; the defaulted value is no edit."""
    admitted = {k: v for k, v in spec_digest(spec()).items() if k != "width"}
    assert edited_fields(admitted, spec(width=1024)) == []
    assert edited_fields(admitted, spec(width=512)) == ["width"]


class RecordingRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, Any], str, str, str, str | None]] = []

    def record(self, obj: dict[str, Any], type_: str, reason: str, message: str, key: str | None = None) -> None:
        self.events.append((obj, type_, reason, message, key))


def watched(new: dict[str, Any], generation: int, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageJob",
        "metadata": {"name": "fox", "namespace": "ns", "uid": "u-1", "resourceVersion": "7", "generation": generation},
        "spec": new,
        "status": {"specDigest": spec_digest(spec()), **status},
    }


def report(*bodies: dict[str, Any]) -> RecordingRecorder:
    recorder = RecordingRecorder()
    rt = SimpleNamespace(recorder=recorder)
    reported: OrderedDict[str, int] = OrderedDict()
    for body in bodies:
        report_edit(rt, reported, body)  # type: ignore[arg-type]
    return recorder


def test_an_edit_is_reported_once_per_generation_as_a_warning_on_the_job() -> None:
    edited = watched(spec(prompt="b"), 2, {"phase": "Queued"})
    recorder = report(edited, edited, {**edited, "status": {**edited["status"], "phase": "Running"}})
    [(obj, type_, reason, message, key)] = recorder.events  # later watch events of the same edit: no repeat
    assert (type_, reason, key) == ("Warning", "SpecChanged", "specchanged-2") and "spec.prompt" in message
    assert obj["kind"] == "ImageJob" and obj["apiVersion"] == f"{GROUP}/{VERSION}"
    assert obj["metadata"]["uid"] == "u-1" and obj["metadata"]["namespace"] == "ns"
    again = report(edited, watched(spec(prompt="c"), 3, {"phase": "Queued"}))
    assert [e[4] for e in again.events] == ["specchanged-2", "specchanged-3"]


def test_an_edit_that_only_spells_out_defaults_is_not_reported() -> None:
    assert report(watched(spec(width=1024), 2, {"phase": "Queued"})).events == []
