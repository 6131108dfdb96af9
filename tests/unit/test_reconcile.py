"""Pure ImageJob decisions, table-driven: no cluster, no Redis."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from zimage_operator.conditions import set_condition
from zimage_operator.events import collapse
from zimage_operator.reconcile import admit, cancel_patch, event_patch, seconds_until_expiry, timeout_patch
from zimage_queue import JobEvent

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
META = {"uid": "u-1", "namespace": "ns", "name": "fox", "generation": 1, "creationTimestamp": "2026-11-23T11:59:00Z"}
MODEL = {"spec": {"model": {"variant": "turbo"}}}


def spec(**kw: Any) -> dict[str, Any]:
    return {"model": "z-image-turbo", "prompt": "a red fox", **kw}


def cond(patch: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in patch["conditions"] if c["type"] == type_)


def test_admit_enqueues_with_resolved_defaults() -> None:
    d = admit(spec=spec(), status={}, meta=META, model=MODEL, now=NOW, rng=random.Random(1))
    assert d.action == "enqueue" and d.message is not None
    p = d.message.params
    assert (p.steps, p.guidance_scale, p.width, p.height) == (8, 0.0, 1024, 1024)
    assert p.seed is not None and d.patch["seed"] == p.seed
    assert d.message.queue == "ns/z-image-turbo" and d.message.uid == "u-1"
    assert d.patch["phase"] == "Queued" and cond(d.patch, "Queued")["status"] == "True"
    assert d.patch["observedGeneration"] == 1


@pytest.mark.parametrize(("variant", "steps", "guidance"), [("turbo", 8, 0.0), ("base", 50, 4.0)])
def test_steps_and_guidance_default_from_variant(variant: str, steps: int, guidance: float) -> None:
    d = admit(spec=spec(), status={}, meta=META, model={"spec": {"model": {"variant": variant}}}, now=NOW)
    assert d.message and (d.message.params.steps, d.message.params.guidance_scale) == (steps, guidance)


def test_explicit_values_win_and_seed_is_kept_on_retry() -> None:
    d = admit(spec=spec(steps=4, guidanceScale=1.5, seed=42), status={}, meta=META, model=MODEL, now=NOW)
    assert d.message and (d.message.params.steps, d.message.params.guidance_scale, d.message.params.seed) == (
        4,
        1.5,
        42,
    )
    first = admit(spec=spec(), status={}, meta=META, model=MODEL, now=NOW)
    again = admit(
        spec=spec(), status={"phase": "Pending", "seed": first.patch["seed"]}, meta=META, model=MODEL, now=NOW
    )
    assert again.message and again.message.params.seed == first.patch["seed"]


def test_unknown_model_waits_pending() -> None:
    d = admit(spec=spec(), status={}, meta=META, model=None, now=NOW)
    assert d.action == "wait" and d.patch["phase"] == "Pending"
    assert cond(d.patch, "Queued")["reason"] == "ModelNotFound"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"task": "image-to-image"}, "spec.inputImage"),
        ({"task": "inpaint", "inputImage": "s3://b/in.png"}, "spec.maskImage"),
        ({"inputImage": "s3://b/in.png"}, "spec.inputImage"),
        ({"width": 1000}, "spec.width"),
        ({"prompt": ""}, "spec.prompt"),
    ],
)
def test_invalid_specs_fail_with_reason_and_field(bad: dict[str, Any], field: str) -> None:
    d = admit(spec=spec(**bad), status={}, meta=META, model=MODEL, now=NOW)
    assert d.action == "fail" and d.patch["phase"] == "Failed"
    c = cond(d.patch, "Failed")
    assert c["reason"] == "InvalidSpec" and field in c["message"]


@pytest.mark.parametrize("phase", ["Running", "Succeeded", "Failed", "Cancelled"])
def test_admit_skips_jobs_already_past_the_queue(phase: str) -> None:
    assert admit(spec=spec(), status={"phase": phase}, meta=META, model=MODEL, now=NOW).action == "skip"


def test_queued_job_is_enqueued_again_idempotently() -> None:
    # A handler retried after its status write but before XADD must still enqueue (the queue dedupes by uid).
    d = admit(spec=spec(), status={"phase": "Queued", "seed": 5}, meta=META, model=MODEL, now=NOW)
    assert d.action == "enqueue" and d.message and d.message.params.seed == 5


def ev(type_: str, ts: float = NOW.timestamp(), **kw: Any) -> JobEvent:
    return JobEvent.model_validate(
        {"type": type_, "uid": "u-1", "namespace": "ns", "name": "fox", "worker": "w1", "attempt": 1, "ts": ts, **kw}
    )


def test_lifecycle_started_progress_succeeded() -> None:
    status: dict[str, Any] = {
        "phase": "Queued",
        "queuedAt": "2026-11-23T11:59:58Z",
        "progress": {"step": 0, "totalSteps": 8},
    }
    patch, event = event_patch(status, ev("started", total_steps=8), NOW)
    assert patch and patch["phase"] == "Running" and patch["queueSeconds"] == 2.0 and event
    status.update(patch)
    patch, _ = event_patch(status, ev("progress", step=3, total_steps=8), NOW)
    assert patch == {"progress": {"step": 3, "totalSteps": 8, "summary": "3/8"}}
    result = {"uri": "s3://b/k.png", "width": 64, "height": 64, "seed": 1, "sha256": "x", "bytes": 10}
    patch, event = event_patch(status, ev("succeeded", results=[result], run_seconds=1.25), NOW)
    assert patch and patch["phase"] == "Succeeded" and patch["results"][0]["uri"] == "s3://b/k.png"
    assert patch["duration"] == "1.2s" and patch["runSeconds"] == 1.25
    assert cond(patch, "Succeeded")["status"] == "True" and cond(patch, "Running")["status"] == "False"
    assert event == ("Normal", "Completed", "1 image(s) stored")


@pytest.mark.parametrize("terminal", ["Succeeded", "Failed", "Cancelled"])
@pytest.mark.parametrize("late", ["started", "progress", "succeeded", "failed", "retrying"])
def test_terminal_phase_is_final(terminal: str, late: str) -> None:
    assert event_patch({"phase": terminal}, ev(late, step=1), NOW) == (None, None)


def test_progress_is_throttled_to_one_per_second() -> None:
    t = NOW.timestamp()
    status = {"phase": "Running"}
    assert event_patch(status, ev("progress", ts=t + 0.5, step=2), NOW, last_progress_at=t)[0] is None
    assert event_patch(status, ev("progress", ts=t + 1.0, step=3), NOW, last_progress_at=t)[0] is not None


def test_retrying_goes_back_to_queued_with_reason() -> None:
    patch, event = event_patch({"phase": "Running"}, ev("retrying", reason="OutOfMemory", message="CUDA oom"), NOW)
    assert patch and patch["phase"] == "Queued" and cond(patch, "Running")["reason"] == "Retrying"
    assert event and event[0] == "Warning" and "OutOfMemory" in event[2]


def test_failed_event_records_worker_reason() -> None:
    patch, _ = event_patch({"phase": "Running"}, ev("failed", reason="MaxRetriesExceeded", message="gave up"), NOW)
    assert patch and patch["phase"] == "Failed" and cond(patch, "Failed")["reason"] == "MaxRetriesExceeded"


def test_timeout_from_creation() -> None:
    s = {"timeoutSeconds": 120}
    assert timeout_patch(s, {"phase": "Running"}, META, NOW) is None  # 60 s old
    patch = timeout_patch(s, {"phase": "Running"}, META, NOW + timedelta(seconds=61))
    assert patch and patch["phase"] == "Failed" and cond(patch, "Failed")["reason"] == "Timeout"
    assert timeout_patch(s, {"phase": "Succeeded"}, META, NOW + timedelta(hours=1)) is None
    assert timeout_patch({}, {"phase": "Running"}, META, NOW + timedelta(hours=1)) is None


def test_ttl_after_finished() -> None:
    done = {"phase": "Succeeded", "finishedAt": "2026-11-23T11:59:50Z"}
    assert seconds_until_expiry({"ttlSecondsAfterFinished": 30}, done, NOW) == 20
    assert seconds_until_expiry({"ttlSecondsAfterFinished": 5}, done, NOW) == -5
    assert seconds_until_expiry({}, done, NOW) is None
    assert seconds_until_expiry({"ttlSecondsAfterFinished": 5}, {"phase": "Running"}, NOW) is None


def test_cancel_patch_only_for_live_jobs() -> None:
    assert cancel_patch({"phase": "Succeeded"}, NOW, 1) is None
    patch = cancel_patch({"phase": "Queued"}, NOW, 1)
    assert patch and patch["phase"] == "Cancelled"


def test_condition_transition_time_moves_only_on_flip() -> None:
    conds, changed = set_condition(None, "Ready", True, "Ok", "fine", NOW, 1)
    assert changed and conds[0]["lastTransitionTime"] == "2026-11-23T12:00:00Z"
    later = NOW + timedelta(minutes=1)
    same, changed = set_condition(conds, "Ready", True, "Ok", "fine", later, 1)
    assert not changed and same == conds
    msg, changed = set_condition(conds, "Ready", True, "Ok", "still fine", later, 1)
    assert changed and msg[0]["lastTransitionTime"] == "2026-11-23T12:00:00Z"
    flipped, _ = set_condition(conds, "Ready", False, "Broken", "x", later, 1)
    assert flipped[0]["lastTransitionTime"] == "2026-11-23T12:01:00Z"


def test_collapse_keeps_only_the_last_progress_before_a_transition() -> None:
    batch = [
        ("1", ev("started")),
        ("2", ev("progress", step=1)),
        ("3", ev("progress", step=2)),
        ("4", ev("progress", step=3)),
    ]
    assert [(e.type, e.step) for e in collapse(batch)] == [("started", None), ("progress", 3)]
    batch.append(("5", ev("succeeded")))
    assert [e.type for e in collapse(batch)] == ["started", "succeeded"]


def test_rerouted_job_records_its_fallback() -> None:
    patch, event = event_patch({"phase": "Queued"}, ev("rerouted", reason="FallbackModel", message="backup"), NOW)
    assert patch and patch["phase"] == "Queued" and patch["routedTo"] == "backup"
    assert cond(patch, "Queued")["reason"] == "FallbackModel" and event and "backup" in event[2]


def test_a_final_transition_written_without_its_event_is_recorded_under_the_same_key() -> None:
    from zimage_operator.reconcile import event_key, replayed_event

    ok = JobEvent(type="succeeded", uid="u", namespace="ns", name="fox", attempt=1, ts=NOW.timestamp())
    patch, first = event_patch({"phase": "Running"}, ok, NOW)
    assert patch and first
    assert replayed_event({**patch}, ok, NOW) == first  # same Event, for the same name
    assert replayed_event({"phase": "Running"}, ok, NOW) is None  # not written yet: event_patch's job
    failed = ok.model_copy(update={"type": "failed", "reason": "WorkerError"})
    assert replayed_event({**patch}, failed, NOW) is None  # a different outcome than the one written
    started = ok.model_copy(update={"type": "started", "attempt": 2})
    assert [event_key(e) for e in (ok, failed, started)] == ["final", "final", "started-2"]


def test_a_job_that_started_and_finished_in_one_batch_gets_one_patch_with_both() -> None:
    from zimage_operator.reconcile import fold_events

    queued = {
        "phase": "Queued",
        "queuedAt": "2026-11-23T11:59:00Z",
        "progress": {"step": 0, "totalSteps": 8},
        "conditions": [{"type": "Queued", "status": "True", "reason": "Enqueued", "lastTransitionTime": "x"}],
    }
    started, done = ev("started", attempt=1, worker="w1"), ev("succeeded", ts=NOW.timestamp() + 2, attempt=1)
    folded = fold_events(queued, [started, ev("progress", step=4), done], NOW, generation=1)
    assert folded.patch is not None and folded.patch["phase"] == "Succeeded"
    # the start's fields survive the fold: one write carries what two wrote before
    assert folded.patch["startedAt"] and folded.patch["worker"] == "w1" and folded.patch["queueSeconds"] == 60.0
    assert folded.patch["progress"] == {"step": 8, "totalSteps": 8, "summary": "8/8"}
    assert {c["type"] for c in folded.patch["conditions"]} >= {"Queued", "Running", "Succeeded"}
    assert [(e[1], key) for e, key in folded.events] == [("Started", "started-1"), ("Completed", "final")]
    assert folded.status["phase"] == "Succeeded"


def test_folding_a_redelivered_final_event_writes_nothing_and_replays_its_event_once() -> None:
    from zimage_operator.reconcile import fold_events

    done = ev("succeeded", attempt=1)
    first = fold_events({"phase": "Running"}, [done], NOW)
    assert first.patch is not None
    again = fold_events(first.status, [done, done], NOW)
    assert again.patch is None and [key for _, key in again.events] == ["final"]
    assert fold_events({"phase": "Running"}, [], NOW).patch is None


def test_folded_progress_is_throttled_per_job_and_remembered() -> None:
    from zimage_operator.reconcile import fold_events

    t0 = NOW.timestamp()
    folded = fold_events({"phase": "Running"}, [ev("progress", t0, step=1), ev("progress", t0 + 0.2, step=2)], NOW)
    assert folded.patch == {"progress": {"step": 1, "totalSteps": 0, "summary": "1/0"}}
    assert folded.progress_at == t0
    later = fold_events(folded.status, [ev("progress", t0 + 0.5, step=3)], NOW, last_progress_at=folded.progress_at)
    assert later.patch is None
